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


def find_cut(k: int, tensors: Callable[[], Iterable[torch.Tensor]], window: Bracket | None = None) -> Cut:
    """Exact cut for the k largest non-zero magnitudes over `tensors()` (|u| bits).

    Two counting passes over `tensors()`, or with `window` (a sample's `bracket` of the k-th
    largest) usually one: it counts the entries above the bracket and every entry's pattern inside
    it. When the bracket misses, the two passes run as without one; the cut is exact either way.
    If fewer than k entries are non-zero, all non-zero entries are kept.
    """
    if k <= 0:
        return Cut(threshold=0x7FFFFFFF, ties=0)
    if window is not None:
        cut = _cut_in_window(k, tensors, window)
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


@dataclass(frozen=True)
class Bracket:
    """Bit patterns [lo, hi) that a sample says hold the k-th largest magnitude; `expected`: the
    entries at or above `lo` the whole should have, by the sample."""

    lo: int
    hi: int
    expected: int


def bracket(k: int, sample: Callable[[], Iterable[torch.Tensor]], total: int) -> Bracket | None:
    """High-bit buckets that hold the k-th largest of the whole, judged from a sample: the sample's
    ranks k·n/N ± (2% + 4σ + 64), or None when that spans too many buckets."""
    high = _high_counts(sample())
    n = int(high.sum())
    r = k * n / total
    spread = 0.02 * r + 4 * math.sqrt(r) + 64
    if not n or r + spread >= n:
        return None
    from_top = high.flip(0).cumsum(0).flip(0)
    b_hi = int(torch.nonzero(from_top >= max(1.0, r - spread)).max())
    b_lo = int(torch.nonzero(from_top >= r + spread).max())
    if b_hi - b_lo >= WINDOW_BUCKETS:
        return None
    return Bracket(b_lo << 16, (b_hi + 1) << 16, math.ceil(int(from_top[b_lo]) * total / n))


class WindowCounts:
    """Counts of a bracket's pass: entries at or above `hi`, and a histogram of the patterns in
    [lo, hi), fed block by block (`count`, or `add_picked` with the patterns of the entries at or
    above `lo` only); `cut` is exact when the k-th largest lies in the bracket. On CPU the steps run in numpy
    (its count is 7x torch's bool sum; one unsigned compare selects) into buffers reused from block
    to block: fresh temporaries per block fragment the C heap, which then holds on to several
    times a block's memory per pass."""

    def __init__(self, window: Bracket):
        self.lo, self.hi, self.width = window.lo, window.hi, window.hi - window.lo
        self.counts = torch.zeros(self.width, dtype=torch.int64)
        self.above, self._held = 0, 0
        self._pending: list[torch.Tensor] = []
        self._diff = np.empty(0, np.uint32)
        self._mask = np.empty(0, np.bool_)

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._mask.size < n:
            self._diff, self._mask = np.empty(n, np.uint32), np.empty(n, np.bool_)
        return self._diff[:n], self._mask[:n]

    def count(self, bits: torch.Tensor) -> None:
        """Count a block of patterns."""
        if bits.device.type != "cpu":
            self._add(int((bits >= self.hi).sum()), bits[(bits >= self.lo) & (bits < self.hi)] - self.lo)
            return
        x = bits.numpy()
        d, m = self._buffers(x.size)
        np.greater_equal(x, self.hi, out=m)
        above = int(np.count_nonzero(m))
        np.subtract(x, np.int32(self.lo), out=d.view(np.int32))
        np.less(d, self.width, out=m)
        self._add(above, torch.from_numpy(d[m].view(np.int32)))

    def add_picked(self, bits: torch.Tensor) -> None:
        """Count the patterns of a block's entries at or above `lo`, which the caller picked
        (a tensor of its own: it is changed in place)."""
        if bits.device.type != "cpu":
            self._add(0, bits.sub_(self.lo).clamp_(max=self.width))
            return
        x = bits.numpy()
        x -= np.int32(self.lo)
        np.minimum(x, self.width, out=x)  # bin `width` counts those at or above `hi`
        self._add(0, bits)

    def _add(self, above: int, inside: torch.Tensor) -> None:
        """`above` more entries at or above `hi`, and `inside`: patterns less `lo`, where `width`
        stands for one at or above `hi`."""
        self.above += above
        if inside.numel():
            self._pending.append(inside)
            self._held += inside.numel()
        if self._held >= _FLUSH:  # one large bincount rather than a window-sized one per block
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            counts = torch.bincount(torch.cat(self._pending), minlength=self.width + 1)
            self.counts += counts[:self.width]
            self.above += int(counts[self.width])
        self._pending, self._held = [], 0

    def floor(self, k: int) -> int:
        """The lowest pattern an entry still to be counted can need to be kept with, when the
        entries come in global order: one above the k-th largest counted so far (the k-th of the
        whole is no lower, and a later entry equal to it loses its tie to the earlier ones), `hi`
        when k lie at or above `hi`, `lo` while fewer than k were counted."""
        self._flush()
        if self.above >= k:
            return self.hi
        if self.above + int(self.counts.sum()) < k:
            return self.lo
        return _cut(k, self.above, self.counts, self.lo).threshold + 1

    def cut(self, k: int) -> Cut | None:
        """The exact cut when the k-th largest of what was counted lies in the bracket, else None."""
        self._flush()
        if self.above >= k or self.above + int(self.counts.sum()) < k:
            return None
        cut = _cut(k, self.above, self.counts, self.lo)
        return None if cut.threshold == 0 else cut


def _cut_in_window(k: int, tensors: Callable[[], Iterable[torch.Tensor]], window: Bracket) -> Cut | None:
    """One pass: entries above the bracket, and a histogram of every pattern in it; the cut if the
    k-th largest lies there, else None."""
    counts = WindowCounts(window)
    for bits in tensors():
        counts.count(bits)
    return counts.cut(k)
