"""What the 1-bit task kinds share (tall-mask, emr, bitdelta): per compressed tensor one packed bit
per entry in the flat array `bits.uint8`, computed from the task and the base(s) row block by row
block; every other tensor stored whole unless it equals the base (spec/FORMAT.md, section 10).

A subclass says which tensors get bits, how a block's bits follow from the task's and the bases'
float32 rows, and how a tensor is rebuilt from its bits and the base tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from modelstore._runtime.progress import bar
from modelstore._runtime.units import human_bytes, percent
from modelstore.errors import CorruptStoreError
from modelstore.format import dtypes
from modelstore.format.manifest import BaseEntry, TableEntry, TaskEntry
from modelstore.format.payload import PayloadWriter, Segments
from modelstore.inputs.sources import Checkpoint, TensorSource, read_rows, row_blocks
from modelstore.kinds.base import BaseTensors, TaskKind
from modelstore.kinds.fft.sparse_delta import (
    BLOCK_ELEMENTS,
    check_finite,
    fine_tune_input,
    store_whole_or_same,
)
from modelstore.kinds.masks.packing import BitPacker, unpack_bits

BITS = "bits.uint8"


def _bytes_of(shape: tuple[int, ...] | list[int]) -> int:
    return -(-math.prod(shape) // 8)


def base_name(t: TableEntry) -> str:
    """The name of the base tensor table entry `t` reads (a task saved under a head's prefix names it)."""
    return str(t.get("base") or t["name"])


class BitMaskKind(TaskKind):
    """Base class of the kinds that keep a task as bits over its base(s)."""

    kept_label = "bits set"
    original_label = "the full checkpoint"
    entry_kinds = ("dense", "sparse", "bits")

    def check_table(self, table: list[TableEntry], entry: TaskEntry) -> str | None:
        bad = next((t["name"] for t in table if t["kind"] == "sparse" and t["count"]
                    or t["kind"] == "bits" and t["array"] != BITS), None)
        return None if bad is None else f"entry {bad!r} is a sparse delta or lies outside {BITS}"

    # -- what a subclass says ---------------------------------------------------
    def sources(self, base: Any) -> list[TensorSource]:
        """The stored bases whose rows `bits` gets after the task's: the task's own base by default."""
        return [base]

    def masked(self, shape: tuple[int, ...]) -> bool:
        """Whether a selected tensor of this shape is kept as bits (else it is stored whole)."""
        return True

    def start(self, options: Any) -> dict[str, Any]:
        """The task's running state (sums the task's parameters need)."""
        return {}

    def bits(self, rows: list[torch.Tensor], options: Any, state: dict[str, Any]) -> torch.Tensor:
        """The bits of one row block: `rows` are flat float32 rows of the task, then of `sources`."""
        raise NotImplementedError

    def end_tensor(self, state: dict[str, Any]) -> dict[str, Any]:
        """Table fields of the tensor just written (its scale...)."""
        return {}

    def params(self, options: Any, state: dict[str, Any]) -> dict[str, Any]:
        """The task entry's `params`."""
        return {}

    def rebuild(self, bits: torch.Tensor, base: BaseTensors, t: TableEntry, params: dict[str, Any]) -> torch.Tensor:
        """Tensor `t` (flat, any float dtype) from its unpacked bits and the base tensors."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------
    def write(self, out: PayloadWriter, task: str, source: Checkpoint, base: TensorSource, base_entry: BaseEntry,
              options: Any, progress: bool) -> dict[str, Any]:
        full_bytes = source.nbytes()
        given = fine_tune_input(task, source, base, base_entry)  # as fft: names matched, buffers, heads
        src, entry = given.source, given.entry
        steps = [(n, "bits" if kind == "sparse" and self.masked(src.shape(n)) else kind) for n, kind in given.steps]
        bits_w = out.declare(BITS, "uint8", sum(_bytes_of(src.shape(n)) for n, kind in steps if kind == "bits"))
        out.declare_dense("dense", ((src.shape(n), src.dtype(n)) for n, kind in steps if kind not in ("bits", "base")))
        srcs, state = [src, *self.sources(base)], self.start(options)
        kept = total = stored_whole = 0
        for n, kind in bar(steps, f"task {task}", progress):
            if kind == "base":  # a buffer the task lacks: the base's
                out.add(entry(n, kind="sparse", shape=list(base.shape(n)), dtype=dtypes.dtype_name(base.dtype(n)),
                              start=0, count=0))
                continue
            if kind != "bits":
                stored_whole += store_whole_or_same(out, task, n, src, base, entry)
                continue
            shape, packer, start = src.shape(n), BitPacker(), bits_w.position
            for r0, r1 in row_blocks(shape, BLOCK_ELEMENTS):
                rows = [read_rows(s, n, r0, r1).to(torch.float32).reshape(-1) for s in srcs]
                check_finite(rows[0], f"task {task!r} tensor {n!r}")
                b = self.bits(rows, options, state)
                kept += int(b.sum())
                bits_w.append(packer.add(b))
            bits_w.append(packer.end())
            total += math.prod(shape)
            out.add(entry(n, kind="bits", shape=list(shape), dtype=dtypes.dtype_name(src.dtype(n)), array=BITS,
                          start=start, count=_bytes_of(shape), **self.end_tensor(state)))
        return {"method": self.name, "params": self.params(options, state), "kept": kept, "total": total,
                "dense_tensors": stored_whole, "full_bytes": full_bytes}

    def tensors(self, segments: Segments, table: list[TableEntry], base: BaseTensors, entry: TaskEntry,
                device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """Dense entries as stored, count-0 entries as the base's, bit entries rebuilt (`rebuild`)."""
        for t in table:
            want = dtypes.output_dtype(dtypes.torch_dtype(t["dtype"]), dtype)
            if t["kind"] == "dense":
                out = segments.get(t["array"], t["start"], t["count"], t["dtype"])
            elif t["kind"] == "sparse" and t["count"] == 0:
                out = base.fresh(base_name(t))
            elif t["kind"] == "bits":
                bits = unpack_bits(segments.get(t["array"], t["start"], t["count"], "uint8"), math.prod(t["shape"]))
                out = self.rebuild(bits, base, t, entry["params"])
            else:
                raise CorruptStoreError(f"task tensor {t['name']!r} has an entry of kind {t['kind']!r}, which "
                                        f"{self.name} tasks do not have; the store is damaged")
            yield t["name"], out.reshape(t["shape"]).to(want)

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        return {"bits": 1}

    def describe(self, info: Mapping[str, Any]) -> str:
        return (f"1 bit for each of {info['total']} entries ({info['kept']} set), {human_bytes(info['bytes'])} "
                f"({percent(info['ratio'])} of the full checkpoint)")


__all__ = ["BitMaskKind", "BITS"]
