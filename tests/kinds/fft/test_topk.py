"""The radix select: with a sample bracketing the k-th largest (one counting pass) and without it
(two), the cut equals numpy's exact k-th largest magnitude and its tie count, and a misleading
sample falls back to the two passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelstore.kinds.fft.topk import bracket, find_cut, magnitude_bits


def _reference(u: np.ndarray, k: int) -> tuple[int, int]:
    """(bit pattern of the k-th largest |u|, how many equal to it are kept), by sorting."""
    bits = np.abs(u.astype(np.float32)).view(np.int32)
    kth = np.sort(bits)[::-1][k - 1]
    return int(kth), k - int((bits > kth).sum())


@pytest.mark.parametrize("dist", ["normal", "heavy", "ties", "zeros"])
@pytest.mark.parametrize("keep", [0.003, 0.1, 0.5])
def test_sampled_and_two_pass_cuts_are_exact(dist, keep):
    g = np.random.default_rng(hash((dist, keep)) & 0xFFFF)
    n = 300_000
    u = {"normal": g.normal(size=n), "heavy": g.standard_t(1.5, size=n) * 1e-3,
         "ties": g.integers(-50, 50, size=n) / 64.0, "zeros": np.where(g.random(n) < 0.7, 0.0, g.normal(size=n))}[dist]
    u = u.astype(np.float32)
    blocks = [torch.from_numpy(b) for b in np.array_split(u, 97)]
    k = int(keep * n)

    passes = []

    def tensors():
        passes.append(1)
        return (magnitude_bits(b) for b in blocks)

    plain = find_cut(k, tensors)
    assert len(passes) == 2
    passes.clear()
    sampled = find_cut(k, tensors, bracket(k, lambda: (magnitude_bits(b) for b in blocks[::2]), n))
    if dist in ("normal", "heavy") and keep >= 0.1:  # a sample this large brackets the k-th largest
        assert len(passes) == 1
    passes.clear()
    misled = find_cut(k, tensors, bracket(k, lambda: (magnitude_bits(b * 1e3) for b in blocks[::2]), n))
    assert len(passes) >= 2  # the bracket missed: the two plain passes ran
    assert plain == sampled == misled
    nonzero = int((u != 0).sum())
    if nonzero >= k:
        assert (plain.threshold, plain.ties) == _reference(u, k)
    kept = sum(int(plain.keeper()(magnitude_bits(b)).numel()) for b in [torch.from_numpy(u)])
    assert kept == min(k, nonzero)
