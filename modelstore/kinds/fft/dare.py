"""DARE (Yu et al., 2024, "Language Models are Super Mario") as a sparsifier of PERU-FFT: each
delta entry is dropped with probability p = 1 − m and the kept ones are rescaled by 1/(1 − p), so
about m·N entries are stored, the byte budget of magnitude top-m at the same m. DAREx-q (Deng et
al., ICLR 2025) rescales by 1/q instead: at high drop rates a q other than m recovers accuracy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from modelstore.errors import CorruptStoreError

Picker = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def dare_picker(keep: float, seed: int, q: float | None = None) -> Picker:
    """(kept indices, rescaled values) of each successive block of one tensor's delta.

    The tensor's draws come from one torch.Generator seeded `seed`, one float32 `torch.rand` per
    entry in row-major order, block after block (the draws do not depend on how the tensor is cut
    into blocks); entry i is kept when its draw is < float32(keep) and stored as
    u·float32(1/keep), the product in float32 (u·float32(1/q) when `q` is given: the same entries
    are kept).
    """
    gen = torch.Generator().manual_seed(seed)
    bound = torch.tensor(keep, dtype=torch.float32)
    rescale = torch.tensor(1.0 / (keep if q is None else q), dtype=torch.float32)

    def pick(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.nonzero(torch.rand(u.numel(), generator=gen) < bound).view(-1)
        return idx, u[idx] * rescale

    return pick


def seeded_positions(keep: float, seed: int, size: int, count: int, block: int, what: str) -> torch.Tensor:
    """The positions `dare_picker(keep, seed)` keeps of a tensor of `size` entries, re-drawn on the
    CPU `block` draws at a time (a seeded task stores none, spec section 5 "Seeded positions"):
    int32 below 2**31 entries, else int64.

    Raises:
        CorruptStoreError: the draws keep other than `count` entries.
    """
    gen = torch.Generator().manual_seed(seed)
    bound = np.float32(keep)
    out = np.empty(count, np.int32 if size < 1 << 31 else np.int64)
    draws, mask = torch.empty(min(block, size)), np.empty(min(block, size), bool)
    n = 0
    for at in range(0, size, block):
        d = draws[:min(block, size - at)]
        torch.rand(d.numel(), generator=gen, out=d)
        kept = np.flatnonzero(np.less(d.numpy(), bound, out=mask[:d.numel()]))  # 4-5x torch's nonzero
        if n + kept.size > count:
            break
        np.add(kept, at, out=out[n:n + kept.size], casting="unsafe")
        n += kept.size
    else:
        if n == count:
            return torch.from_numpy(out)
    raise CorruptStoreError(f"{what}: the positions re-drawn from its seed do not match its stored count "
                            f"{count}; the store is damaged or was written by an incompatible generator")


__all__ = ["dare_picker", "seeded_positions"]
