"""Write a stored task back out: full weights as a Hugging Face model directory, or its kind's
native format (a LoRA task as a PEFT adapter)."""

from __future__ import annotations

import os

from safetensors.torch import save_file

from .errors import InputError
from .kinds import KINDS
from .store import Store

#: Every format `export` writes: "hf" for any task, and each kind's native formats.
FORMATS = ("hf", *dict.fromkeys(f for k in KINDS for f in k.export_formats))


def _fresh(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"{out} exists and is not an empty directory; choose a new one")


def export(store: Store, task: str, out: str | os.PathLike[str], fmt: str = "hf") -> list[str]:
    """Write `task` into the new directory `out`; return the files written.

    `fmt="hf"` writes `model.safetensors` (and `config.json` when the pre-trained input had one),
    which transformers' `from_pretrained(out)` loads; a kind's native format (e.g. "peft" for
    LoRA tasks, which `PeftModel.from_pretrained` loads) writes the task without its base.

    Raises:
        InputError: `out` is not new and empty, or the task's kind has no such format.
    """
    out = os.fspath(out)
    kind = store.kind(task)
    if fmt != "hf" and fmt not in kind.export_formats:
        raise InputError(f"task {task!r} is {kind.title}; it exports as {', '.join(['hf', *kind.export_formats])}, "
                         f"not {fmt} (use --format hf)")
    _fresh(out)
    if fmt != "hf":
        return kind.export(fmt, store.load(task, merged=False), out)
    sd = store.load(task)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt", "modelstore_task": task})
    files = ["model.safetensors"]
    config = store.manifest["bases"][store.entry(task)["base"]].get("config_json")
    if config:
        with open(os.path.join(out, "config.json"), "w") as fh:
            fh.write(config)
        files.append("config.json")
    return files


__all__ = ["export", "FORMATS"]
