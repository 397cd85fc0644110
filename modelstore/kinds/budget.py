"""Budget mode of fft tasks: choose keep m and the value precision from the task's own deltas.

One pass over u = θt − θ* counts, per bucket of the high 16 bits of |u| (the radix select's first
level), the entries and their energy Σu², and keeps a spread sample of deltas. For every candidate
m that gives, without storing anything:

- the weight-space error of dropping all but the top-m: the energy below the k-th magnitude
  (interpolated inside its bucket), and of rounding the kept values: float16/bfloat16 by their
  unit roundoff, int8/int4 by quantizing the sample's kept values with the task's group size;
- the bytes: gap-coded indices at their entropy bound H(p)/p bits per kept entry (the stored gaps
  measure 1.03-1.07 × it, taken as 1.07 ×), plus value bits (16, 8 + 16/G, 4 + 16/G), plus the
  tensors stored whole.

The choice is the (m, value dtype) of least predicted relative error ||θ̂t − θt|| / ||θt|| within
`budget` bits per parameter, or the fewest bits meeting `max_rel_error`; it and its prediction are
recorded in the task's params.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..sources import TensorSource, read_rows, row_blocks
from ..topk import kept_count, magnitude_bits
from .values import QUANT_MAX, dequantize, quantize

#: Candidate keep fractions: 40 steps, log-spaced from 0.1% to 100%.
KEEPS = tuple(float(f"{x:.4g}") for x in np.geomspace(0.001, 1.0, 40))
#: Measured cost of gap-coded indices against their entropy bound (issue 13's measurement).
INDEX_OVERHEAD = 1.07
#: Squared relative rounding error of a value stored in each float dtype (unit roundoff² / 3).
_FLOAT_ERROR = {"float32": 2.0 ** -48 / 3, "float16": 2.0 ** -22 / 3, "bfloat16": 2.0 ** -16 / 3}
_VALUE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "int4": 4}
#: Deltas kept for estimating quantization error (every SAMPLE_EVERY-th block, up to this many).
SAMPLE_LIMIT = 1 << 22
SAMPLE_EVERY = 8
_BINS = 1 << 16


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
    sample: torch.Tensor  # spread deltas, in stored order
    total: int  # N: entries of the sparsified tensors

    @classmethod
    def measure(cls, blocks: Iterable[torch.Tensor], total: int) -> DeltaProfile:
        counts = torch.zeros(_BINS, dtype=torch.int64)
        energy = torch.zeros(_BINS, dtype=torch.float64)
        sample, have = [], 0
        for i, u in enumerate(blocks):
            hi = magnitude_bits(u) >> 16
            counts += torch.bincount(hi, minlength=_BINS)
            energy += torch.bincount(hi, weights=u.to(torch.float64).square(), minlength=_BINS)
            if i % SAMPLE_EVERY == 0 and have < SAMPLE_LIMIT:
                take = u[:SAMPLE_LIMIT - have].clone()
                sample.append(take)
                have += take.numel()
        return cls(counts, energy, torch.cat(sample) if sample else torch.empty(0), total)

    def dropped_energy(self, k: int) -> tuple[float, float]:
        """(energy of the entries below the k largest, the threshold |u|) by the bucket counts."""
        from_top = self.counts.flip(0).cumsum(0).flip(0)
        e_from_top = self.energy.flip(0).cumsum(0).flip(0)
        if k <= 0:
            return float(e_from_top[0]), math.inf
        if int(from_top[0]) <= k:
            return 0.0, 0.0
        b = int(torch.nonzero(from_top >= k).max())
        above = int(from_top[b + 1]) if b + 1 < _BINS else 0
        e_above = float(e_from_top[b + 1]) if b + 1 < _BINS else 0.0
        n_b = int(self.counts[b])
        kept_in_b = (k - above) / n_b if n_b else 0.0
        e_kept = e_above + kept_in_b * float(self.energy[b])
        threshold = float(torch.tensor([b << 16], dtype=torch.int32).view(torch.float32))
        return float(e_from_top[0]) - e_kept, threshold

    def quant_error_ratio(self, threshold: float, value_dtype: str, group_size: int) -> float:
        """Σ(v − Q(v))² / Σv² of the sample's values at or above `threshold`, quantized as stored."""
        if value_dtype not in QUANT_MAX:
            return _FLOAT_ERROR[value_dtype]
        v = self.sample[self.sample.abs() >= threshold].to(torch.float32)
        if not v.numel():
            return 0.0
        q, scales = quantize(v, QUANT_MAX[value_dtype], group_size)
        err = float((dequantize(q, scales, group_size).to(torch.float64) - v.to(torch.float64)).square().sum())
        return err / max(float(v.to(torch.float64).square().sum()), 1e-300)


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
        dropped, threshold = profile.dropped_energy(k)
        kept_energy = float(profile.energy.sum()) - dropped
        p = k / profile.total if profile.total else 0.0
        for vd in value_dtypes:
            vbits = _VALUE_BITS[vd] + (16 / group_size if vd in QUANT_MAX else 0)
            bits = (k * (_index_bits(p) + vbits) + dense_bits) / params
            err2 = dropped + profile.quant_error_ratio(threshold, vd, group_size) * kept_energy
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
