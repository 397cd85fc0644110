"""Rebuild a task's full weights on the target device: base + scatter(indices, values).

Everything after the read happens on `device`: the gap-encoded indices are
cumulated there and the values scattered there, so a GPU load moves only the
compressed task payload over the bus once the base is resident.
"""

from __future__ import annotations

import torch

from . import dtypes
from .errors import InputError
from .store import Store


def materialize(store: Store, task: str, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Full state dict of `task` on `device` (see spec/FORMAT.md, "Reading a task")."""
    if dtype is not None and not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating dtype, not {dtype}")
    e = store.entry(task)
    if e["kind"] == "lora":
        from .lora.task import materialize_lora
        return materialize_lora(store, task, device, dtype)
    what = f"task {task!r}"
    base = store.base(e["base"], device)
    flats = store.read_payload(e, what, device)
    table = flats.table
    value_dtype = e["params"]["value_dtype"]
    gaps = flats.get("indices")
    if gaps is not None:
        gaps = gaps.to(torch.int64)
    out: dict[str, torch.Tensor] = {}
    for t in table:
        want = dtypes.output_dtype(dtypes.torch_dtype(t["dtype"]), dtype)
        s, c = t["start"], t["count"]
        if t["kind"] == "sparse":
            b = base[t["name"]]
            if c == 0:
                out[t["name"]] = b.to(want, copy=True)
                continue
            flat = b.reshape(-1).to(torch.float32, copy=True)
            flat.index_add_(0, torch.cumsum(gaps[s:s + c], 0), _logical(flats["values"][s:s + c], value_dtype).float())
            out[t["name"]] = flat.view(t["shape"]).to(want)
        else:
            flat = _logical(flats[t["array"]][s:s + c], t["dtype"])
            out[t["name"]] = flat.view(t["shape"]).to(want, copy=True)
    return out


def _logical(flat: torch.Tensor, dtype_name: str) -> torch.Tensor:
    return flat.view(torch.bfloat16) if dtype_name == "bfloat16" else flat
