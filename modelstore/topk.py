"""Exact top-k by magnitude, streaming over tensors.

The k largest |u| of a whole model are found without holding the model or sorting
it: a two-level radix select over the IEEE-754 bit patterns of |u| (for
non-negative floats, bit order is value order). Level one counts the high 16
bits of every entry, level two the low 16 bits inside the one bucket where the
k-th value lies. The result is a `Cut`: keep every entry above a threshold plus
the first `ties` entries equal to it, in global order (lowest index wins), and
never an exact zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

_BINS = 1 << 16


def magnitude_bits(u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 bit patterns of |u| for a float32 tensor, flattened (ordered like the magnitudes: the
    sign bit of |u| is 0), into `out` (int32, u's size) when given. torch's bincount keeps private
    per-thread histograms, so counting the few distinct magnitudes of a real delta does not
    serialize on one bin as numpy's does."""
    u = u.detach().reshape(-1).to(torch.float32)
    if out is None:
        return u.abs().view(torch.int32)
    return torch.abs(u, out=out.view(torch.float32)).view(torch.int32)


def kept_count(keep: float, total: int) -> int:
    """k = round(keep * total), halves rounded up (spec: "Kept count")."""
    return int(math.floor(keep * total + 0.5))


@dataclass(frozen=True)
class Cut:
    """Keep entries with |u| bits > threshold, plus the first `ties` with bits == threshold."""

    threshold: int
    ties: int

    def keeper(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A stateful function mapping each tensor's |u| bits, in global order, to kept indices (int64)."""
        remaining = self.ties

        def keep(bits: torch.Tensor) -> torch.Tensor:
            nonlocal remaining
            above = bits > self.threshold
            if remaining > 0:
                tie = _nonzero(bits == self.threshold)[:remaining]
                remaining -= tie.numel()
                above[tie] = True
            return _nonzero(above)

        return keep


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices (int64) of the true entries of a 1-D bool tensor; numpy's kernel is 4-5x torch's on CPU."""
    return torch.from_numpy(np.flatnonzero(mask.numpy())) if mask.device.type == "cpu" \
        else torch.nonzero(mask).view(-1)


class _Window:
    """Per block of bit patterns: how many lie at or above `hi`, and `bits - lo` of those in
    [lo, hi). On CPU in numpy (its count is 7x torch's bool sum; one unsigned compare selects)
    into buffers reused from block to block: fresh temporaries per block fragment the C heap,
    which then holds on to several times a block's memory per pass."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self._diff = np.empty(0, np.uint32)
        self._mask = np.empty(0, np.bool_)

    def split(self, bits: torch.Tensor) -> tuple[int, torch.Tensor]:
        if bits.device.type != "cpu":
            return int((bits >= self.hi).sum()), bits[(bits >= self.lo) & (bits < self.hi)] - self.lo
        x = bits.numpy()
        if self._diff.size < x.size:
            self._diff, self._mask = np.empty(x.size, np.uint32), np.empty(x.size, np.bool_)
        d, m = self._diff[:x.size], self._mask[:x.size]
        np.greater_equal(x, self.hi, out=m)
        above = int(np.count_nonzero(m))
        np.subtract(x, np.int32(self.lo), out=d.view(np.int32))
        np.less(d, self.hi - self.lo, out=m)
        return above, torch.from_numpy(d[m].view(np.int32))


def find_cut(k: int, tensors: Callable[[], Iterable[torch.Tensor]],
             sample: Callable[[], Iterable[torch.Tensor]] | None = None, total: int = 0) -> Cut:
    """Exact cut for the k largest non-zero magnitudes over `tensors()` (|u| bits).

    Two counting passes over `tensors()`, or with `sample` (the bits of a spread part of the same
    entries, `total` being their full count) usually one: the sample brackets the k-th largest
    within a few high-bit buckets, and one pass counts the entries above them and every entry's
    low bits inside them. When the bracket misses, the two passes run as without a sample; the cut
    is exact either way. If fewer than k entries are non-zero, all non-zero entries are kept.
    """
    if k <= 0:
        return Cut(threshold=0x7FFFFFFF, ties=0)
    if sample is not None and total:
        window = _window(k, sample, total)
        if window is not None:
            cut = _cut_in_window(k, tensors, *window)
            if cut is not None:
                return cut
    high = _high_counts(tensors())
    from_top = high.flip(0).cumsum(0).flip(0)  # from_top[b] = count of entries with high bits >= b
    if int(from_top[0]) < k:  # fewer entries than k: keep every non-zero one
        return Cut(threshold=0, ties=0)
    b = int(torch.nonzero(from_top >= k).max())  # highest bin whose tail reaches k
    above = int(from_top[b + 1]) if b + 1 < _BINS else 0
    low = torch.zeros(_BINS, dtype=torch.int64)
    lo_bits = b << 16
    for bits in tensors():
        sel = bits[(bits >= lo_bits) & (bits < lo_bits + _BINS)]
        if sel.numel():
            low += torch.bincount(sel - lo_bits, minlength=_BINS)
    return _cut(k, above, low, lo_bits)


def _high_counts(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Entries per value of the high 16 bits, over every tensor of bit patterns."""
    high = torch.zeros(_BINS, dtype=torch.int64)
    for bits in tensors:
        high += torch.bincount(bits >> 16, minlength=_BINS)
    return high


def _cut(k: int, above: int, counts: torch.Tensor, lo_bits: int) -> Cut:
    """The cut from the count of entries above a range of bit patterns and a histogram of the
    entries inside it (bin i: pattern lo_bits + i), the k-th largest lying in the range."""
    from_top = counts.flip(0).cumsum(0).flip(0)
    lo = int(torch.nonzero(from_top >= k - above).max())
    strictly_above = above + (int(from_top[lo + 1]) if lo + 1 < counts.numel() else 0)
    threshold = lo_bits + lo
    if threshold == 0:  # the cut falls among exact zeros: keep only non-zeros
        return Cut(threshold=0, ties=0)
    return Cut(threshold=threshold, ties=k - strictly_above)


#: High-bit buckets a sample may bracket the k-th largest with (bins: WINDOW_BUCKETS × 65536).
WINDOW_BUCKETS = 32
_FLUSH = 1 << 22


def _window(k: int, sample: Callable[[], Iterable[torch.Tensor]], total: int) -> tuple[int, int] | None:
    """High-bit buckets [b_lo, b_hi] that hold the k-th largest of the whole, judged from a sample:
    the sample's ranks k·n/N ± (2% + 4σ + 64), or None when that spans too many buckets."""
    high = _high_counts(sample())
    n = int(high.sum())
    r = k * n / total
    spread = 0.02 * r + 4 * math.sqrt(r) + 64
    if not n or r + spread >= n:
        return None
    from_top = high.flip(0).cumsum(0).flip(0)
    b_hi = int(torch.nonzero(from_top >= max(1.0, r - spread)).max())
    b_lo = int(torch.nonzero(from_top >= r + spread).max())
    return (b_lo, b_hi) if b_hi - b_lo < WINDOW_BUCKETS else None


def _cut_in_window(k: int, tensors: Callable[[], Iterable[torch.Tensor]], b_lo: int, b_hi: int) -> Cut | None:
    """One pass: entries above bucket b_hi, and a histogram of every pattern in [b_lo, b_hi]; the
    cut if the k-th largest lies there, else None."""
    lo_bits, hi_bits = b_lo << 16, (b_hi + 1) << 16
    width = hi_bits - lo_bits
    counts = torch.zeros(width, dtype=torch.int64)
    above, pending, held = 0, [], 0
    window = _Window(lo_bits, hi_bits)
    for bits in tensors():
        over, sel = window.split(bits)
        above += over
        if sel.numel():
            pending.append(sel)
            held += sel.numel()
        if held >= _FLUSH:  # one large bincount rather than a window-sized one per block
            counts += torch.bincount(torch.cat(pending), minlength=width)
            pending, held = [], 0
    if pending:
        counts += torch.bincount(torch.cat(pending), minlength=width)
    if above >= k or above + int(counts.sum()) < k:
        return None
    cut = _cut(k, above, counts, lo_bits)
    return None if cut.threshold == 0 else cut
