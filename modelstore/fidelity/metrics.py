"""How close a stored task's predictions are to its original's: top-1 agreement and mean
KL(original || stored), over rows of log-probabilities (one row per prediction: an example of a
classifier, a real token of a causal LM). `modelstore eval` and calibrated add-task both count
with `Agreement`, so what add-task promises is what eval measures.

A causal LM's vocabulary makes its reference distributions large (256 texts × 256 tokens × 32k
entries is 8 GB in float32), so calibration keeps each reference row's top TOP_TOKENS entries and
the mass of the rest (`Coarse`): the KL of the distributions so coarsened is a lower bound of the
full one (data processing), and exact where the rest holds no mass; agreement is unaffected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Entries kept of each reference distribution over a vocabulary larger than this.
TOP_TOKENS = 256


@dataclass
class Coarse:
    """Reference rows coarsened to their top entries (`index`, log-probabilities `top`) plus the
    log-mass of the rest (`rest`); argmax is index[:, 0]."""

    index: torch.Tensor
    top: torch.Tensor
    rest: torch.Tensor

    @classmethod
    def of(cls, logp: torch.Tensor) -> Coarse:
        k = min(TOP_TOKENS, logp.shape[-1])
        top, index = logp.topk(k, dim=-1)  # sorted: the argmax first
        return cls(index, top, _log_rest(logp, index))


def _log_rest(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The log-mass of each row's entries outside `index` (−inf where there are none), summed
    without the cancellation of 1 − Σ top."""
    return logp.scatter(-1, index, float("-inf")).logsumexp(-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) per row, with 0·log 0 = 0."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(-1)


class Agreement:
    """Running top-1 agreement and KL sum over prediction rows."""

    def __init__(self) -> None:
        self.rows = 0
        self.agree = 0
        self.kl = 0.0

    def add(self, ref: torch.Tensor | Coarse, mine: torch.Tensor) -> None:
        """Count rows of the original's log-probabilities `ref` (or their `Coarse` form) against the
        stored task's logits or log-probabilities `mine` ([rows, classes] both)."""
        q = mine.double().log_softmax(-1)
        if isinstance(ref, Coarse):
            q_top = q.gather(-1, ref.index)
            p_log = torch.cat([ref.top.double(), ref.rest.double()[:, None]], -1)
            q_log = torch.cat([q_top, _log_rest(q, ref.index)[:, None]], -1)
            first = ref.index[:, 0]
        else:
            p_log, q_log = ref.double().log_softmax(-1), q
            first = p_log.argmax(-1)
        self.agree += int((q.argmax(-1) == first).sum())
        self.kl += float(_kl(p_log, q_log).clamp(min=0).sum())
        self.rows += int(q.shape[0])

    @property
    def agreement(self) -> float:
        return self.agree / self.rows if self.rows else 0.0

    @property
    def mean_kl(self) -> float:
        return self.kl / self.rows if self.rows else 0.0


#: z of the one-sided 95% bound `agreement_low` gives.
Z_95 = 1.6448536


def agreement_low(agreement: float, trials: int, z: float = Z_95) -> float:
    """A one-sided 95% lower confidence bound (Wilson's score interval) of an agreement measured on
    `trials` independent trials: what the agreement on more data like it is unlikely to fall below.
    256 examples at 0.99 bound it at 0.973; the interval is Wilson's, not the normal one, because it
    stays inside [0, 1] and holds near 1, where promises are made."""
    if trials < 1:
        return 0.0
    n, p = trials, min(max(agreement, 0.0), 1.0)
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


__all__ = ["Agreement", "Coarse", "TOP_TOKENS", "Z_95", "agreement_low"]
