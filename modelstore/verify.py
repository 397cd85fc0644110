"""Weight-space fidelity of a stored task against its original checkpoint."""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import InputError
from .sources import open_checkpoint
from .store import Store


def verify(store: Store, task: str, original: str) -> dict[str, Any]:
    """Relative Frobenius error ||θ̂ − θ|| / ||θ|| per tensor and overall, and the kept fraction.

    Tensors are compared in float32; the original is read one tensor at a time.
    """
    ck = open_checkpoint(original)
    got = store.load(task)
    # a buffer the original lacks (position_ids, by its transformers version) comes from the base
    missing = sorted(set(ck.names()) ^ {n for n, t in got.items() if t.is_floating_point() or n in ck.names()})
    if missing:
        raise InputError(f"task {task!r} and {original} hold different tensors (e.g. {missing[0]!r}); "
                         "is this the task's original checkpoint?")
    per, num, den = {}, 0.0, 0.0
    for n in ck.names():
        ref = ck.get(n).to(torch.float64)
        if tuple(ref.shape) != tuple(got[n].shape):
            raise InputError(f"tensor {n!r} has shape {tuple(ref.shape)} in {original} but {tuple(got[n].shape)} in the store")
        d2 = float((got[n].to(torch.float64) - ref).square().sum())
        r2 = float(ref.square().sum())
        per[n] = math.sqrt(d2 / r2) if r2 else (0.0 if d2 == 0 else math.inf)
        num, den = num + d2, den + r2
    e = store.entry(task)
    return {"task": task, "original": original, "rel_error": math.sqrt(num / den) if den else 0.0,
            "kept_fraction": e["kept"] / e["total"] if e.get("total") else None,
            "worst_tensor": max(per, key=per.get) if per else None, "tensors": per}
