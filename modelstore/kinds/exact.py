"""Task kind `exact`: a fine-tune kept bit for bit, as an archive beside a lossy task of the same model.

Each tensor's bits are XORed with those of its base tensor (the matching tensor of θ0, or of the
merged θ* where the store keeps only that) when the base has one of the same shape and dtype, else
kept as they are; the words are split into byte planes (most significant byte first) and each plane
goes to the flat array of that plane (`planes<k>_<i>.uint8` for k-byte dtypes), compressed (spec
section 11). A fine-tune moves few sign and exponent bits, so the high planes are nearly all zero
and compress to little, while the low mantissa planes stay close to random: what is left is about
the entropy of the changed bits. Any dtype is kept; a load gives back the checkpoint's bits.

Why these choices (tools/bench_exact.py, MiniLM-L6 fine-tuned 150 steps on `rt`, one core):
XOR against θ0 gives fewer bytes than against a task-arithmetic θ*, as θ* moved every entry the
merged tasks touched; split planes and `planes` codecs.py measurements are in codecs.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..ahead import read_ahead
from ..errors import CorruptStoreError
from ..format.manifest import BaseEntry, TableEntry, TaskEntry
from ..format.payload import PayloadReader, PayloadWriter, Segments
from ..progress import bar
from ..sources import Checkpoint, match_task_names, read_rows, row_blocks
from ..threads import one_torch_thread
from ..units import human_bytes, percent
from .base import BaseTensors, TaskKind
from .sparse_delta import BLOCK_ELEMENTS

#: The integer dtype a tensor's bits are XORed in, by bytes per element.
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def plane_array(itemsize: int, plane: int) -> str:
    """The flat array holding byte plane `plane` (0: the most significant byte) of `itemsize`-byte tensors."""
    return f"planes{itemsize}_{plane}.uint8"


def _words(t: torch.Tensor) -> torch.Tensor:
    """The bits of `t` as integers of its size (a view where `t` is contiguous)."""
    return t.contiguous().view(_WORDS[t.element_size()])


def split_planes(words: torch.Tensor) -> list[np.ndarray]:
    """Byte planes of CPU integer `words`, the most significant byte's first (strided views)."""
    k = words.element_size()
    raw = words.reshape(-1).view(torch.uint8).numpy().reshape(-1, k)
    little = raw.dtype.byteorder in "<|=" and np.little_endian
    return [raw[:, k - 1 - i] if little else raw[:, i] for i in range(k)]


def join_planes(planes: list[torch.Tensor]) -> torch.Tensor:
    """Words of len(planes) bytes from their byte planes (most significant first), on their device."""
    k = len(planes)
    out = torch.empty((planes[0].numel(), k), dtype=torch.uint8, device=planes[0].device)
    for i, p in enumerate(planes):
        out[:, k - 1 - i if np.little_endian else i] = p
    return out.view(_WORDS[k]).reshape(-1)


class Exact(TaskKind):
    """Per tensor: its bits XOR the base tensor's bits (or its own bits), in byte planes."""

    name = "exact"
    title = "an exact task"
    kept_label = "entries XORed with the base"
    original_label = "the full checkpoint"

    def base_id(self, bases: Mapping[str, BaseEntry], requested: str | None) -> str:
        """θ0 if the store has it (fewer bytes, see the module docstring), else the merged base."""
        return requested or ("pretrained" if "pretrained" in bases or "merged" not in bases else "merged")

    def check_entry(self, entry: TaskEntry) -> str | None:
        return None if entry.get("bases", [entry.get("base")]) == [entry.get("base")] else \
            "an exact task reads its own base only"

    def write(self, out: PayloadWriter, task: str, source: Checkpoint, base: PayloadReader, base_entry: BaseEntry,
              options: None, progress: bool) -> dict[str, Any]:
        with one_torch_thread():
            return self._write(out, task, source, base, progress)

    def _write(self, out: PayloadWriter, task: str, source: Checkpoint, base: PayloadReader,
               progress: bool) -> dict[str, Any]:
        order = {n: i for i, n in enumerate(base.names())}
        matched = match_task_names(source, list(order), f"task {task!r}")
        against = {n: b for n, b in matched.items()
                   if base.shape(b) == source.shape(n) and base.dtype(b) == source.dtype(n)}
        # XORed tensors in base order (a load streams the base front to back), then the task's own
        steps = sorted(against, key=lambda n: order[against[n]]) + [n for n in source.names() if n not in against]
        sizes: dict[int, int] = {}
        for n in steps:
            k = source.dtype(n).itemsize
            sizes[k] = sizes.get(k, 0) + math.prod(source.shape(n))
        writers = {k: [out.declare(plane_array(k, i), "uint8", size, kind="planes") for i in range(k)]
                   for k, size in sizes.items()}
        xored = total = 0
        for n in bar(steps, f"task {task}", progress):
            shape, dt, b = source.shape(n), source.dtype(n), against.get(n)
            planes = writers[dt.itemsize]
            starts = [w.position for w in planes]
            for r0, r1 in row_blocks(shape, BLOCK_ELEMENTS):
                words = _words(read_rows(source, n, r0, r1))
                if b is not None:
                    words = words ^ _words(read_rows(base, b, r0, r1))
                for w, p in zip(planes, split_planes(words)):
                    w.append(p)
            count = math.prod(shape)
            total += count
            xored += count if b is not None else 0
            out.add({"name": n, "kind": "planes", "shape": list(shape), "dtype": dtypes.dtype_name(dt),
                     "array": planes[0].name, "start": starts[0], "count": count,
                     "segments": {w.name: [s, count] for w, s in zip(planes[1:], starts[1:])},
                     "xor": b is not None, **({"base": b} if b is not None and b != n else {})})
        return {"method": "exact", "params": {}, "kept": xored, "total": total,
                "dense_tensors": len(steps) - len(against), "full_bytes": source.nbytes()}

    def tensors(self, segments: Segments, table: list[TableEntry], base: BaseTensors, entry: TaskEntry,
                device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """Planes joined into words, XORed with the base tensor's where the entry says so; decoding
        the next tensor's planes (a worker thread) overlaps joining this one."""
        for t, words in read_ahead(self._words(segments, table)):
            dt = dtypes.torch_dtype(t["dtype"])
            if t.get("xor"):
                b = base.fresh(t.get("base") or t["name"])
                if b.dtype != dt or b.numel() != words.numel():
                    raise CorruptStoreError(f"task tensor {t['name']!r} does not match its base tensor's dtype "
                                            "or size; the store is damaged")
                words ^= _words(b).reshape(-1)
            yield t["name"], words.view(dt).reshape(t["shape"]).to(dtypes.output_dtype(dt, dtype))

    def _words(self, segments: Segments, table: list[TableEntry]) -> Iterator[tuple[TableEntry, torch.Tensor]]:
        """(entry, its words on the segments' device) of each table entry, in order, checked."""
        for t in table:
            if t["kind"] != "planes" or t["dtype"] not in dtypes.LOGICAL_DTYPES:
                raise CorruptStoreError(f"task tensor {t['name']!r} has an entry of kind {t['kind']!r}, which "
                                        "exact tasks do not have; the store is damaged")
            k, count = dtypes.torch_dtype(t["dtype"]).itemsize, t["count"]
            slices = [(t["array"], t["start"]), *((a, s) for a, (s, _) in t.get("segments", {}).items())]
            want = [plane_array(k, i) for i in range(k)]
            if [a for a, _ in slices] != want or any(c != count for _, c in t.get("segments", {}).values()):
                raise CorruptStoreError(f"task tensor {t['name']!r}: its byte planes do not match its dtype; "
                                        "the store is damaged")
            if not count:
                yield t, torch.empty(0, dtype=_WORDS[k], device=segments.device)
                continue
            yield t, join_planes([segments.get(a, s, count, "uint8") for a, s in slices])

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        return {"bits": "exact"}

    def describe(self, info: Mapping[str, Any]) -> str:
        return (f"{info['total']} entries bit for bit ({info['kept']} XORed with the base), "
                f"{human_bytes(info['bytes'])} ({percent(info['ratio'])} of the full checkpoint)")


__all__ = ["Exact", "plane_array", "split_planes", "join_planes"]
