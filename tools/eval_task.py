"""Check a stored task's accuracy against its original model on your own labelled data.

    python -m tools.eval_task STORE TASK --original PATH --data FILE [--classes a,b,...] [--prompts FILE] [--json]

FILE is CSV (header row) or JSON Lines (.jsonl) with fields ``text`` and ``label``; labels are
class names or 0-based indices. A model whose stored config is a ``*ForSequenceClassification``
is scored with its own head; any other encoder with this recipe's zero-shot head (tools.finetune):
the pre-trained MiniLM's normalized mean-pooled embedding of one prompt per class (--prompts:
one line per class, in class order; default: the class names), logits = 20 * cosine. The tokenizer
is the original directory's when it has one, else the pre-trained MiniLM's. PATH is anything
`modelstore add-task` reads (an HF model directory, single or sharded, a .safetensors file, a .bin
state dict, loaded with weights_only), or a PEFT LoRA adapter directory (merged into the
pre-trained MiniLM).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class EvalError(Exception):
    """Bad input, reported as one line."""


@dataclass(frozen=True)
class Data:
    texts: list[str]
    labels: list[int]
    classes: list[str]


def read_data(path: Path, classes: list[str] | None) -> Data:
    """Rows of a CSV / JSONL file as texts and class indices; class names come from `classes`
    or, when labels are names and no classes are given, from the sorted distinct labels."""
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            if path.suffix.lower() in (".jsonl", ".ndjson"):
                rows = [json.loads(line) for line in fh if line.strip()]
            else:
                rows = list(csv.DictReader(fh))
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise EvalError(f"{path}: cannot parse ({e})") from None
    if not rows:
        raise EvalError(f"{path}: no rows")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or row.get("text") is None or row.get("label") in (None, ""):
            raise EvalError(f"{path}: row {i} needs fields 'text' and 'label'")
    raw = [str(r["label"]).strip() for r in rows]
    names = classes or sorted(set(raw))
    if not classes and all(label.isdigit() for label in raw):
        raise EvalError("labels are indices: give the class names with --classes a,b,...")
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for i, label in enumerate(raw, 1):
        if label in index:
            labels.append(index[label])
        elif label.isdigit() and int(label) < len(names):
            labels.append(int(label))
        else:
            raise EvalError(f"{path}: row {i} has label {label!r}, not one of {names} or an index below {len(names)}")
    return Data([str(r["text"]) for r in rows], labels, names)


def original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights of the original, read as modelstore reads a task's checkpoint (a PEFT adapter dir:
    merged into the pre-trained MiniLM by tools.finetune)."""
    from modelstore.inputs.sources import open_checkpoint
    from tools.finetune import load_state_dict

    if path.is_dir() and (path / "adapter_config.json").is_file():
        return load_state_dict(path)
    checkpoint = open_checkpoint(str(path))  # a modelstore InputError names what it cannot read
    return {name: checkpoint.get(name) for name in checkpoint.names()}


class Scorer:
    """Predicts classes with a model built from the stored config: its own classifier, or the zero-shot head."""

    def __init__(self, config_json: str | None, tokenizer_dir: Path, data: Data, prompts: list[str] | None):
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        from tools.finetune import pretrained_model, pretrained_path

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if config_json is None:  # stores of the recipe's checkpoints keep config.json; a bare file may not
            config = AutoConfig.from_pretrained(pretrained_path())
        else:
            config_dict = json.loads(config_json)
            config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        self.classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or ())
        self.factory = (AutoModelForSequenceClassification if self.classifier else AutoModel).from_config
        self.config = config
        if self.classifier:
            if config.num_labels != len(data.classes):
                raise EvalError(f"the model has {config.num_labels} labels, the data {len(data.classes)} classes")
            return
        prompts = prompts or data.classes
        if len(prompts) != len(data.classes):
            raise EvalError(f"{len(prompts)} prompts for {len(data.classes)} classes: give one prompt per class")
        with torch.inference_mode():
            self.head = self._embed(pretrained_model(), prompts)

    @property
    def kind(self) -> str:
        return "own classifier" if self.classifier else "zero-shot prompt head"

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def _embed(self, model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
        from tools.finetune import embed

        enc = self._batch(texts)
        return embed(model, enc["input_ids"], enc["attention_mask"])

    def accuracy(self, state: dict[str, torch.Tensor], data: Data, batch_size: int = 64) -> float:
        """Fraction of `data` the model with weights `state` classifies right (fp32, eval mode)."""
        from tools.finetune import LOGIT_SCALE

        model = self.factory(self.config)
        buffers = {name for name, _ in model.named_buffers()}
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in buffers}, strict=False)
        missing = [k for k in missing if not k.startswith("pooler.")]  # mean pooling never reads the pooler
        if missing or unexpected:
            raise EvalError(f"weights do not fit the stored config: missing {missing[:2]}, unexpected {unexpected[:2]}")
        model.float().eval()
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(data.texts), batch_size):
                texts = data.texts[i : i + batch_size]
                if self.classifier:
                    logits = model(**self._batch(texts)).logits
                else:
                    logits = LOGIT_SCALE * self._embed(model, texts) @ self.head.T
                correct += int((logits.argmax(-1) == torch.tensor(data.labels[i : i + batch_size])).sum())
        return correct / len(data.texts)


def check(store: str, task: str, original: Path, data_path: Path, classes: list[str] | None = None,
          prompts: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Accuracy of `task` loaded from `store` and of its `original` on the data, and their difference."""
    import modelstore
    from tools.finetune import pretrained_path

    data = read_data(data_path, classes)
    s = modelstore.open(store)
    config_json = s.info()["bases"][s.entry(task)["base"]].get("config_json")
    has_tokenizer = original.is_dir() and any((original / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
    scorer = Scorer(config_json, original if has_tokenizer else pretrained_path(), data, prompts)
    stored = scorer.accuracy(s.load(task), data)
    orig = scorer.accuracy(original_state_dict(original), data)
    return {"store": store, "task": task, "examples": len(data.texts), "classes": data.classes, "head": scorer.kind,
            "original_accuracy": orig, "stored_accuracy": stored, "difference": stored - orig}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python -m tools.eval_task``; exit status 2 on bad input."""
    import modelstore

    p = argparse.ArgumentParser(prog="python -m tools.eval_task", description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("task")
    p.add_argument("--original", type=Path, required=True, help="the fine-tuned model the task was stored from")
    p.add_argument("--data", type=Path, required=True, help="CSV or JSONL with text,label")
    p.add_argument("--classes", default=None, help="class names in label-index order, comma-separated")
    p.add_argument("--prompts", type=Path, default=None, help="one prompt per line, per class (zero-shot head)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        prompts = None
        if args.prompts is not None:
            if not args.prompts.is_file():
                raise EvalError(f"{args.prompts}: no such file")
            prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        result = check(args.store, args.task, args.original, args.data, classes, prompts)
    except (EvalError, modelstore.ModelStoreError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.task}: {result['examples']} examples, {len(result['classes'])} classes, {result['head']}")
        print(f"original accuracy {result['original_accuracy']:.4f}")
        print(f"stored   accuracy {result['stored_accuracy']:.4f}")
        print(f"difference       {result['difference']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
