"""Task-Arithmetic (Ilharco et al., 2023): θ* = θ0 + λ·Σt(θt − θ0)."""

import torch

from modelstore.errors import InputError
from modelstore.merging.base import MergeMethod, Option

LAMBDA_HELP = "scale λ of the merged task vectors: θ* = θ0 + λ·(merged delta)"


class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    rowwise = True
    declared = (Option("lam", 0.3, LAMBDA_HELP, key="lambda"),)

    def validate(self) -> None:
        lam = self.options["lam"]
        if not isinstance(lam, (int, float)) or not torch.isfinite(torch.tensor(float(lam))):
            raise InputError(f"--lambda must be a finite number, got {lam!r}")

    def merge(self, name, base, tasks):
        out = base.clone()
        for t in tasks:
            out.add_(t - base, alpha=float(self.options["lam"]))
        return out
