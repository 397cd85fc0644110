"""Task kind `fft`: a fully fine-tuned task as a sparse delta against a base (PERU-FFT / Post-Pruning).

u = θt − θ* is computed in float32 against the base *as stored*, the k = round(m·N)
largest |u| are kept (globally over all selected tensors, or per tensor), and the
kept entries are written as gap-encoded indices plus values. Tensors that cannot
be expressed as a sparse delta (other shape, not in the base, not selected, not
floating point) are written dense unless they equal the base.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import dtypes
from ..errors import CorruptStoreError, InputError
from ..format.manifest import BaseEntry, TableEntry, TaskEntry
from ..format.payload import PayloadWriter, Segments
from ..progress import bar
from ..selection import recorded_selector
from ..sources import Checkpoint, TensorSource
from ..topk import find_cut, kept_count, magnitude_bits
from ..units import human_bytes, percent
from .base import BaseTensors, Edit, Replace, TaskKind

GRANULARITIES = ("global", "per-tensor")
INDEX_DTYPES = ("uint32", "uint64")
#: Deltas of a task are kept in memory between the top-k passes up to this size;
#: beyond it they are recomputed from the checkpoints on each pass (streaming).
CACHE_BYTES = int(os.environ.get("MODELSTORE_DELTA_CACHE_BYTES", 256 << 20))
#: Entries of u = θt − θ* computed at once: large tensors (an LLM's embedding) are split by rows.
BLOCK_ELEMENTS = 1 << 24
_VALUE_LIMITS = {"float16": 65504.0, "bfloat16": 3.38e38, "float32": 3.4e38}


@dataclass(frozen=True)
class FFTOptions:
    """How a fully fine-tuned task is sparsified: keep fraction m, top-k granularity, value dtype."""

    keep: float = 0.1
    granularity: str = "global"
    value_dtype: str | None = None  # None: bfloat16 for bf16 tasks, float16 otherwise

    def validate(self) -> None:
        """Raise InputError naming the first bad option."""
        if not isinstance(self.keep, (int, float)) or not (0.0 < self.keep <= 1.0) or math.isnan(self.keep):
            raise InputError(f"--keep must be a fraction in (0, 1], got {self.keep!r} (0.1 keeps the top 10%)")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"--granularity must be one of {', '.join(GRANULARITIES)}, not {self.granularity!r}")
        if self.value_dtype is not None and self.value_dtype not in dtypes.VALUE_DTYPES:
            raise InputError(f"--value-dtype must be one of {', '.join(dtypes.VALUE_DTYPES)}, not {self.value_dtype!r}")


def plan(task: str, base: TensorSource, src: TensorSource, selected: Callable[[str], bool]) -> list[tuple[str, str]]:
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


def _row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges of a tensor, each about BLOCK_ELEMENTS entries (whole rows; at least one)."""
    if not shape:
        return [(0, 1)]
    row = math.prod(shape[1:])
    per = max(1, BLOCK_ELEMENTS // max(row, 1))
    return [(r, min(shape[0], r + per)) for r in range(0, shape[0], per)] or [(0, 0)]


def _rows(src: TensorSource, name: str, start: int, stop: int) -> torch.Tensor:
    return src.get(name).reshape(1) if not src.shape(name) else src.rows(name, start, stop)


class _Deltas:
    """u = θt − θ* per sparse tensor, flat float32, in blocks of about BLOCK_ELEMENTS entries, so memory
    is bounded by a block whatever the tensor's size; tensors of one block are cached between the
    passes while under a byte budget (else recomputed from the checkpoints on each pass)."""

    def __init__(self, src: TensorSource, base: TensorSource, names: list[str], budget: int):
        self.src, self.base, self.names = src, base, names
        self._cache: dict[str, torch.Tensor] = {}
        self._cached, self._budget = 0, budget

    def blocks(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(flat offset, u of the block) for each block of tensor `name`, in order."""
        if name in self._cache:
            yield 0, self._cache[name]
            return
        shape = self.src.shape(name)
        row = math.prod(shape[1:]) if shape else 1
        spans = _row_blocks(shape)
        for r0, r1 in spans:
            u = _rows(self.src, name, r0, r1).to(torch.float32, copy=True).reshape(-1)
            u.sub_(_rows(self.base, name, r0, r1).reshape(-1))
            if len(spans) == 1 and self._cached + u.numel() * 4 <= self._budget:
                self._cache[name] = u
                self._cached += u.numel() * 4
            yield r0 * row, u

    def bits(self, names: list[str] | None = None) -> Iterator[torch.Tensor]:
        for n in self.names if names is None else names:
            for _, u in self.blocks(n):
                yield magnitude_bits(u)


@dataclass(frozen=True)
class AddAt(Edit):
    """Kept entries of a sparse delta: float32(B[p]) + float32(v) at the positions p."""

    delta: torch.Tensor

    def new(self, base: torch.Tensor | None) -> torch.Tensor:
        assert base is not None
        return base.to(torch.float32) + self.delta


class SparseDelta(TaskKind):
    """PERU-FFT (on a merged base) or Post-Pruning (on θ0): top-m% of θt − θ* as a sparse delta."""

    name = "fft"
    title = "a full fine-tune"
    kept_label = "entries kept"
    original_label = "the full checkpoint"

    def base_id(self, bases: Mapping[str, BaseEntry], requested: str | None) -> str:
        """The merged base if the store has one, else θ0; `requested` picks one explicitly."""
        return requested or ("merged" if "merged" in bases else "pretrained")

    def check_entry(self, entry: TaskEntry) -> str | None:
        p = entry["params"]
        if p.get("value_dtype") not in dtypes.VALUE_DTYPES or p.get("index_dtype") not in INDEX_DTYPES:
            return f"value dtype {p.get('value_dtype')!r} or index dtype {p.get('index_dtype')!r} is not one of the format's"
        return None

    def array_dtypes(self, entry: TaskEntry) -> dict[str, str]:
        return {"indices": entry["params"]["index_dtype"], "values": entry["params"]["value_dtype"]}

    def write(self, out: PayloadWriter, task: str, source: Checkpoint, base: TensorSource, base_entry: BaseEntry,
              options: FFTOptions, progress: bool) -> dict[str, Any]:
        opts = options
        opts.validate()
        selected = recorded_selector(base_entry.get("selection"))
        steps = plan(task, base, source, selected)
        sparse = [n for n, kind in steps if kind == "sparse"]
        value_dtype = opts.value_dtype or (
            "bfloat16" if sparse and all(source.dtype(n) == torch.bfloat16 for n in sparse) else "float16")
        sizes = {n: math.prod(source.shape(n)) for n in sparse}
        total = sum(sizes.values())
        deltas = _Deltas(source, base, sparse, CACHE_BYTES)
        if opts.granularity == "global":
            k = kept_count(opts.keep, total)
            keeper = find_cut(k, deltas.bits).keeper()
            capacity = k
        else:
            capacity = sum(kept_count(opts.keep, s) for s in sizes.values())
            keeper = None
        if total and not capacity:
            raise InputError(f"--keep {opts.keep} keeps no entry of task {task!r} ({total} delta entries"
                             f"{' per tensor' if opts.granularity == 'per-tensor' else ''}); raise --keep")
        index_dtype = "uint32" if max(sizes.values(), default=0) <= 1 << 32 else "uint64"
        idx_w = out.declare("indices", index_dtype, capacity, kind="indices")
        val_w = out.declare("values", value_dtype, capacity)
        out.declare_dense("dense", ((source.shape(n), source.dtype(n)) for n, kind in steps if kind == "dense"))
        vt = dtypes.torch_dtype(value_dtype)
        base_names = set(base.names())
        kept, dense_count = 0, 0
        for n, kind in bar(steps, f"task {task}", progress):
            shape = list(source.shape(n))
            if kind == "sparse":
                tensor_keeper = keeper or find_cut(kept_count(opts.keep, sizes[n]),
                                                   lambda n=n: deltas.bits([n])).keeper()
                start = idx_w.position
                count, last = 0, 0
                for offset, u in deltas.blocks(n):
                    idx = tensor_keeper(magnitude_bits(u))
                    picked = u[idx]
                    # NaN/Inf have the largest magnitude bits, so any would be among the kept entries
                    if not picked.numel():
                        check_finite(u, f"task {task!r} tensor {n!r}")
                        continue
                    if not bool(torch.isfinite(picked).all()):
                        raise InputError(f"task {task!r} tensor {n!r} has NaN or Inf values; "
                                         "fix the checkpoint before storing it")
                    if float(picked.abs().max()) > _VALUE_LIMITS[value_dtype]:
                        raise InputError(f"task {task!r} tensor {n!r}: a delta exceeds the {value_dtype} range; "
                                         "use --value-dtype float32")
                    vals = picked.to(vt)
                    nz = vals != 0
                    if not bool(nz.all()):  # values that round to zero would be stored zeros
                        idx, vals = idx[nz], vals[nz]
                    if not idx.numel():
                        continue
                    pos = idx + offset
                    idx_w.append(torch.diff(pos, prepend=pos.new_tensor([last])).numpy().astype(index_dtype))
                    val_w.append(dtypes.to_numpy(vals))
                    last, count = int(pos[-1]), count + int(idx.numel())
                out.add({"name": n, "kind": "sparse", "shape": shape, "dtype": dtypes.dtype_name(source.dtype(n)),
                         "start": start, "count": count})
                kept += count
                continue
            t = source.get(n)
            check_finite(t, f"task {task!r} tensor {n!r}")
            if n in base_names and base.shape(n) == tuple(t.shape) and base.dtype(n) == t.dtype \
                    and torch.equal(base.get(n), t):
                out.add({"name": n, "kind": "sparse", "shape": shape, "dtype": dtypes.dtype_name(t.dtype),
                         "start": 0, "count": 0})
                continue
            out.add_dense(n, t, "dense")
            dense_count += 1
        merge = base_entry.get("merge", {})
        return {
            "method": "post-pruning" if merge.get("method", "none") == "none" else "peru-fft",
            "params": {"keep": opts.keep, "granularity": opts.granularity, "value_dtype": value_dtype,
                       "index_dtype": index_dtype, "merge": merge},
            "kept": kept, "total": total, "dense_tensors": dense_count, "full_bytes": source.nbytes(),
        }

    def edits(self, segments: Segments, table: list[TableEntry], entry: TaskEntry,
              device: torch.device) -> Iterator[Edit]:
        """Per sparse tensor its positions cumsum(gaps) and values; dense tensors whole (spec: "Reading a task")."""
        p = entry["params"]
        for t in table:
            name, shape, dtype = t["name"], tuple(t["shape"]), dtypes.torch_dtype(t["dtype"])
            s, c = t["start"], t["count"]
            if t["kind"] != "sparse":
                yield Replace(name, shape, dtype, None, segments.get(t["array"], s, c, t["dtype"]).view(shape))
                continue
            pos = torch.cumsum(segments.get("indices", s, c, p["index_dtype"]).to(torch.int64), 0)
            if c and int(pos[-1]) >= math.prod(shape):  # gaps are unsigned, so the last position is the largest
                raise CorruptStoreError(f"task tensor {name!r}: a stored index lies outside the tensor; "
                                        "the store is damaged")
            yield AddAt(name, shape, dtype, pos, segments.get("values", s, c, p["value_dtype"]))

    def tensors(self, segments: Segments, table: list[TableEntry], base: BaseTensors, entry: TaskEntry,
                device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """Base + values at the kept positions, on `device`.

        Only the k kept entries are computed in float32 (float32(B[p]) + float32(v), rounded to the
        output dtype); every other entry is the base's own, which is what the float32 round trip
        of the whole tensor gives too, so the result is bit-identical at a fraction of the work.
        """
        for e in self.edits(segments, table, entry, device):
            yield e.name, e.applied(base.fresh(e.name) if e.uses_base else None, dtype)

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        return {"keep": entry["params"].get("keep")}

    def describe(self, info: Mapping[str, Any]) -> str:
        return (f"{info['kept']} of {info['total']} entries kept, {human_bytes(info['bytes'])} "
                f"({percent(info['ratio'])} of the full checkpoint)")


__all__ = ["SparseDelta", "FFTOptions", "GRANULARITIES", "plan", "check_finite"]
