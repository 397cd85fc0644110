"""Compress one fully fine-tuned task against a stored base (PERU-FFT / Post-Pruning).

u = θt − θ* is computed in float32 against the base *as stored*, the k = round(m·N)
largest |u| are kept (globally over all selected tensors, or per tensor), and the
kept entries are written as gap-encoded indices plus values. Tensors that cannot
be expressed as a sparse delta (other shape, not in the base, not selected, not
floating point) are written dense unless they equal the base.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import dtypes
from .errors import InputError
from .layout import FlatWriter, array_nbytes, close_all
from .progress import bar
from .selection import find_cut, kept_count, magnitude_bits
from .sources import TensorSource
from .store import StoredBase, table_digest
from .writer import StoreWriter

GRANULARITIES = ("global", "per-tensor")
#: Deltas of a task are kept in memory between the selection passes up to this size;
#: beyond it they are recomputed from the checkpoints on each pass (streaming).
CACHE_BYTES = int(os.environ.get("MODELSTORE_DELTA_CACHE_BYTES", 1 << 30))
_VALUE_LIMITS = {"float16": 65504.0, "bfloat16": 3.38e38, "float32": 3.4e38}


@dataclass(frozen=True)
class FFTOptions:
    keep: float = 0.1
    granularity: str = "global"
    value_dtype: str | None = None  # None: bfloat16 for bf16 tasks, float16 otherwise

    def validate(self) -> None:
        if not isinstance(self.keep, (int, float)) or not (0.0 < self.keep <= 1.0) or math.isnan(self.keep):
            raise InputError(f"--keep must be a fraction in (0, 1], got {self.keep!r} (0.1 keeps the top 10%)")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"--granularity must be one of {', '.join(GRANULARITIES)}, not {self.granularity!r}")
        if self.value_dtype is not None and self.value_dtype not in dtypes.VALUE_DTYPES:
            raise InputError(f"--value-dtype must be one of {', '.join(dtypes.VALUE_DTYPES)}, not {self.value_dtype!r}")


def plan(task: str, base: StoredBase, src: TensorSource, selected: Callable[[str], bool]) -> list[tuple[str, str]]:
    """(name, "sparse" | "dense") for every tensor of the task, base order first."""
    have = set(src.names())
    out = []
    for name in base.names():
        if name not in have:
            if selected(name):
                raise InputError(f"task {task!r} lacks tensor {name!r} that the base has; "
                                 "give a checkpoint of the same architecture, or --exclude that tensor")
            continue
        sparse = (selected(name) and src.shape(name) == base.shape(name)
                  and src.dtype(name).is_floating_point and base.dtype(name).is_floating_point)
        out.append((name, "sparse" if sparse else "dense"))
    reshaped = [n for n, kind in out if kind == "dense" and selected(n) and src.shape(n) != base.shape(n)]
    if reshaped and 2 * len(reshaped) > len(out):
        raise InputError(f"task {task!r}: {len(reshaped)} of {len(out)} tensors differ in shape from the base "
                         f"(e.g. {reshaped[0]!r}); is it a fine-tune of this pre-trained model?")
    known = set(base.names())
    out += [(n, "dense") for n in src.names() if n not in known]
    return out


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf. A float32 sum is finite for any finite tensor short of ~1e29 magnitudes,
    so the exact element-wise test runs only when the cheap reduction says "maybe"."""
    if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float32))) \
            and not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} has NaN or Inf values; fix the checkpoint before storing it")


class _Deltas:
    """u = θt − θ* per sparse tensor, as flat float32 numpy, cached while under a byte budget."""

    def __init__(self, task: str, src: TensorSource, base: StoredBase, names: list[str], budget: int):
        self.task, self.src, self.base, self.names = task, src, base, names
        self._cache: dict[str, np.ndarray] = {}
        self._cached, self._budget = 0, budget

    def get(self, name: str) -> np.ndarray:
        u = self._cache.get(name)
        if u is None:
            t = self.src.get(name)
            u = (t.to(torch.float32) - self.base.get(name).to(torch.float32)).reshape(-1).numpy()
            if self._cached + u.nbytes <= self._budget:
                self._cache[name] = u
                self._cached += u.nbytes
        return u

    def bits(self) -> Iterator[np.ndarray]:
        for n in self.names:
            yield magnitude_bits(self.get(n))


def write_task(w: StoreWriter, name: str, src: TensorSource, base_id: str, base: StoredBase,
               selected: Callable[[str], bool], opts: FFTOptions, *, source_info: dict[str, Any],
               full_bytes: int, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Compress task `name` against `base`, write it and commit it; return its manifest entry."""
    opts.validate()
    w.check_new_task(name, overwrite)
    steps = plan(name, base, src, selected)
    sparse = [n for n, kind in steps if kind == "sparse"]
    value_dtype = opts.value_dtype or (
        "bfloat16" if sparse and all(src.dtype(n) == torch.bfloat16 for n in sparse) else "float16")
    sizes = {n: math.prod(src.shape(n)) for n in sparse}
    total = sum(sizes.values())
    deltas = _Deltas(name, src, base, sparse, CACHE_BYTES if opts.granularity == "global" else 0)
    if opts.granularity == "global":
        k = kept_count(opts.keep, total)
        select = find_cut(k, deltas.bits).selector()
        capacity = k
    else:
        capacity = sum(kept_count(opts.keep, s) for s in sizes.values())
        select = None
    index_dtype = "uint32" if max(sizes.values(), default=0) <= 1 << 32 else "uint64"
    dense_cap: dict[str, int] = {}
    for n, kind in steps:
        if kind == "dense":
            d = dtypes.dtype_name(src.dtype(n))
            dense_cap[d] = dense_cap.get(d, 0) + math.prod(src.shape(n))

    rel, g = w.new_group(f"tasks/{name}")
    idx_w = FlatWriter(g, "indices", index_dtype, capacity, kind="indices")
    val_w = FlatWriter(g, "values", dtypes.storage_dtype(value_dtype), capacity)
    dense_w = {d: FlatWriter(g, f"dense.{d}", dtypes.storage_dtype(d), c) for d, c in dense_cap.items()}
    vt = dtypes.torch_dtype(value_dtype)
    table, kept, dense_count = [], 0, 0
    for n, kind in bar(steps, f"task {name}", progress):
        shape = list(src.shape(n))
        if kind == "sparse":
            u = deltas.get(n)
            bits = magnitude_bits(u)
            if select is None:
                idx = find_cut(kept_count(opts.keep, u.size), lambda: iter([bits])).selector()(bits)
            else:
                idx = select(bits)
            picked = u[idx]
            # NaN/Inf have the largest magnitude bits, so any would be among the kept entries
            if not picked.size:
                check_finite(torch.from_numpy(u), f"task {name!r} tensor {n!r}")
            elif not np.isfinite(picked).all():
                raise InputError(f"task {name!r} tensor {n!r} has NaN or Inf values; fix the checkpoint before storing it")
            elif float(np.abs(picked).max()) > _VALUE_LIMITS[value_dtype]:
                raise InputError(f"task {name!r} tensor {n!r}: a delta exceeds the {value_dtype} range; "
                                 "use --value-dtype float32")
            vals = torch.from_numpy(picked).to(vt)
            nz = (vals != 0).numpy()
            if not nz.all():  # values that round to zero would be stored zeros
                idx, vals = idx[nz], vals[torch.from_numpy(nz)]
            start = idx_w.append(np.diff(idx, prepend=0).astype(index_dtype))
            val_w.append(dtypes.to_numpy(vals))
            table.append({"name": n, "kind": "sparse", "shape": shape, "dtype": dtypes.dtype_name(src.dtype(n)),
                          "start": start, "count": int(idx.size)})
            kept += int(idx.size)
        else:
            t = src.get(n)
            check_finite(t, f"task {name!r} tensor {n!r}")
            d = dtypes.dtype_name(t.dtype)
            if n in base.names() and base.shape(n) == tuple(t.shape) and base.dtype(n) == t.dtype \
                    and torch.equal(base.get(n), t):
                table.append({"name": n, "kind": "sparse", "shape": shape, "dtype": d, "start": 0, "count": 0})
                continue
            start = dense_w[d].append(dtypes.to_numpy(t))
            table.append({"name": n, "kind": "dense", "array": f"dense.{d}", "shape": shape, "dtype": d,
                          "start": start, "count": t.numel()})
            dense_count += 1
    arrays = close_all([idx_w, val_w, *dense_w.values()])
    g.attrs["tensors"] = table
    merge = w.manifest["bases"][base_id].get("merge", {})
    entry = {
        "path": rel, "kind": "fft", "base": base_id,
        "method": "post-pruning" if merge.get("method", "none") == "none" else "peru-fft",
        "params": {"keep": opts.keep, "granularity": opts.granularity, "value_dtype": value_dtype,
                   "index_dtype": index_dtype, "merge": merge},
        "source": source_info, "kept": kept, "total": total, "tensors": len(table), "dense_tensors": dense_count,
        "bytes": array_nbytes(g), "full_bytes": full_bytes, "table_sha256": table_digest(table), "arrays": arrays,
    }
    w.commit_task(name, entry)
    return entry


__all__ = ["FFTOptions", "write_task", "plan"]
