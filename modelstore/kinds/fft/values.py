"""How the kept values of a sparse delta are stored: as floats, or quantized to int8 / int4 with one
float16 scale per group of `group_size` consecutive values of a tensor (spec/FORMAT.md, section 5).

Writers hand over (position, value) pairs tensor by tensor; a `ValueWriter` gap-codes the positions,
encodes the values and returns each tensor's table fields. Quantized values are kept for a whole
tensor before they are written, because dropping a value that quantizes to 0 (it would only waste an
index) regroups the values after it. A writer of seeded positions (a reader re-draws them) stores no
positions and drops no value: every drawn position must keep its value.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from modelstore.errors import CorruptStoreError, InputError
from modelstore.format import dtypes
from modelstore.format.manifest import TableEntry
from modelstore.format.payload import FlatWriter, PayloadWriter, Segments
from modelstore.kinds.masks.packing import pack_nibbles, unpack_nibbles

#: Quantized value dtypes and their largest |q| (int4 is symmetric: -7..7).
QUANT_MAX = {"int8": 127, "int4": 7}
#: Every value dtype a sparse delta may have.
VALUE_DTYPES = (*dtypes.VALUE_DTYPES, *QUANT_MAX)
#: The largest |value| each value dtype holds (a quantized group's scale is a float16).
VALUE_LIMITS = {"float16": 65504.0, "bfloat16": 3.38e38, "float32": 3.4e38,
                **{d: 65504.0 * q for d, q in QUANT_MAX.items()}}
MAX_GROUP_SIZE = 1 << 20
#: Rounds of "quantize, drop the zeros, regroup" before the zeros left are stored as they are.
_MAX_ROUNDS = 64


def storage_dtype(value_dtype: str) -> str:
    """Logical dtype of the `values` array: int4 values are packed two per uint8."""
    return "uint8" if value_dtype == "int4" else value_dtype


def quantize(v: torch.Tensor, qmax: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of float32 values `v`: per group of `group_size` consecutive values,
    scale = float16(absmax / qmax) and q = clamp(round_half_even(v / scale), -qmax, qmax), both
    divisions in float64; q = 0 where the scale is 0 (an all-zero group, or one below float16's range)."""
    n = v.numel()
    groups = -(-n // group_size)
    padded = v.new_zeros(groups * group_size)
    padded[:n] = v.abs()
    absmax = padded.view(groups, group_size).amax(1).to(torch.float64)
    scales = (absmax / qmax).to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise InputError(f"a delta value exceeds the int{8 if qmax == 127 else 4} range (its float16 scale "
                         "overflows); use --value-dtype float32")
    s = scales.to(torch.float64).repeat_interleave(group_size)[:n]
    q = torch.where(s > 0, torch.round(v.to(torch.float64) / s.clamp(min=1e-300)), 0.0)
    return q.clamp_(-qmax, qmax).to(torch.int8), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32(q) · float32(scale of its group): what a reader adds to the base."""
    s = scales.to(torch.float32).repeat_interleave(group_size)[:q.numel()]
    return q.to(torch.float32) * s


class ValueWriter:
    """Gap-coded indices plus float values of one task, one tensor at a time (`add` ... `end`);
    values only when `seeded` (no `indices` array)."""

    def __init__(self, out: PayloadWriter, value_dtype: str, index_dtype: str, capacity: int, tensors: int,
                 group_size: int, seeded: bool = False):
        self.value_dtype, self.index_dtype, self.group_size, self.seeded = value_dtype, index_dtype, group_size, seeded
        self.indices = None if seeded else out.declare("indices", index_dtype, capacity, kind="indices")
        self.values = self._declare(out, capacity, tensors)
        self._start, self._count, self._last = 0, 0, 0

    @property
    def position(self) -> int:
        """Where the next tensor's slice starts: in `indices` (shared by float values), or `values` when seeded."""
        return self.values.position if self.indices is None else self.indices.position

    def _declare(self, out: PayloadWriter, capacity: int, tensors: int) -> FlatWriter:
        return out.declare("values", self.value_dtype, capacity)

    def begin(self) -> None:
        """Start a tensor."""
        self._start, self._count, self._last = self.position, 0, 0

    def _positions(self, pos: torch.Tensor) -> None:
        """Append gap-coded positions of the current tensor (running on from its last one); count them only
        when seeded."""
        if self.indices is None:
            self._count += pos.numel()
        elif pos.numel():
            p = pos.numpy()
            gaps = np.empty(p.size, self.index_dtype)  # subtracted straight into the index dtype
            gaps[0] = p[0] - self._last
            np.subtract(p[1:], p[:-1], out=gaps[1:], casting="unsafe")
            self.indices.append(gaps)
            self._last, self._count = int(p[-1]), self._count + p.size

    def add(self, pos: torch.Tensor, v: torch.Tensor) -> None:
        """Kept positions (int32 or int64, increasing, after the tensor's earlier ones) and float32 values;
        values that round to zero in the value dtype are dropped (they would be stored zeros) unless seeded."""
        vals = v.to(dtypes.torch_dtype(self.value_dtype))
        nz = vals != 0
        if not self.seeded and not bool(nz.all()):
            pos, vals = pos[nz], vals[nz]
        self._positions(pos)
        if vals.numel():
            self.values.append(dtypes.to_numpy(vals))

    def end(self) -> TableEntry:
        """The tensor's table fields: its slice of `indices` and `values`."""
        return {"start": self._start, "count": self._count}


class QuantWriter(ValueWriter):
    """int8 / int4 values with float16 scales per group of `group_size` values of a tensor."""

    def _declare(self, out: PayloadWriter, capacity: int, tensors: int) -> FlatWriter:
        self.qmax = QUANT_MAX[self.value_dtype]
        self.scales = out.declare("scales", "float16", capacity // self.group_size + tensors)
        return out.declare("values", storage_dtype(self.value_dtype),
                           capacity // 2 + tensors if self.value_dtype == "int4" else capacity)

    def begin(self) -> None:
        super().begin()
        self._pos: list[torch.Tensor] = []
        self._vals: list[torch.Tensor] = []

    def add(self, pos: torch.Tensor, v: torch.Tensor) -> None:
        if self.seeded:  # counted, not kept: nothing is dropped, and a reader re-draws them
            self._positions(pos)
        else:
            self._pos.append(pos)
        self._vals.append(v.to(torch.float32))

    def end(self) -> TableEntry:
        """Quantize the tensor's values; drop those that quantize to 0 and regroup, until none does (unless seeded)."""
        pos = torch.cat(self._pos) if self._pos else torch.zeros(0, dtype=torch.int64)
        v = torch.cat(self._vals) if self._vals else torch.zeros(0)
        if not self.seeded:
            nz = v != 0
            pos, v = pos[nz], v[nz]
        q, scales = quantize(v, self.qmax, self.group_size)
        for _ in range(0 if self.seeded else _MAX_ROUNDS):
            nz = q != 0
            if bool(nz.all()):
                break
            pos, v = pos[nz], v[nz]
            q, scales = quantize(v, self.qmax, self.group_size)
        self._positions(pos)
        if self.value_dtype == "int4":
            vstart = self.values.append(pack_nibbles(q))
            values = [vstart, (q.numel() + 1) // 2]
        else:
            values = [self.values.append(q.numpy()), q.numel()]
        sstart = self.scales.append(dtypes.to_numpy(scales))
        return {"start": self._start, "count": self._count,
                "segments": {"values": values, "scales": [sstart, scales.numel()]}}


def value_writer(out: PayloadWriter, value_dtype: str, index_dtype: str, capacity: int, tensors: int,
                 group_size: int, seeded: bool = False) -> ValueWriter:
    """The writer of a task's indices (none when `seeded`) and values in `value_dtype`."""
    cls = QuantWriter if value_dtype in QUANT_MAX else ValueWriter
    return cls(out, value_dtype, index_dtype, capacity, tensors, group_size, seeded)


def read_values(segments: Segments, t: TableEntry, params: dict) -> torch.Tensor:
    """The values of sparse entry `t`, on the segments' device (spec section 5): float values in
    their stored dtype (exact in float32, where they are added), quantized ones decoded to float32."""
    vd, s, c = params["value_dtype"], t["start"], t["count"]
    if vd not in QUANT_MAX:
        return segments.get("values", s, c, vd)
    seg = t.get("segments", {})
    (vs, vc), (ss, sc) = seg.get("values", (None, None)), seg.get("scales", (None, None))
    group = params["group_size"]
    want = (c + 1) // 2 if vd == "int4" else c
    if vc != want or sc != math.ceil(c / group):
        raise CorruptStoreError(f"task tensor {t['name']!r}: its quantized values or scales do not match its "
                                "count; the store is damaged")
    raw = segments.get("values", vs, vc, storage_dtype(vd))
    q = unpack_nibbles(raw, c) if vd == "int4" else raw
    return dequantize(q, segments.get("scales", ss, sc, "float16"), group)


__all__ = ["QUANT_MAX", "VALUE_DTYPES", "VALUE_LIMITS", "MAX_GROUP_SIZE", "storage_dtype", "quantize",
           "dequantize", "ValueWriter", "QuantWriter", "value_writer", "read_values"]
