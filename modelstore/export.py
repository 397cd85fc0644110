"""Write a stored task back out as a Hugging Face-style model directory."""

from __future__ import annotations

import os

from safetensors.torch import save_file

from .errors import InputError
from .store import Store


def _fresh(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"{out} exists and is not an empty directory; choose a new one")


def export_hf(store: Store, task: str, out: str) -> list[str]:
    """Write `out/model.safetensors` (and `config.json` when the pre-trained input had one).

    The directory loads with transformers' `from_pretrained(out)`. Returns the files written.
    """
    _fresh(out)
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


def export_peft(store: Store, task: str, out: str) -> list[str]:
    """Write a LoRA task as a rank-q PEFT adapter that `PeftModel.from_pretrained` loads."""
    from .lora import write_peft_adapter
    if store.entry(task)["kind"] != "lora":
        raise InputError(f"task {task!r} is a full fine-tune; only LoRA tasks export as PEFT adapters (use --format hf)")
    _fresh(out)
    a = store.load(task, merged=False)
    write_peft_adapter(out, {}, {a.peft_names[n]: low for n, low in a.updates.items()},
                       {a.peft_names[n]: t for n, t in a.tensors.items()}, original_config=a.config)
    return ["adapter_config.json", "adapter_model.safetensors"]
