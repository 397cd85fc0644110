"""EMR-Merging's election (Huang et al., NeurIPS 2024): θ* = θ0 + τ_uni with
τ_uni = γ ⊙ ε, γ = sign(Σt τt) and ε, per entry, the largest |τt| among the tasks whose τt has the
sign γ (0 where Σt τt = 0). The per-task masks and rescalers are the `emr` task kind's."""

import torch

from modelstore.merging.base import MergeMethod


class EMRElect(MergeMethod):
    name = "emr"

    def merge(self, name, base, tasks):
        taus = [t - base for t in tasks]
        total = torch.zeros_like(base)
        for tau in taus:
            total += tau
        sign = torch.sign(total)
        mag = torch.zeros_like(base)
        for tau in taus:
            mag = torch.maximum(mag, torch.where(tau * sign > 0, tau.abs(), 0))
        return base + sign * mag
