"""DARE (Yu et al., 2024, "Language Models are Super Mario") as a sparsifier of PERU-FFT: each
delta entry is dropped with probability p = 1 − m and the kept ones are rescaled by 1/(1 − p), so
about m·N entries are stored, the byte budget of magnitude top-m at the same m. DAREx-q (Deng et
al., ICLR 2025) rescales by 1/q instead: at high drop rates a q other than m recovers accuracy."""

from __future__ import annotations

from collections.abc import Callable

import torch

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


__all__ = ["dare_picker"]
