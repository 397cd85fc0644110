"""Write a stored task back out: full weights as a Hugging Face model directory, or its kind's
native format (a LoRA task as a PEFT adapter)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from safetensors.torch import save_file

from modelstore._runtime.units import parse_size
from modelstore.errors import InputError
from modelstore.format import dtypes
from modelstore.kinds import KINDS
from modelstore.serving.hf_models import placement, task_architecture
from modelstore.store import Store

#: Every format `export` writes: "hf" for any task, and each kind's native formats.
FORMATS = ("hf", *dict.fromkeys(f for k in KINDS for f in k.export_formats))
#: Largest safetensors file an "hf" export writes before it shards, as `save_pretrained` does.
MAX_SHARD_SIZE = "5GB"


def _fresh(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"{out} exists and is not an empty directory; choose a new one")


def export(store: Store, task: str, out: str | os.PathLike[str], fmt: str = "hf",
           dtype: torch.dtype | str | None = None, max_shard_size: str | int = MAX_SHARD_SIZE) -> list[str]:
    """Write `task` into the new directory `out`; return the files written.

    `fmt="hf"` writes the full weights as safetensors, sharded past `max_shard_size` (with
    model.safetensors.index.json, as `save_pretrained` writes them), in `dtype` if given, plus the
    task's config.json (the fine-tune's architecture and labels; its base's for tasks that keep
    none) and the pre-trained model's tokenizer and generation files: a directory that
    transformers' `from_pretrained(out)` and pipelines load. Buffers the task took from its base
    that its architecture does not keep (transformers 5's position_ids) are left out, as
    `save_pretrained` leaves them (with transformers installed). A kind's native format (e.g.
    "peft" for LoRA tasks, which `PeftModel.from_pretrained` loads) writes the task without its base.

    Raises:
        InputError: `out` is not new and empty, the task's kind has no such format, or a bad
            dtype or shard size.
    """
    out = os.fspath(out)
    kind = store.kind(task)
    if fmt != "hf" and fmt not in kind.export_formats:
        raise InputError(f"task {task!r} is {kind.title}; it exports as {', '.join(['hf', *kind.export_formats])}, "
                         f"not {fmt} (use --format hf)")
    try:
        limit = parse_size(max_shard_size)
    except ValueError as e:
        raise InputError(f"--max-shard-size: {e}") from None
    want = dtypes.requested_dtype(dtype)
    _fresh(out)
    if fmt != "hf":
        return kind.export(fmt, store.load(task, merged=False), out)
    config = store.task_config(task)
    dropped = _unkept(store, task) if config else frozenset()
    os.makedirs(out, exist_ok=True)
    files = _write_shards(((n, t) for n, t in store.tensors(task, dtype=want) if n not in dropped), out, limit, task)
    if config:
        files.append(_write(out, "config.json", _config_for(config, want).encode()))
    files += [_write(out, name, data) for name, data in store.task_files(task).items()]
    return files


def _unkept(store: Store, task: str) -> frozenset[str]:
    """The task's tensors its architecture does not keep in a state dict (ModuleTensors.fit's
    dropped buffers); none when transformers is missing or the task does not fit the class its
    config names (then the export holds what the store holds, as exports always did)."""
    try:
        cls, config = task_architecture(store, task)
        base = store.entry(task)["base"]
        names = store.kind(task).output_names(store.table(task), store._stored_base(base).names())
        placed = placement(task, names, cls, config)
        return frozenset() if placed is None else placed.dropped
    except InputError:
        return frozenset()


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out: str, limit: int, task: str) -> list[str]:
    """Stream tensors into safetensors files of at most `limit` bytes (one tensor may exceed it),
    holding one shard in memory; name them as save_pretrained does once their count is known."""
    shards: list[str] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = os.path.join(out, f".shard-{len(shards)}.safetensors")
        save_file(current, path, metadata={"format": "pt", "modelstore_task": task})
        shards.append(path)
        current.clear()

    for name, t in tensors:
        n = t.numel() * t.element_size()
        if current and size + n > limit:
            flush()
            size = 0
        current[name] = t.contiguous()
        weight_map[name] = len(shards)
        size, total = size + n, total + n
    if current or not shards:
        flush()
    if len(shards) == 1:
        os.replace(shards[0], os.path.join(out, "model.safetensors"))
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for tmp, name in zip(shards, names):
        os.replace(tmp, os.path.join(out, name))
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
    return [*names, _write(out, "model.safetensors.index.json", json.dumps(index, indent=2).encode())]


def _config_for(config: str, dtype: torch.dtype | None) -> str:
    """config.json, its dtype field set to `dtype` when the export casts (from_pretrained's "auto")."""
    if dtype is None:
        return config
    c = json.loads(config)
    c["dtype"] = dtypes.dtype_name(dtype)
    if "torch_dtype" in c:
        c["torch_dtype"] = c["dtype"]
    return json.dumps(c, indent=2)


def _write(out: str, name: str, data: bytes) -> str:
    with open(os.path.join(out, name), "wb") as fh:
        fh.write(data)
    return name


__all__ = ["export", "FORMATS", "MAX_SHARD_SIZE"]
