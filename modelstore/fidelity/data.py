"""A task's own inputs: the calibration data add-task chooses a representation on, and the data
`modelstore eval` measures one on. One reader for both, so a file that calibrates a task also
checks it.

A file is JSON lines (`{"text": ..., "label": ...}`) or CSV with a `text` column (and optionally
`label`), told apart by its extension (`.csv`); labels are optional and ignored by calibration.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelstore.errors import InputError

#: A function of (model, tokenized batch) giving [batch, classes] logits, for a model whose head
#: lives outside its checkpoint (a frozen head over a bare encoder).
OutputsFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def _rows(path: str, flag: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.lower().endswith(".csv"):
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or "text" not in reader.fieldnames:
                    raise InputError(f"{flag} {path}: a CSV file needs a \"text\" column")
                return [{k: v for k, v in row.items() if k in ("text", "label") and v not in (None, "")}
                        for row in reader]
            rows = []
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise InputError(f"{flag} {path}: line {i} is not a JSON object with a \"text\" string "
                                     "(JSON lines, or CSV with a .csv name)")
                rows.append(row)
            return rows
    except OSError as e:
        raise InputError(f"{flag} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{flag} {path}: not UTF-8 text (JSON lines, or CSV with a .csv name)") from None


def read_data(path: str, label2id: dict[str, int] | None = None,
              flag: str = "--data") -> tuple[list[str], list[int] | None]:
    """Texts and (when every row has one) labels of a data file (see the module).

    Raises:
        InputError: the file is missing or unreadable, has no examples, a row has no "text" string,
            or a label is unknown.
    """
    texts: list[str] = []
    labels: list[Any] = []  # ints, and label names mapped to ints
    for i, row in enumerate(_rows(path, flag), 1):
        texts.append(row["text"])
        label = row.get("label")
        if isinstance(label, str):
            if label.lstrip("-").isdigit() and not (label2id and label in label2id):
                label = int(label)  # a CSV's numbers are text
            elif not label2id or label not in label2id:
                raise InputError(f"{flag} {path}: row {i} has label {label!r}, which the model's label2id lacks")
            else:
                label = label2id[label]
        labels.append(label)
    if not texts:
        raise InputError(f"{flag} {path}: no examples")
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        raise InputError(f"{flag} {path}: some rows have a label and some do not; label all or none")
    return texts, (labels if all(has) else None)


@dataclass
class Calibration:
    """Inputs of a task that add-task runs the original and each candidate on, to keep the cheapest
    candidate that still behaves like the original (labels are not needed).

    >>> cal = modelstore.Calibration.from_file("sst2-val.jsonl")
    >>> store.add_task("sst2", "ckpt/", calibration=cal, min_agreement=0.99)

    Args:
        texts: the inputs.
        outputs: for a model whose head is not in its checkpoint, a function of (model, tokenized
            batch) giving [batch, classes] logits; by default the model's own logits (a sequence
            classifier's classes, a causal LM's next tokens).
        max_length: tokens kept of each text.
        batch_size: texts run at once.
        name: what messages call the data.
    """

    texts: Sequence[str]
    outputs: OutputsFn | None = None
    max_length: int = 256
    batch_size: int = 32
    name: str = "<texts>"
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        if not self.texts or not all(isinstance(t, str) for t in self.texts):
            raise InputError(f"calibration {self.name}: needs at least one text, and texts only")
        if self.max_length < 2 or self.batch_size < 1:
            raise InputError("calibration: max_length must be at least 2 and batch_size at least 1")
        if not self.sha256:
            self.sha256 = hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode()).hexdigest()

    @classmethod
    def from_file(cls, path: str, *, max_examples: int | None = 256, max_length: int = 256,
                  batch_size: int = 32) -> Calibration:
        """The first `max_examples` texts (None: all) of a JSON-lines or CSV file with a "text" field.

        Raises:
            InputError: the file is missing, unreadable, empty or has a row without text.
        """
        if max_examples is not None and max_examples < 1:
            raise InputError(f"--max-examples must be at least 1, got {max_examples}")
        texts, _ = read_data(path, None, "--calibration") if path else ([], None)
        try:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as e:
            raise InputError(f"--calibration {path}: {e.strerror or e}") from None
        return cls(texts[:max_examples], max_length=max_length, batch_size=batch_size, name=path, sha256=digest)


def as_calibration(calibration: Calibration | str | os.PathLike[str], max_examples: int | None = 256) -> Calibration:
    """`calibration`, or the Calibration of the file it names (its first `max_examples` texts)."""
    if isinstance(calibration, Calibration):
        return calibration
    return Calibration.from_file(os.fspath(calibration), max_examples=max_examples)


__all__ = ["Calibration", "OutputsFn", "as_calibration", "read_data"]
