"""Output-space fidelity of a stored task: run it and its original on the same data.

Weight-space error (`verify`) does not tell whether a task still works; this does, for any
transformers sequence or token classifier, causal LM or encoder-decoder LM. The stored task is its
original's architecture with the store's weights copied in (`Store.load_into`), so both run the
same code.

- Sequence classifiers: top-1 agreement and mean KL(original || stored) of the class
  distributions; with labels in the data, both accuracies and their difference.
- Token classifiers: top-1 agreement and mean KL over every token of the texts.
- Causal LMs: perplexity of both on the data's text, top-1 next-token agreement, and mean KL of
  the next-token distributions (over the positions that predict a real token).
- Encoder-decoder LMs: the original's greedy output for each text (up to GENERATED_TOKENS), both
  models' top-1 agreement and mean KL on it token by token, and the fraction of texts whose greedy
  output the stored task generates identically.

Data is JSON lines (`{"text": ...}`, optionally with `"label"`: an int, or a name in the model's
config `label2id`) or CSV with those columns, read as calibration data is (modelstore.fidelity);
agreement and KL are counted as calibrated add-task counts them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from modelstore._runtime.progress import bar
from modelstore.errors import InputError
from modelstore.fidelity.data import read_data
from modelstore.fidelity.metrics import Agreement
from modelstore.fidelity.runner import GENERATED_TOKENS, generated, output_kind, rows_of, tokenizer_for
from modelstore.inputs.architectures import no_loading_bars, quiet_load_report
from modelstore.store import Store


def evaluate(store: Store, task: str, original: str, data: str, *, batch_size: int = 16, max_length: int = 256,
             progress: bool = False) -> dict[str, Any]:
    """Metrics of `task` against `original` (a transformers model directory) on `data` (see the module).

    Raises:
        InputError: an unsupported architecture, unreadable data, or a task that does not fit.
    """
    if batch_size < 1 or max_length < 2:
        raise InputError("--batch-size must be at least 1 and --max-length at least 2")
    try:
        import transformers
    except ImportError:
        raise InputError("modelstore eval needs transformers: pip install transformers") from None
    if not os.path.isfile(os.path.join(original, "config.json")):
        raise InputError(f"--original {original}: not a transformers model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(original)
    arch = (config.architectures or ["?"])[0]
    kind = output_kind(arch, config)
    if kind is None:
        raise InputError(f"{original} is a {arch}; eval runs sequence and token classifiers, causal LMs and "
                         "encoder-decoder LMs")
    cls = getattr(transformers, _AUTO_CLASSES[kind])
    with no_loading_bars():  # eval draws its own bar
        ref = cls.from_pretrained(original).eval()
        with quiet_load_report():  # the same load as ref's: transformers reported its keys once
            mine = cls.from_pretrained(original).eval()
    store.load_into(mine, task)
    tokenizer = tokenizer_for(original, lambda: store.model_files(store.entry(task)["base"]), f"task {task!r}")
    texts, labels = read_data(data, getattr(config, "label2id", None) if kind == "classification" else None)
    batches = _batches(tokenizer, texts, labels, batch_size, max_length, progress)
    if kind == "classification":
        out = _classifier(ref, mine, batches)
    elif kind == "causal-lm":
        out = _causal_lm(ref, mine, batches)
    else:
        out = _per_token(kind, ref, mine, batches)
    return {"task": task, "original": original, "data": data, "model": arch, "kind": kind, "examples": len(texts),
            **out}


def _batches(tokenizer: Any, texts: list[str], labels: list[int] | None, size: int, max_length: int,
             progress: bool) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    starts = range(0, len(texts), size)
    for i in bar(starts, "eval", progress, length=len(starts)):
        enc = tokenizer(texts[i:i + size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        yield dict(enc), None if labels is None else torch.tensor(labels[i:i + size])


def _classifier(ref: Any, mine: Any, batches: Iterator) -> dict[str, Any]:
    acc = Agreement()
    n = right_ref = right_mine = 0
    labelled = False
    with torch.no_grad():
        for enc, y in batches:
            a, b = ref(**enc).logits.double(), mine(**enc).logits.double()
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
            ids, mask = enc["input_ids"], enc["attention_mask"]
            real = mask[:, 1:].bool()  # positions that predict a real token
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


def _per_token(kind: str, ref: Any, mine: Any, batches: Iterator) -> dict[str, Any]:
    """A token classifier's or an encoder-decoder LM's agreement and KL, prediction by prediction
    (for the latter on the original's greedy output; the stored task generates that output too
    exactly when its top-1 token agrees at every one of its positions)."""
    acc = Agreement()
    same = texts = 0
    with torch.no_grad():
        for enc, _ in batches:
            if kind == "seq2seq":
                enc = generated(ref, enc, GENERATED_TOKENS)
            a, b = ref(**enc).logits.double(), mine(**enc).logits.double()
            if kind == "seq2seq":
                real = enc["decoder_attention_mask"].bool()
                same += int(((a.argmax(-1) == b.argmax(-1)) | ~real).all(1).sum())
                texts += len(a)
            acc.add(rows_of(kind, a, enc), rows_of(kind, b, enc))
    out: dict[str, Any] = {"predictions": acc.rows, "top1_agreement": acc.agreement, "mean_kl": acc.mean_kl}
    if kind == "seq2seq":
        out["same_generation"] = same / texts
    return out


#: transformers' auto class of each kind of output.
_AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification",
                 "token-classification": "AutoModelForTokenClassification", "causal-lm": "AutoModelForCausalLM",
                 "seq2seq": "AutoModelForSeq2SeqLM"}


__all__ = ["evaluate"]
