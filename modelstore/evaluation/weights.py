"""Weight-space fidelity of a stored task against its original: a checkpoint, or a LoRA adapter."""

from __future__ import annotations

import math
from typing import Any

import torch

from modelstore.errors import InputError
from modelstore.inputs.sources import Checkpoint, TensorSource, open_checkpoint
from modelstore.kinds import AdapterInput
from modelstore.kinds.lora import LoraAdapter
from modelstore.store import Store


def verify(store: Store, task: str, original: str | None = None, lora: str | None = None) -> dict[str, Any]:
    """Relative Frobenius error ||θ̂ − θ|| / ||θ|| per tensor and overall, and the kept fraction.

    The original is a full checkpoint (`original`: a fine-tune, or a LoRA task merged into its
    base) or a LoRA task's PEFT adapter directory (`lora`: compared as θ0 + s·B·A from the store's
    θ0). Tensors are compared in float64, one at a time.

    Raises:
        InputError: neither or both originals given, or they hold other tensors than the task.
    """
    ref: Checkpoint | _Overlay
    if original is not None and lora is None:
        ref, what = open_checkpoint(original), original
    elif lora is not None and original is None:
        ref, what = _adapter_weights(store, task, lora), lora
    else:
        raise InputError("give the task's original as a checkpoint (--original) or as a LoRA adapter (--lora), "
                         "one of them")
    have = set(ref.names())
    per, num, den, seen = {}, 0.0, 0.0, set()
    for n, got in store.tensors(task):
        if n not in have:
            if got.is_floating_point():
                raise InputError(f"task {task!r} has tensor {n!r} that {what} lacks; is this the task's original?")
            continue  # a buffer the original lacks (position_ids) comes from the base
        seen.add(n)
        r = ref.get(n).to(torch.float64)
        if tuple(r.shape) != tuple(got.shape):
            raise InputError(f"tensor {n!r} has shape {tuple(r.shape)} in {what} but {tuple(got.shape)} in the store")
        d2 = float((got.to(torch.float64) - r).square().sum())
        r2 = float(r.square().sum())
        per[n] = math.sqrt(d2 / r2) if r2 else (0.0 if d2 == 0 else math.inf)
        num, den = num + d2, den + r2
    if have - seen:
        raise InputError(f"{what} has tensor {sorted(have - seen)[0]!r} that task {task!r} lacks; "
                         "is this the task's original?")
    e = store.entry(task)
    return {"task": task, "original": what, "rel_error": math.sqrt(num / den) if den else 0.0,
            "kept_fraction": e["kept"] / e["total"] if e.get("total") else None,
            "worst_tensor": max(per, key=per.__getitem__) if per else None, "tensors": per}


def task_adapter(store: Store, task: str, path: str) -> tuple[LoraAdapter, TensorSource]:
    """The PEFT adapter at `path`, its targets named as the tensors of `task`'s base (θ0), and
    that base, read tensor by tensor.

    Raises:
        LoraError: the adapter is not plain LoRA or does not fit the base.
    """
    base_id = store.entry(task)["base"]
    base = store._stored_base(base_id)
    return AdapterInput.read(path).resolved(base, store.manifest["bases"][base_id].get("config_json")), base


def _adapter_weights(store: Store, task: str, path: str) -> _Overlay:
    """The full weights a PEFT adapter makes of the store's θ0 (the task's base): θ0 + s·B·A per
    adapted weight (transposed for fan_in_fan_out and embedding layouts), saved tensors replacing
    theirs. Only the adapted weights are held; the rest is read from θ0 when asked for."""
    adapter, base = task_adapter(store, task, path)
    merged: dict[str, torch.Tensor] = {}
    for m in adapter.modules.values():
        merged[m.target] = base.get(m.target).to(torch.float64) + m.update()
    merged.update({s.target: s.tensor for s in adapter.saved.values()})
    return _Overlay(base, merged)


class _Overlay:
    """Named tensors: `tensors` where given, else `under`'s (what verify reads of a reference)."""

    def __init__(self, under: TensorSource, tensors: dict[str, torch.Tensor]):
        self.under, self.tensors = under, tensors

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.under.names(), *self.tensors]))

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name] if name in self.tensors else self.under.get(name)


__all__ = ["verify"]
