"""Output-space fidelity of a stored task: run it and its original on the same data.

Weight-space error (`verify`) does not tell whether a task still works; this does, for any
transformers sequence, image, audio or token classifier, masked, causal or encoder-decoder LM,
extractive QA model, CTC speech recognizer, semantic segmentation model or bare (embedding)
model. The stored task is its original's architecture with the store's weights copied in
(`Store.load_into`; built as load_model builds it where transformers fuses a checkpoint's
tensors), so both run the same code.

- Bare (embedding) models: whether each example's nearest neighbour among the original's
  embeddings of the others is the same (embeddings.neighbours), and the cosine of each stored
  embedding to the original's. A dual encoder (CLIP) given images with texts: whether each image
  matches the same of the data's texts (embeddings.matches), and how often each model matches an
  image with its own row's text.
- Sequence classifiers: top-1 agreement and mean KL(original || stored) of the class
  distributions; with labels in the data, both accuracies and their difference. Multiple-choice
  models likewise, over each text's own choices. A multi-label head's every label is a yes/no
  prediction (and `same_labels` the fraction of texts given the same set; with labels, both
  accuracies per label and at every label of a text); a regression head's outputs are compared by
  their absolute difference.
- Token classifiers: top-1 agreement and mean KL over every token of the texts.
- Masked LMs: the same over the tokens masked of each text (runner.MASKED, the same tokens every
  run), and both models' accuracy at predicting them.
- CTC speech recognizers: the same over the frames of each sound, and the fraction of sounds
  whose every frame agrees (`same_transcript`); semantic segmentation models: over a grid of
  each image's label map (runner.GRID).
- Extractive QA models: the same over the answer's start and its end, and the fraction of texts
  whose answer span is the original's (`same_answer`).
- Causal LMs: perplexity of both on the data's text, top-1 next-token agreement, and mean KL of
  the next-token distributions (over the positions that predict a real token).
- Encoder-decoder LMs: the original's greedy output for each text (up to GENERATED_TOKENS), both
  models' top-1 agreement and mean KL on it token by token, and the fraction of texts whose greedy
  output the stored task generates identically.

Data is JSON lines (`{"text": ...}`, optionally with `"text_pair"`, and `"label"`: an int, or a name
in the model's config `label2id`; a QA model's `"question"` and `"context"`; an image or speech
model's `"image"` or `"audio"` file) or CSV with those columns, read as calibration data is
(modelstore.fidelity);
agreement and KL are counted as calibrated add-task counts them.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from modelstore._runtime.progress import bar
from modelstore.errors import InputError
from modelstore.evaluation.weights import task_adapter
from modelstore.fidelity.data import Examples, read_data
from modelstore.fidelity.embeddings import distinct, embedded, matches, neighbours, pooling_of, text_batch
from modelstore.fidelity.metrics import Agreement
from modelstore.fidelity.runner import (
    GENERATED_TOKENS,
    check_inputs,
    check_rows,
    encode,
    examples_in,
    fitted_length,
    forward,
    generated,
    next_tokens,
    output_kind,
    preprocessor_for,
    rows_of,
    runs_on,
)
from modelstore.inputs.architectures import (
    config_from_json,
    model_class,
    no_loading_bars,
    quiet_load_report,
    transformers_module,
)
from modelstore.serving.hf_models import load_model
from modelstore.serving.modules import ModuleTensors
from modelstore.store import Store


def evaluate(store: Store, task: str, original: str | None, data: str, *, lora: str | None = None,
             batch_size: int = 16, max_length: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Metrics of `task` against `original` (a transformers model directory), or for a LoRA task
    against the model its PEFT adapter `lora` makes of the store's θ0, on `data` (see the module).
    Texts are cut at `max_length` tokens: by default the task's calibration cut them at (its
    fidelity record's `max_length`), else 256.

    Raises:
        InputError: neither or both originals, an unsupported architecture, unreadable data, or a
            task that does not fit.
    """
    if max_length is None:
        fidelity: dict[str, Any] = dict(store.entry(task).get("fidelity") or {})
        max_length = fidelity.get("max_length", 256)
    if batch_size < 1 or max_length < 2:
        raise InputError("--batch-size must be at least 1 and --max-length at least 2")
    if (original is None) == (lora is None):
        raise InputError("give the task's original as a model directory (--original) or, for a LoRA task, as its "
                         "PEFT adapter (--lora), one of them")
    transformers = transformers_module("modelstore eval")
    if original is not None:
        if not os.path.isfile(os.path.join(original, "config.json")):
            raise InputError(f"--original {original}: not a transformers model directory (no config.json)")
        config = transformers.AutoConfig.from_pretrained(original)
    else:
        config_json = store.task_config(task)
        if not config_json:
            raise InputError(f"task {task!r}'s base keeps no config.json to build its model from; compare it with "
                             "--original, the adapter merged into a model directory")
        config = config_from_json(transformers, config_json, f"task {task!r}")
    arch = (config.architectures or ["?"])[0]
    kind = output_kind(arch, config)
    if kind is None:
        raise InputError(f"{original or task} is a {arch}; eval runs sequence, multiple-choice, image, audio and "
                         "token classifiers, masked, causal (LLaVA too) and encoder-decoder LMs (Whisper and "
                         "captioners too), extractive QA models, CTC speech recognizers, semantic segmentation models, "
                         "bare (embedding) models and dual encoders (CLIP)")
    cls = model_class(transformers, None, config)  # the class it was fine-tuned as
    with no_loading_bars():  # eval draws its own bar
        if original is not None:
            ref = cls.from_pretrained(original).eval()
            if ModuleTensors(ref).fuses:  # no tensor of the model is one of the task's: build it from them
                mine = load_model(task, store, cls, dtype=torch.float32)
            else:
                with quiet_load_report():  # the same load as ref's: transformers reported its keys once
                    mine = cls.from_pretrained(original).eval()
                store.load_into(mine, task)
        else:
            assert lora is not None
            mine = load_model(task, store, cls, dtype=torch.float32)
            ref = _adapted(store, task, lora, copy.deepcopy(mine))  # the task read once
    examples = read_data(data, getattr(config, "label2id", None),
                         labels=kind in ("classification", "multiple-choice", "multi-label"),
                         multi_hot=getattr(config, "num_labels", None) if kind == "multi-label" else None)
    check_rows(kind, examples.pairs, examples.choices, f"--data {data}")
    _check_labels(examples, kind, config, data)
    check_inputs(ref, examples.modality, f"--data {data}")
    preprocessor = preprocessor_for(original or lora, lambda: store.task_files(task),
                                    f"task {task!r}", examples.modality)
    max_length = fitted_length(max_length, config, preprocessor)
    pooling = pooling_of(original or lora, ref)
    if pooling == "features" and examples.modality == "image-text":
        kind = "zero-shot"  # a dual encoder's: each image's match among the data's texts
    batches = _batches(preprocessor, kind, examples, batch_size, max_length, progress,
                       ref if pooling == "features" else None)
    with runs_on(f"--data {data}", "the models"):
        if kind == "embedding":
            out = _embedding(ref, mine, batches, pooling)
        elif kind == "zero-shot":
            texts = distinct(examples.texts)
            at = {t: i for i, t in enumerate(texts)}
            out = _zero_shot(ref, mine, batches, text_batch(preprocessor, texts, max_length, ref),
                             torch.tensor([at[t] for t in examples.texts]))
        elif kind in ("classification", "multiple-choice"):
            out = _classifier(kind, ref, mine, batches)
        elif kind == "causal-lm":
            out = _causal_lm(ref, mine, batches)
        elif kind == "regression":
            out = _regression(ref, mine, batches)
        else:
            out = _predictions(kind, ref, mine, batches)
    return {"task": task, "original": original or lora, "data": data, "model": arch, "kind": kind,
            "examples": len(examples.inputs), "inputs": examples.modality, **out}


def _check_labels(examples: Examples, kind: str, config: Any, data: str) -> None:
    """Refuse a label that is no class of the model (no choice of its row, for a multiple-choice
    model): scored, it would count as a miss of both models.

    Raises:
        InputError: naming the row (a JSON line's number, or a CSV's row after the header).
    """
    if examples.labels is None:
        return
    if kind == "multiple-choice" and examples.choices is not None:
        sizes = [len(c) for c in examples.choices]
    else:
        classes = getattr(config, "num_labels", None)
        if not isinstance(classes, int):
            return
        sizes = [classes] * len(examples.labels)
    bad = next((i for i, (y, n) in enumerate(zip(examples.labels, sizes)) if isinstance(y, int) and not 0 <= y < n),
               None)
    if bad is not None:
        what = f"{sizes[bad]} choices" if kind == "multiple-choice" else f"{sizes[bad]} classes"
        raise InputError(f"--data {data}: example {bad + 1} has label {examples.labels[bad]}, and the model has "
                         f"{what} (0 to {sizes[bad] - 1}); fix the label or give the task's own data")


def _adapted(store: Store, task: str, path: str, model: Any) -> Any:
    """`model`, holding LoRA task `task` as stored, with each weight the PEFT adapter at `path`
    adapts set to θ0 + s·B·A and each tensor it saves whole (a classifier's head, PEFT's
    `modules_to_save`) set to the adapter's: the adapter's model, whatever the store holds.

    Raises:
        InputError: a tensor the adapter saves does not fit the task's (another task's adapter).
    """
    adapter, base = task_adapter(store, task, path)
    target = ModuleTensors(model)
    saved = list(adapter.saved.values())
    placed = target.fit(task, [m.target for m in adapter.modules.values()] + [t.target for t in saved], strict=False)
    with torch.no_grad():
        for m in adapter.modules.values():
            dst = target.tensors[placed.model[m.target]]
            dst.copy_(base.get(m.target).to(torch.float64) + m.update())
        for t in saved:
            dst = target.tensors[placed.model[t.target]]
            if dst.shape != t.tensor.shape:
                raise InputError(f"--lora {path}: it saves {t.target!r} of shape {list(t.tensor.shape)}, where task "
                                 f"{task!r} has {list(dst.shape)}; give the adapter this task was added from")
            dst.copy_(t.tensor)
    return model.eval()


def _batches(preprocessor: Any, kind: str, examples: Examples, size: int, max_length: int, progress: bool,
             dual: Any = None) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """The examples in batches, with their labels; a dual encoder's (`dual`) texts padded as it
    takes them, its images with texts (zero-shot) as images alone, matched with the texts apart."""
    texts, pairs, labels, images, audio, choices = examples
    starts = range(0, len(examples.inputs), size)
    for i in bar(starts, "eval", progress, length=len(starts)):
        j = i + size
        if dual is not None and images is None:
            enc = text_batch(preprocessor, texts[i:j], max_length, dual)
        else:
            enc = encode(preprocessor, kind, [] if kind == "zero-shot" else texts[i:j],
                         None if pairs is None else pairs[i:j], max_length, i,
                         None if images is None else images[i:j], None if audio is None else audio[i:j],
                         None if choices is None else choices[i:j])
        yield enc, None if labels is None else torch.tensor(labels[i:j])


def _classifier(kind: str, ref: Any, mine: Any, batches: Iterator) -> dict[str, Any]:
    """A classifier's (a multiple-choice model's: over each text's choices) agreement and KL, and
    with labels both accuracies."""
    acc = Agreement()
    n = right_ref = right_mine = 0
    labelled = False
    with torch.no_grad():
        for enc, y in batches:
            a, b = (rows_of(kind, forward(m, enc), enc)[0].double() for m in (ref, mine))
            acc.add(a, b)
            if y is not None:
                labelled = True
                right_ref += int((a.argmax(-1) == y).sum())
                right_mine += int((b.argmax(-1) == y).sum())
            n += len(a)
    out: dict[str, Any] = {"agreement": acc.agreement, "mean_kl": acc.mean_kl}
    if labelled:
        out.update(accuracy_original=right_ref / n, accuracy_stored=right_mine / n,
                   accuracy_difference=(right_mine - right_ref) / n)
    return out


def _causal_lm(ref: Any, mine: Any, batches: Iterator) -> dict[str, Any]:
    acc = Agreement()
    nll_ref = nll_mine = 0.0
    with torch.no_grad():
        for enc, _ in batches:
            ids, real = enc["input_ids"], next_tokens(enc, ref)  # positions that predict a token of the text
            a = ref(**enc).logits[:, :-1][real].double().log_softmax(-1)
            b = mine(**enc).logits[:, :-1][real].double().log_softmax(-1)
            target = ids[:, 1:][real]
            nll_ref -= float(a.gather(1, target[:, None]).sum())
            nll_mine -= float(b.gather(1, target[:, None]).sum())
            acc.add(a, b)
    if not acc.rows:
        raise InputError("the data has no text of two tokens or more to predict")
    return {"tokens": acc.rows, "perplexity_original": math.exp(nll_ref / acc.rows),
            "perplexity_stored": math.exp(nll_mine / acc.rows), "top1_agreement": acc.agreement,
            "mean_kl": acc.mean_kl}


#: What eval calls the fraction of texts whose predictions all agree, for the kinds whose users
#: read a text's predictions together.
_WHOLE = {"seq2seq": "same_generation", "question-answering": "same_answer", "multi-label": "same_labels",
          "ctc": "same_transcript"}


def _predictions(kind: str, ref: Any, mine: Any, batches: Iterator) -> dict[str, Any]:
    """Agreement and KL prediction by prediction (runner.rows_of) of a model that makes several
    per text: a seq2seq model's on the original's greedy output (the stored task generates that
    output too exactly when its top-1 token agrees at every one of its positions)."""
    acc = Agreement()
    texts = differ = right_ref = right_mine = whole_ref = whole_mine = 0
    y = None
    with torch.no_grad():
        for enc, y in batches:
            if kind == "seq2seq":
                enc = generated(ref, enc, GENERATED_TOKENS)
            (a, text), (b, _) = (rows_of(kind, forward(m, enc), enc, m) for m in (ref, mine))
            a, b = a.double(), b.double()
            acc.add(a, b)
            differ += len(text[a.argmax(-1) != b.argmax(-1)].unique())
            texts += examples_in(enc)
            if kind == "masked-lm":
                truth = enc["labels"][enc["labels"] != -100]
                right_ref += int((a.argmax(-1) == truth).sum())
                right_mine += int((b.argmax(-1) == truth).sum())
            if kind == "multi-label" and y is not None:  # rows: each text's labels in order, yes (1) or no (0)
                hit_ref, hit_mine = (r.argmax(-1).view(y.shape) == y for r in (a, b))
                right_ref, right_mine = right_ref + int(hit_ref.sum()), right_mine + int(hit_mine.sum())
                whole_ref, whole_mine = whole_ref + int(hit_ref.all(-1).sum()), whole_mine + int(hit_mine.all(-1).sum())
    out: dict[str, Any] = {"predictions": acc.rows, "top1_agreement": acc.agreement, "mean_kl": acc.mean_kl}
    if kind == "multi-label" and y is not None and texts:  # per label, and texts given every label right
        out.update(accuracy_original=right_ref / acc.rows, accuracy_stored=right_mine / acc.rows,
                   exact_match_original=whole_ref / texts, exact_match_stored=whole_mine / texts)
    if kind in _WHOLE:
        out[_WHOLE[kind]] = (texts - differ) / texts
    if kind == "masked-lm" and acc.rows:
        out.update(accuracy_original=right_ref / acc.rows, accuracy_stored=right_mine / acc.rows)
    return out


def _embedding(ref: Any, mine: Any, batches: Iterator, pooling: str) -> dict[str, Any]:
    """An embedding model's nearest neighbours (runner.neighbours: of each example among the
    original's embeddings of the others) and how far its embeddings moved (cosine to the original's)."""
    with torch.no_grad():
        pairs = [(embedded(ref, enc, pooling), embedded(mine, enc, pooling)) for enc, _ in batches]
    anchors = torch.cat([a for a, _ in pairs])
    if len(anchors) < 2:
        raise InputError("an embedding model's examples are compared by their nearest neighbours among the others; "
                         "give at least two")
    acc, first = Agreement(), 0
    for a, b in pairs:
        acc.add(neighbours(a, anchors, first), neighbours(b, anchors, first))
        first += len(a)
    cosine = torch.cat([(a * b).sum(-1) for a, b in pairs])
    return {"predictions": acc.rows, "top1_agreement": acc.agreement, "mean_kl": acc.mean_kl,
            "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}


def _zero_shot(ref: Any, mine: Any, batches: Iterator, texts: dict[str, torch.Tensor],
               own: torch.Tensor) -> dict[str, Any]:
    """A dual encoder's match of each image among the data's texts (`texts`, a batch; `own`: the
    index among them of each image's row's text), and how often each model matches its own."""
    acc, first, right = Agreement(), 0, [0, 0]
    with torch.no_grad():
        features = [embedded(m, texts, "features") for m in (ref, mine)]
        for enc, _ in batches:
            a, b = (matches(m, enc, f) for m, f in zip((ref, mine), features))
            acc.add(a, b)
            mine_own = own[first:first + len(a)]
            right = [r + int((x.argmax(-1) == mine_own).sum()) for r, x in zip(right, (a, b))]
            first += len(a)
    return {"predictions": acc.rows, "texts": len(texts["input_ids"]), "top1_agreement": acc.agreement,
            "mean_kl": acc.mean_kl, "matched_original": right[0] / first, "matched_stored": right[1] / first}


def _regression(ref: Any, mine: Any, batches: Iterator) -> dict[str, Any]:
    """How far a regression head's outputs moved: their absolute differences, beside the spread
    of the original's outputs that gives them a scale."""
    moved, outputs = [], []
    with torch.no_grad():
        for enc, _ in batches:
            a, b = ref(**enc).logits.double(), mine(**enc).logits.double()
            moved.append((a - b).abs().flatten())
            outputs.append(a.flatten())
    d, a = torch.cat(moved), torch.cat(outputs)
    return {"predictions": len(d), "mean_abs_difference": float(d.mean()), "max_abs_difference": float(d.max()),
            "original_std": float(a.std()) if len(a) > 1 else 0.0}


__all__ = ["evaluate"]
