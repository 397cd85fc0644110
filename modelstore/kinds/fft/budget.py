"""Budget mode of fft tasks: choose keep m and the value precision from the task's own deltas.

One pass over u = θt − θ* counts, per bucket of the high 16 bits of |u| (the radix select's first
level), the entries and their energy Σu², and keeps a sample: the first entries of every block.
For every candidate m that gives, without storing anything:

- the weight-space error of dropping all but the top-m: the energy below the k-th magnitude
  (interpolated inside its bucket), and of rounding the kept values: float16/bfloat16 by their
  unit roundoff, int8/int4 by quantizing the sample's kept values with the task's group size;
- the bytes: per kept entry, the sample's kept entries written as the task writes them (gap-coded
  indices, values and scales, each compressed with its array's codec, quantized zeros dropped),
  plus the tensors stored whole. Raw bits (the entropy bound H(p)/p of random gaps × 1.07 plus
  16, 8 + 16/G or 4 + 16/G value bits) missed real MiniLM tasks by -11% to +19%; they remain the
  model where the sample keeps too few entries to measure.

The choice is the (m, value dtype) of least predicted relative error ||θ̂t − θt|| / ||θt|| within
`budget` bits per parameter, or the fewest bits meeting `max_rel_error`; it and its prediction are
recorded in the task's params.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numcodecs
import numpy as np
import torch
from zarr.codecs import BloscCodec

from modelstore.errors import InputError
from modelstore.format import dtypes
from modelstore.format.codecs import CHUNK_ELEMENTS, compressors
from modelstore.inputs.sources import TensorSource, read_rows, row_blocks
from modelstore.kinds.fft.topk import kept_count, magnitude_bits
from modelstore.kinds.fft.values import QUANT_MAX, dequantize, quantize
from modelstore.kinds.masks.packing import pack_nibbles

#: Candidate keep fractions: 40 steps, log-spaced from 0.1% to 100%.
KEEPS = tuple(float(f"{x:.4g}") for x in np.geomspace(0.001, 1.0, 40))
#: Measured cost of gap-coded indices against their entropy bound (issue 13's measurement).
INDEX_OVERHEAD = 1.07
#: Squared relative rounding error of a value stored in each float dtype (unit roundoff² / 3).
_FLOAT_ERROR = {"float32": 2.0 ** -48 / 3, "float16": 2.0 ** -22 / 3, "bfloat16": 2.0 ** -16 / 3}
_VALUE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "int4": 4}
#: Deltas kept for estimating quantization error and bytes: the same share of every block, its
#: first entries (stored order: the positions' local structure), up to this many in all.
SAMPLE_LIMIT = 1 << 22
#: Kept sample entries below which their compressed size is not measured (the byte model is used).
MIN_MEASURED = 4096
#: Sample entries whose top-m is written to measure its bytes (more where p is small), in runs of
#: PIECE consecutive entries: the positions' local structure is what their compression sees.
BYTES_SAMPLE = 1 << 18
PIECE = 1 << 12
_BINS = 1 << 16
_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


@dataclass(frozen=True)
class Choice:
    """A setting and what it is predicted to cost and lose."""

    keep: float
    value_dtype: str
    bits_per_param: float
    rel_error: float


@dataclass
class DeltaProfile:
    """What one pass over a task's deltas tells about every keep fraction."""

    counts: torch.Tensor  # entries per high-16-bit bucket of |u|
    energy: torch.Tensor  # Σu² per bucket (float64)
    sample: torch.Tensor  # the first entries of every block, in stored order
    total: int  # N: entries of the sparsified tensors
    _kept_cache: dict[tuple[float, int, float], torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def measure(cls, blocks: Iterable[torch.Tensor], total: int) -> DeltaProfile:
        counts = torch.zeros(_BINS, dtype=torch.int64)
        energy = torch.zeros(_BINS, dtype=torch.float64)
        sample, have = [], 0
        share = min(1.0, SAMPLE_LIMIT / total) if total else 1.0
        for u in blocks:
            hi = magnitude_bits(u) >> 16
            counts += torch.bincount(hi, minlength=_BINS)
            energy += torch.bincount(hi, weights=u.to(torch.float64).square(), minlength=_BINS)
            if have < SAMPLE_LIMIT:
                take = u.reshape(-1)[:min(math.ceil(share * u.numel()), SAMPLE_LIMIT - have)].clone()
                sample.append(take)
                have += take.numel()
        return cls(counts, energy, torch.cat(sample) if sample else torch.empty(0), total)

    def dropped_energy(self, k: int) -> tuple[float, float, int, float]:
        """(energy of the entries below the k largest, the threshold |u|, the bucket b of the k-th
        largest, the fraction of b's entries among the k largest) by the bucket counts."""
        from_top = self.counts.flip(0).cumsum(0).flip(0)
        e_from_top = self.energy.flip(0).cumsum(0).flip(0)
        if k <= 0:
            return float(e_from_top[0]), math.inf, _BINS, 0.0
        if int(from_top[0]) <= k:
            return 0.0, 0.0, -1, 1.0
        b = int(torch.nonzero(from_top >= k).max())
        above = int(from_top[b + 1]) if b + 1 < _BINS else 0
        e_above = float(e_from_top[b + 1]) if b + 1 < _BINS else 0.0
        n_b = int(self.counts[b])
        kept_in_b = (k - above) / n_b if n_b else 0.0
        e_kept = e_above + kept_in_b * float(self.energy[b])
        threshold = float(torch.tensor([b << 16], dtype=torch.int32).view(torch.float32))
        return float(e_from_top[0]) - e_kept, threshold, b, kept_in_b

    def _runs(self, p: float) -> torch.Tensor:
        """Runs of PIECE sample entries spread over the sample: enough for MIN_MEASURED entries at
        density `p` and at least BYTES_SAMPLE (the whole sample, if fewer)."""
        pieces = self.sample[:self.sample.numel() // PIECE * PIECE].view(-1, PIECE)
        want = max(BYTES_SAMPLE, math.ceil(MIN_MEASURED / p)) // PIECE if p > 0 else 1
        return pieces[::max(1, pieces.shape[0] // max(1, want))].reshape(-1)

    def _kept(self, p: float, bucket: int, fraction: float) -> torch.Tensor | None:
        """Positions in _runs(p) of the entries the global top-m keeps: nonzero, above `bucket` or
        among the top `fraction` of it; None when fewer than MIN_MEASURED."""
        key = (p, bucket, fraction)
        if key not in self._kept_cache:
            sub = self._runs(p)
            hi = magnitude_bits(sub) >> 16
            keep = hi > bucket
            in_b = torch.nonzero(hi == bucket).reshape(-1)
            take = round(fraction * in_b.numel())
            if take:
                keep[in_b[torch.topk(sub[in_b].abs(), take, sorted=False).indices]] = True
            pos = torch.nonzero(keep & (sub != 0)).reshape(-1)
            self._kept_cache[key] = pos if pos.numel() >= MIN_MEASURED else None
        return self._kept_cache[key]

    def stored_bits(self, p: float, bucket: int, fraction: float, value_dtype: str, group_size: int) -> float | None:
        """Bits per kept entry (see _kept) written as a task writes its top-m: gap-coded indices and
        values; int8/int4 values with their scales, after dropping those that quantize to 0 (the
        writer's first round); None when too few are kept to measure."""
        pos = self._kept(p, bucket, fraction)
        if pos is None:
            return None
        v = self._runs(p)[pos]
        if value_dtype in QUANT_MAX:
            q, scales = quantize(v.to(torch.float32), QUANT_MAX[value_dtype], group_size)
            nz = q != 0
            pos, (q, scales) = pos[nz], quantize(v[nz].to(torch.float32), QUANT_MAX[value_dtype], group_size)
            values = pack_nibbles(q) if value_dtype == "int4" else q.numpy()
            size = written_bytes("values", values) + written_bytes("values", scales.numpy())
        else:
            size = written_bytes("values", dtypes.to_numpy(v.to(dtypes.torch_dtype(value_dtype))))
        gaps = np.diff(pos.numpy(), prepend=0).astype(np.uint32)
        return 8 * (written_bytes("indices", gaps) + size) / v.numel()

    def quant_error_ratio(self, p: float, threshold: float, value_dtype: str, group_size: int) -> float:
        """Σ(v − Q(v))² / Σv² of the values at or above `threshold` of _runs(p), quantized as stored."""
        if value_dtype not in QUANT_MAX:
            return _FLOAT_ERROR[value_dtype]
        sub = self._runs(p)
        v = sub[sub.abs() >= threshold].to(torch.float32)
        if not v.numel():
            return 0.0
        q, scales = quantize(v, QUANT_MAX[value_dtype], group_size)
        err = float((dequantize(q, scales, group_size).to(torch.float64) - v.to(torch.float64)).square().sum())
        return err / max(float(v.to(torch.float64).square().sum()), 1e-300)


def written_bytes(kind: str, a: np.ndarray) -> int:
    """Bytes of flat array `a` written as an array of `kind`: per chunk of CHUNK_ELEMENTS, compressed
    by the chain codecs.compressors gives (blosc, then a 4-byte crc32c); a last partial chunk's zero
    padding (some 100 bytes) is left out."""
    blosc = compressors(kind, a.itemsize)[0]
    assert isinstance(blosc, BloscCodec)  # every kind but "raw" is compressed by blosc first
    codec = numcodecs.Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=_SHUFFLE[blosc.shuffle.value],
                            blocksize=blosc.blocksize, typesize=a.itemsize)
    return sum(len(codec.encode(a[i:i + CHUNK_ELEMENTS])) + 4 for i in range(0, a.size, CHUNK_ELEMENTS))


def _index_bits(p: float) -> float:
    """Entropy bound of gap-coded positions, in bits per kept entry, at density p."""
    if p >= 1.0:
        return 0.0
    h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return INDEX_OVERHEAD * h / p


def candidates(profile: DeltaProfile, reference_energy: float, params: int, dense_bits: float,
               value_dtypes: Iterable[str], group_size: int) -> list[Choice]:
    """Every (keep, value dtype) with its predicted bits per parameter and relative error."""
    out = []
    for m in KEEPS:
        k = kept_count(m, profile.total)
        dropped, threshold, bucket, fraction = profile.dropped_energy(k)
        stored = min(k, profile.total - int(profile.counts[0]))  # exact zeros are never stored
        kept_energy = float(profile.energy.sum()) - dropped
        p = k / profile.total if profile.total else 0.0
        for vd in value_dtypes:
            per_entry = profile.stored_bits(p, bucket, fraction, vd, group_size)
            if per_entry is None:
                per_entry = _index_bits(p) + _VALUE_BITS[vd] + (16 / group_size if vd in QUANT_MAX else 0)
            bits = (stored * per_entry + dense_bits) / params
            err2 = dropped + profile.quant_error_ratio(p, threshold, vd, group_size) * kept_energy
            out.append(Choice(m, vd, bits, math.sqrt(err2 / reference_energy) if reference_energy else 0.0))
    return out


def choose(options: list[Choice], budget: float | None, max_rel_error: float | None) -> Choice:
    """The least error within `budget` bits per parameter, or the fewest bits within `max_rel_error`.

    Raises:
        InputError: no candidate meets the budget or the error bound.
    """
    if budget is not None:
        fit = [c for c in options if c.bits_per_param <= budget]
        if not fit:
            least = min(c.bits_per_param for c in options)
            raise InputError(f"--budget {budget} bits per parameter is below the least this task can cost "
                             f"({least:.3g}); raise it")
        return min(fit, key=lambda c: (c.rel_error, c.bits_per_param))
    assert max_rel_error is not None
    fit = [c for c in options if c.rel_error <= max_rel_error]
    if not fit:
        best = min(c.rel_error for c in options)
        raise InputError(f"--max-rel-error {max_rel_error} cannot be met (the least predicted is {best:.3g}); raise it")
    return min(fit, key=lambda c: (c.bits_per_param, c.rel_error))


def energy_of(src: TensorSource, block: int) -> float:
    """Σθ² over every tensor of `src` (the denominator of the relative error), read in row blocks."""
    total = 0.0
    for n in src.names():
        for r0, r1 in row_blocks(src.shape(n), block):
            total += float(read_rows(src, n, r0, r1).to(torch.float64).square().sum())
    return total


__all__ = ["Choice", "DeltaProfile", "KEEPS", "candidates", "choose", "energy_of"]
