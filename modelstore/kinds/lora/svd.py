"""PERU-LoRA's rank-q truncation of a LoRA update s*B@A, computed from the factors alone.

The dense product is d_out x d_in; its SVD costs O(d^3). Because the product has rank <= r,
QR of B and of A^T reduce it to an r x r core whose SVD gives the same singular triplets in
O(d r^2). The SVD is always of the update in PEFT's [d_out, d_in] convention (lora_B @ lora_A);
the transpose that fan_in_fan_out (Conv1D) and Embedding weights need is applied only in
LowRank.dense, so U and V map one to one onto the lora_B and lora_A of an exported adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modelstore.kinds.lora.adapter import Layout, LoraAdapter, LoraError


@dataclass(frozen=True)
class LowRank:
    """Rank-q update U @ diag(S) @ V^T ([d_out, d_in]), plus the singular values it left out."""

    U: torch.Tensor  # [d_out, q], orthonormal columns
    S: torch.Tensor  # [q], descending, >= 0
    V: torch.Tensor  # [d_in, q], orthonormal columns
    dropped: torch.Tensor  # singular values not kept, descending
    layout: Layout = "linear"

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error of the truncation versus the full update (0 for a zero update)."""
        lost = float(self.dropped.double().square().sum())
        total = lost + float(self.S.double().square().sum())
        return math.sqrt(lost / total) if total > 0 else 0.0

    def dense(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The update in the base weight's layout (transposed for fan_in_fan_out/embedding), ready to add to it."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        U, S, V = (t.to(device=device, dtype=work) for t in (self.U, self.S, self.V))
        delta = (U * S) @ V.T
        if self.layout != "linear":
            delta = delta.T
        return delta.to(dtype).contiguous()


def truncated_svd(
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    *,
    rank: int | None = None,
    energy: float | None = None,
    layout: Layout = "linear",
    dtype: torch.dtype = torch.float64,
) -> LowRank:
    """Best rank-q approximation (Eckart-Young) of scale * B @ A without forming the product.

    Exactly one of `rank` (q; q >= r keeps everything, exactly) or `energy` (smallest q keeping
    that fraction of the squared Frobenius norm) selects q. Computes in `dtype` (float64 default).
    """
    if (rank is None) == (energy is None):
        raise LoraError("give exactly one of rank= or energy= for the LoRA truncation")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise LoraError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise LoraError(f"energy must be in (0, 1], got {energy!r}")
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise LoraError(f"lora_B {list(B.shape)} and lora_A {list(A.shape)} do not form a product B @ A")

    Q_B, R_B = torch.linalg.qr(B.to(dtype))  # B = Q_B R_B
    Q_A, R_A = torch.linalg.qr(A.to(dtype).T)  # A = R_A^T Q_A^T
    U_core, S, Vh_core = torch.linalg.svd(scale * (R_B @ R_A.T), full_matrices=False)

    if rank is not None:
        q = min(rank, S.shape[0])
    else:
        cumulative = S.square().cumsum(0)
        total = cumulative[-1]
        q = 0 if total == 0 else min(int((cumulative < energy * total).sum()) + 1, S.shape[0])
    return LowRank(
        U=Q_B @ U_core[:, :q],
        S=S[:q].clone(),
        V=Q_A @ Vh_core[:q].T,
        dropped=S[q:].clone(),
        layout=layout,
    )


def compress_adapter(
    adapter: LoraAdapter,
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, LowRank]:
    """truncated_svd of every module of `adapter`, keyed like adapter.modules (PEFT module paths)."""
    return {
        name: truncated_svd(m.B, m.A, m.scale, rank=rank, energy=energy, layout=m.layout, dtype=dtype)
        for name, m in adapter.modules.items()
    }
