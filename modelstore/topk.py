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

_BINS = 1 << 16


def magnitude_bits(u: np.ndarray) -> np.ndarray:
    """uint32 bit patterns of |u| for a float32 array (ordered like the magnitudes)."""
    return np.abs(np.asarray(u, dtype=np.float32).reshape(-1)).view(np.uint32)


def kept_count(keep: float, total: int) -> int:
    """k = round(keep * total), halves rounded up (spec: "Kept count")."""
    return int(math.floor(keep * total + 0.5))


@dataclass(frozen=True)
class Cut:
    """Keep entries with |u| bits > threshold, plus the first `ties` with bits == threshold."""

    threshold: int
    ties: int

    def keeper(self) -> Callable[[np.ndarray], np.ndarray]:
        """A stateful function mapping each tensor's |u| bits, in global order, to kept indices."""
        remaining = self.ties

        def keep(bits: np.ndarray) -> np.ndarray:
            nonlocal remaining
            idx = np.flatnonzero(bits > self.threshold)
            if remaining > 0:
                tie = np.flatnonzero(bits == self.threshold)[:remaining]
                remaining -= tie.size
                if tie.size:
                    idx = np.sort(np.concatenate([idx, tie]))
            return idx

        return keep


def find_cut(k: int, tensors: Callable[[], Iterable[np.ndarray]]) -> Cut:
    """Exact cut for the k largest non-zero magnitudes over `tensors()` (|u| bits, called twice).

    If fewer than k entries are non-zero, all non-zero entries are kept.
    """
    if k <= 0:
        return Cut(threshold=0xFFFFFFFF, ties=0)
    high = np.zeros(_BINS, dtype=np.int64)
    for bits in tensors():
        high += np.bincount(bits >> 16, minlength=_BINS)
    from_top = np.cumsum(high[::-1])[::-1]  # from_top[b] = count of entries with high bits >= b
    if from_top[0] < k:  # fewer entries than k: keep every non-zero one
        return Cut(threshold=0, ties=0)
    b = int(np.flatnonzero(from_top >= k)[-1])  # highest bin whose tail reaches k
    above = int(from_top[b + 1]) if b + 1 < _BINS else 0
    low = np.zeros(_BINS, dtype=np.int64)
    for bits in tensors():
        sel = bits[(bits >> 16) == b]
        if sel.size:
            low += np.bincount(sel & 0xFFFF, minlength=_BINS)
    need = k - above
    low_from_top = np.cumsum(low[::-1])[::-1]
    lo = int(np.flatnonzero(low_from_top >= need)[-1])
    strictly_above = above + (int(low_from_top[lo + 1]) if lo + 1 < _BINS else 0)
    threshold = (b << 16) | lo
    if threshold == 0:  # the cut falls among exact zeros: keep only non-zeros
        return Cut(threshold=0, ties=0)
    return Cut(threshold=threshold, ties=k - strictly_above)
