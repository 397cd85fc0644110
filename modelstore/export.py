"""Write a stored task back out as a Hugging Face-style model directory."""

from __future__ import annotations

import os

from safetensors.torch import save_file

from .errors import InputError
from .store import Store


def export_hf(store: Store, task: str, out: str) -> list[str]:
    """Write `out/model.safetensors` (and `config.json` when the pre-trained input had one).

    The directory loads with transformers' `from_pretrained(out)`. Returns the files written.
    """
    if os.path.exists(out) and os.listdir(out):
        raise InputError(f"{out} exists and is not empty; choose a new directory")
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
