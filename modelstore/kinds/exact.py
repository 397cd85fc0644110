"""Task kind `exact`: a fine-tune kept bit for bit, as an archive beside a lossy task of the same model.

Each tensor's bits, as integers of its size, are XORed with those of its base tensor (the matching
tensor of the merged θ* where the store keeps one, else of θ0) when the base has one of the same
shape and dtype, else kept as they are, and appended to the flat array `words.<int dtype>` of that
size, whose codec (codecs.py, "words") splits every 1 MiB block into byte planes and compresses
them (spec section 11). A fine-tune moves few sign and exponent bits, so the high planes are nearly
all zero and compress to little, while the low mantissa bits stay close to random: what is left is
about the entropy of the changed bits. A tensor equal to its base, bit for bit, is recorded as the
base's (a count-0 entry, as other kinds do) and costs a load no decoding. Any dtype is kept.

Measured (tools/bench_exact.py, real MiniLM-L6 fine-tunes; docs/performance.md): XOR with a
task-arithmetic θ* of two tasks (λ 0.3) gives 2% (float32) to 9% (bf16) fewer bytes than with θ0,
as θt lies nearer θ* than θ0 while few tasks are merged, so θ* is the default base, as for the
lossy kinds; byte planes per 1 MiB block (blosc's shuffle, undone in C on a load) are as small as
whole-tensor planes, and zstd 1 beats zstd 3, lz4 and bit shuffling (codecs.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any, cast

import torch

from modelstore._runtime.prefetch import read_ahead
from modelstore._runtime.progress import bar
from modelstore._runtime.threads import one_torch_thread
from modelstore._runtime.units import human_bytes, percent
from modelstore.errors import CorruptStoreError
from modelstore.format import dtypes
from modelstore.format.manifest import BaseEntry, TableEntry, TaskEntry
from modelstore.format.payload import PayloadWriter, Segments
from modelstore.inputs.sources import (
    Checkpoint,
    TensorSource,
    match_task_names,
    read_rows,
    row_blocks,
)
from modelstore.kinds.base import BaseTensors, TaskKind
from modelstore.kinds.fft.sparse_delta import BLOCK_ELEMENTS

#: The integer dtype a tensor's bits are XORed and stored in, by bytes per element.
WORD_DTYPES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def words_array(itemsize: int) -> str:
    """The flat array of the words of `itemsize`-byte tensors."""
    return f"words.{WORD_DTYPES[itemsize]}"


def words(t: torch.Tensor) -> torch.Tensor:
    """The bits of `t` as flat integers of its size (a view where `t` is contiguous)."""
    return t.contiguous().view(dtypes.torch_dtype(WORD_DTYPES[t.element_size()])).reshape(-1)


def same_bits(a: TensorSource, an: str, b: TensorSource, bn: str) -> bool:
    """Whether tensor `an` of `a` and `bn` of `b` (same shape and dtype) hold the same bits, read
    row block by row block (NaN payloads and -0.0 count: floats are compared as integers)."""
    return all(torch.equal(words(read_rows(a, an, r0, r1)), words(read_rows(b, bn, r0, r1)))
               for r0, r1 in row_blocks(a.shape(an), BLOCK_ELEMENTS))


class Exact(TaskKind):
    """Per tensor: its bits XOR the base tensor's bits (or its own bits), as integer words."""

    name = "exact"
    title = "an exact task"
    kept_label = "entries XORed with the base"
    original_label = "the full checkpoint"
    entry_kinds = ("words", "sparse")
    lossless = True

    def base_id(self, bases: Collection[str], requested: str | None) -> str:
        """The merged base if the store has one (fewer bytes, see the module docstring), else θ0."""
        return requested or ("merged" if "merged" in bases else "pretrained")

    def check_entry(self, entry: TaskEntry) -> str | None:
        return None if entry.get("bases", [entry.get("base")]) == [entry.get("base")] else \
            "an exact task reads its own base only"

    def write(self, out: PayloadWriter, task: str, source: Checkpoint, base: TensorSource, base_entry: BaseEntry,
              options: None, progress: bool) -> dict[str, Any]:
        with one_torch_thread():
            return self._write(out, task, source, base, progress)

    def _write(self, out: PayloadWriter, task: str, source: Checkpoint, base: TensorSource,
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
        writers = {k: out.declare(words_array(k), WORD_DTYPES[k], size, kind="words") for k, size in sizes.items()}
        same = 0
        for n in bar(steps, f"task {task}", progress):
            shape, dt, b = source.shape(n), source.dtype(n), against.get(n)
            # the task's name, and its base tensor's where that differs
            named = {"name": n, "shape": list(shape), "dtype": dtypes.dtype_name(dt),
                     **({"base": b} if b is not None and b != n else {})}
            if b is not None and same_bits(source, n, base, b):
                out.add(cast(TableEntry, {**named, "kind": "sparse", "start": 0, "count": 0}))
                same += 1
                continue
            w = writers[dt.itemsize]
            start = w.position
            for r0, r1 in row_blocks(shape, BLOCK_ELEMENTS):
                x = words(read_rows(source, n, r0, r1))
                w.append((x if b is None else x ^ words(read_rows(base, b, r0, r1))).numpy())
            out.add(cast(TableEntry, {**named, "kind": "words", "array": w.name, "start": start,
                                      "count": math.prod(shape), "xor": b is not None}))
        return {"method": "exact", "params": {}, "kept": sum(math.prod(source.shape(n)) for n in against),
                "total": sum(math.prod(source.shape(n)) for n in steps), "dense_tensors": len(steps) - len(against),
                "same_tensors": same, "full_bytes": source.nbytes()}

    def tensors(self, segments: Segments, table: list[TableEntry], base: BaseTensors, entry: TaskEntry,
                device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor's words XORed with its base tensor into a new tensor where the entry says
        so; count-0 entries a copy of the base tensor.

        The words' chunks are decoded ahead in the decoding threads from the start (while the
        first tensors are copies of the base), so the XOR of one tensor overlaps the decoding of
        the next. Where most words lie in tensors longer than a chunk, a worker thread also reads
        the next tensor meanwhile (a read of whole chunks waits for all of them); where tensors are
        smaller, handing each one across threads costs more than it saves (a MiniLM's load takes
        0.8 x the time without the worker, a model of 4096 x 4096 tensors 1.2 x: docs/performance.md).
        Torch does the XOR and copies in this thread alone: its idle OpenMP threads spin between
        the many short ops, taking a core from the decoding (1.5 x the CPU time).
        """
        entries = [t for t in table if t["kind"] == "words"]
        for array in dict.fromkeys(t["array"] for t in entries):
            segments.ahead(array)
        items = self._words(segments, table)
        spanning = sum(t["count"] for t in entries if t["count"] >= segments.reader.chunk_len(t["array"]))
        for t, w in read_ahead(items) if 2 * spanning > sum(t["count"] for t in entries) else items:
            with one_torch_thread():
                out = self._tensor(t, w, base, dtype)
            yield t["name"], out

    @staticmethod
    def _tensor(t: TableEntry, w: torch.Tensor | None, base: BaseTensors, dtype: torch.dtype | None) -> torch.Tensor:
        """Entry `t`'s tensor from its words `w` (None: the base's tensor, copied)."""
        dt = dtypes.torch_dtype(t["dtype"])
        if w is None or t.get("xor"):
            name = str(t.get("base") or t["name"])
            b = base.fresh(name) if w is None else base.view(name)
            if b.dtype != dt or list(b.shape) != t["shape"]:
                raise CorruptStoreError(f"task tensor {t['name']!r} does not match its base tensor's dtype "
                                        "or shape; the store is damaged")
            out = b if w is None else torch.bitwise_xor(words(b), w).view(dt).view(b.shape)
        else:
            out = w.view(dt).view(t["shape"])
        return out.to(dtypes.output_dtype(dt, dtype))

    def _words(self, segments: Segments, table: list[TableEntry]) -> Iterator[tuple[TableEntry, torch.Tensor | None]]:
        """(entry, its words on the segments' device, or None for the base's tensor), in order, checked."""
        for t in table:
            if t["kind"] == "sparse" and t["count"] == 0:
                yield t, None
                continue
            k = dtypes.torch_dtype(t["dtype"]).itemsize
            if t["kind"] != "words" or t["array"] != words_array(k) or not isinstance(t.get("xor"), bool):
                raise CorruptStoreError(f"task tensor {t['name']!r} has an entry of kind {t['kind']!r} in array "
                                        f"{t.get('array')!r}, which exact tasks do not have; the store is damaged")
            # XORed words are read into a new tensor and dropped: a view of their chunk does
            yield t, segments.get(t["array"], t["start"], t["count"], WORD_DTYPES[k], borrow=bool(t.get("xor")))

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        return {"bits": "exact"}

    def describe(self, info: Mapping[str, Any]) -> str:
        return (f"{info['total']} entries bit for bit ({info['kept']} XORed with the base), "
                f"{human_bytes(info['bytes'])} ({percent(info['ratio'])} of the full checkpoint)")


__all__ = ["WORD_DTYPES", "Exact", "same_bits", "words", "words_array"]
