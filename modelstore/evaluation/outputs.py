"""Output-space fidelity of a stored task: run it and its original on the same data.

Weight-space error (`verify`) does not tell whether a task still works; this does, for any
transformers sequence classifier or causal LM. The stored task is its original's architecture
with the store's weights copied in (`Store.load_into`), so both run the same code.

- Sequence classifiers: top-1 agreement and mean KL(original || stored) of the class
  distributions; with labels in the data, both accuracies and their difference.
- Causal LMs: perplexity of both on the data's text, top-1 next-token agreement, and mean KL of
  the next-token distributions (over the positions that predict a real token).

Data is JSON lines: `{"text": ...}`, optionally with `"label"` (an int, or a name in the model's
config `label2id`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from modelstore._runtime.progress import bar
from modelstore.errors import InputError
from modelstore.serving.hf_models import no_loading_bars, quiet_load_report
from modelstore.store import Store

_KINDS = {"ForSequenceClassification": "classification", "ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm"}


def read_data(path: str, label2id: dict[str, int] | None = None) -> tuple[list[str], list[int] | None]:
    """Texts and (when every line has one) labels from a JSON-lines file.

    Raises:
        InputError: the file is missing, a line is not a JSON object with a "text" string, or a
            label is unknown.
    """
    texts: list[str] = []
    labels: list[Any] = []  # JSON values: ints, and label names mapped to ints
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line for line in fh if line.strip()]
    except OSError as e:
        raise InputError(f"--data {path}: {e.strerror or e}") from None
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f"--data {path}: line {i} is not a JSON object with a \"text\" string")
        texts.append(row["text"])
        label = row.get("label")
        if isinstance(label, str):
            if not label2id or label not in label2id:
                raise InputError(f"--data {path}: line {i} has label {label!r}, which the model's label2id lacks")
            label = label2id[label]
        labels.append(label)
    if not texts:
        raise InputError(f"--data {path}: no examples")
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        raise InputError(f"--data {path}: some lines have a label and some do not; label all or none")
    return texts, (labels if all(has) else None)


def evaluate(store: Store, task: str, original: str, data: str, *, batch_size: int = 16, max_length: int = 256,
             progress: bool = False) -> dict[str, Any]:
    """Metrics of `task` against `original` (a transformers model directory) on `data` (see the module).

    Raises:
        InputError: an unsupported architecture, unreadable data, or a task that does not fit.
    """
    if batch_size < 1 or max_length < 2:
        raise InputError("--batch-size must be at least 1 and --max-length at least 2")
    try:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
        )
    except ImportError:
        raise InputError("modelstore eval needs transformers: pip install transformers") from None
    if not os.path.isfile(os.path.join(original, "config.json")):
        raise InputError(f"--original {original}: not a transformers model directory (no config.json)")
    config = AutoConfig.from_pretrained(original)
    arch = (config.architectures or ["?"])[0]
    kind = next((k for suffix, k in _KINDS.items() if arch.endswith(suffix)), None)
    if kind is None:
        raise InputError(f"{original} is a {arch}; eval runs sequence classifiers and causal LMs")
    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    with no_loading_bars():  # eval draws its own bar
        ref = cls.from_pretrained(original).eval()
        with quiet_load_report():  # the same load as ref's: transformers reported its keys once
            mine = cls.from_pretrained(original).eval()
    store.load_into(mine, task)
    tokenizer = _tokenizer(store, task, original)
    texts, labels = read_data(data, getattr(config, "label2id", None))
    run = _causal_lm if kind == "causal-lm" else _classifier
    out = run(ref, mine, _batches(tokenizer, texts, labels, batch_size, max_length, progress))
    return {"task": task, "original": original, "data": data, "model": arch, "kind": kind, "examples": len(texts),
            **out}


def _tokenizer(store: Store, task: str, original: str) -> Any:
    """The original's tokenizer, else the one the store keeps with the task's base."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(original)
    except (OSError, ValueError):
        files = store.model_files(store.entry(task)["base"])
        if not any(n.startswith("tokenizer") or n.startswith("vocab") for n in files):
            raise InputError(f"neither {original} nor the store has a tokenizer for task {task!r}") from None
        with tempfile.TemporaryDirectory() as d:
            for name, blob in files.items():
                with open(os.path.join(d, name), "wb") as fh:
                    fh.write(blob)
            tok = AutoTokenizer.from_pretrained(d)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"  # padding after the text: a causal LM's positions stay those of the text
    return tok


def _batches(tokenizer: Any, texts: list[str], labels: list[int] | None, size: int, max_length: int,
             progress: bool) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    starts = range(0, len(texts), size)
    for i in bar(starts, "eval", progress, length=len(starts)):
        enc = tokenizer(texts[i:i + size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        yield dict(enc), None if labels is None else torch.tensor(labels[i:i + size])


def _classifier(ref: Any, mine: Any, batches: Iterator) -> dict[str, Any]:
    n = agree = right_ref = right_mine = 0
    kl = 0.0
    labelled = False
    with torch.no_grad():
        for enc, y in batches:
            a, b = ref(**enc).logits.double(), mine(**enc).logits.double()
            pa, pb = a.argmax(-1), b.argmax(-1)
            agree += int((pa == pb).sum())
            kl += float(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"))
            if y is not None:
                labelled = True
                right_ref += int((pa == y).sum())
                right_mine += int((pb == y).sum())
            n += len(pa)
    out: dict[str, Any] = {"agreement": agree / n, "mean_kl": kl / n}
    if labelled:
        out.update(accuracy_original=right_ref / n, accuracy_stored=right_mine / n,
                   accuracy_difference=(right_mine - right_ref) / n)
    return out


def _causal_lm(ref: Any, mine: Any, batches: Iterator) -> dict[str, Any]:
    tokens = agree = 0
    nll_ref = nll_mine = kl = 0.0
    with torch.no_grad():
        for enc, _ in batches:
            ids, mask = enc["input_ids"], enc["attention_mask"]
            a = ref(**enc).logits[:, :-1].double().log_softmax(-1)
            b = mine(**enc).logits[:, :-1].double().log_softmax(-1)
            target, real = ids[:, 1:], mask[:, 1:].bool()  # positions that predict a real token
            a, b, target = a[real], b[real], target[real]
            nll_ref -= float(a.gather(1, target[:, None]).sum())
            nll_mine -= float(b.gather(1, target[:, None]).sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            kl += float(F.kl_div(b, a, log_target=True, reduction="sum"))
            tokens += int(real.sum())
    if not tokens:
        raise InputError("the data has no text of two tokens or more to predict")
    return {"tokens": tokens, "perplexity_original": math.exp(nll_ref / tokens),
            "perplexity_stored": math.exp(nll_mine / tokens), "top1_agreement": agree / tokens, "mean_kl": kl / tokens}


__all__ = ["evaluate", "read_data"]
