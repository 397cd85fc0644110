"""Merge methods that make the shared base θ* of a store (see registry.py for the list)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modelstore.errors import InputError
from modelstore.inputs.sources import DictSource
from modelstore.merging.base import MergeMethod
from modelstore.merging.registry import METHODS, get_method, method_class, method_names

__all__ = ["MergeMethod", "METHODS", "get_method", "method_class", "method_names", "merge", "mergeable"]


def mergeable(shape0: tuple[int, ...], dtype0: torch.dtype, task_shapes: Sequence[tuple[int, ...] | None]) -> bool:
    """A tensor is merged when it is floating point and every task has it with θ0's shape."""
    return dtype0.is_floating_point and all(s == shape0 for s in task_shapes)


def merge(method: str, pretrained: Mapping[str, torch.Tensor], tasks: Sequence[Mapping[str, torch.Tensor]],
          **options: Any) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts into θ*, returned in θ0's dtypes.

    >>> theta = modelstore.merge("task-arithmetic", sd0, [sd1, sd2], lam=0.3)
    >>> theta = modelstore.merge("ties", sd0, [sd1, sd2], density=0.2, lam=1.0)
    >>> theta = modelstore.merge("regmean", sd0, [sd1, sd2], grams=[g1, g2])  # from modelstore.merging.statistics.gram

    Tensors that are not floating point, or that some task lacks or has in another
    shape, are returned as θ0's. Methods and options: docs/merging.md.

    Args:
        method: a registered merge method (`modelstore.merging.method_names()`).
        pretrained: θ0's state dict.
        tasks: the fine-tuned state dicts, one per task.
        **options: the method's declared options by keyword (`lam`, `density`...), and its
            statistics (`fishers=` / `grams=`) for the data-dependent methods.

    Returns:
        θ* as a new state dict (θ0's own tensors where nothing was merged).

    Raises:
        InputError: unknown method or option, a bad value, or statistics that do not fit.
    """
    if not tasks:
        raise InputError("merge needs at least one task model")
    m = get_method(method, **options)
    src0, srcs = DictSource(pretrained), [DictSource(t) for t in tasks]
    names = [n for n in src0.names()
             if mergeable(src0.shape(n), src0.dtype(n), [s.shape(n) if n in t else None for s, t in zip(srcs, tasks)])]
    m.prepare(src0, srcs, names)
    out = dict(pretrained)
    for n in names:
        merged = m.merge(n, src0.get(n).detach().float(), [s.get(n).detach().float() for s in srcs])
        out[n] = merged.to(pretrained[n].dtype)
    return out
