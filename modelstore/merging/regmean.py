"""RegMean (Jin et al., 2023): merge each linear layer by least squares on its inputs.

For a weight W (torch layout [out, in]) with Gram matrices Gt = XtᵀXt of the layer's
inputs in each task, W* = argmin_W Σt ||Xt Wᵀ − Xt Wtᵀ||² = (Σt Wt G̃t)(Σt G̃t)⁻¹, where
G̃t keeps Gt's diagonal and scales its off-diagonal entries by `alpha` (0.9 by default,
as in the paper's code; 1 is plain least squares, 0 a per-input weighted average).
Grams keyed "<weight>:in_out" belong to weights stored [in, out] (transformers'
Conv1D), merged as W* = (Σt G̃t)⁻¹(Σt G̃t Wt). Every other tensor (biases, norms,
embeddings, weights without Grams) is averaged.

Σ G̃t is singular when some input direction never occurs (dead features; alpha = 1 with
fewer rows than inputs). Then a ridge δ = 1e-6 · mean(diag Σ G̃t) pulls the solution
towards the plain average W̄, W* = (Σt Wt G̃t + δ W̄)(Σt G̃t + δ I)⁻¹, and a warning names
the tensor: directions the data determine barely move, the others get W̄.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from modelstore.errors import InputError
from modelstore.inputs.sources import TensorSource
from modelstore.merging.average import mean_of
from modelstore.merging.base import Option
from modelstore.merging.statistics import IN_OUT_SUFFIX
from modelstore.merging.stats_inputs import StatsMethod

#: Ridge added to a singular Σ G̃, relative to the mean of its diagonal.
RIDGE = 1e-6


class RegMean(StatsMethod):
    name = "regmean"
    declared = (Option("alpha", 0.9, "scale of the Gram matrices' off-diagonals"),)
    data_options = ("grams",)
    stats_kind = "gram"

    def validate(self) -> None:
        super().validate()
        self.check_number("alpha", 0.0, 1.0)

    def prepare(self, pretrained: TensorSource, tasks: Sequence[TensorSource], names: Sequence[str]) -> None:
        self.open_stats(len(tasks))
        #: tensor name -> (Gram key, weight stored [in, out])
        self._layout: dict[str, tuple[str, bool]] = {}
        for n in names:
            shape = tuple(pretrained.shape(n))
            keys = [(n, False), (n + IN_OUT_SUFFIX, True)]
            if len(shape) != 2:
                for held, label in zip(self._names, self.labels):
                    if any(k in held for k, _ in keys):
                        raise InputError(f"{label}: has a Gram for {n!r}, a tensor of shape {list(shape)}; "
                                         "Grams are for 2-D linear weights only")
                continue
            found = [(k, in_out) for k, in_out in keys
                     if self.has_stat(k, (shape[0],) * 2 if in_out else (shape[1],) * 2, n)]
            if len(found) > 1:
                raise InputError(f"{self.labels[0]}: has Grams under both {n!r} and {n + IN_OUT_SUFFIX!r}; keep one")
            if found:
                self._layout[n] = found[0]
        self.require_some(set(self._layout))

    def merge(self, name, base, tasks):
        if name not in self._layout:
            return mean_of(tasks)
        key, in_out = self._layout[name]
        alpha = float(self.options["alpha"])

        def in_first(w: torch.Tensor) -> torch.Tensor:  # [in, out] float64
            return (w if in_out else w.T).to(torch.float64)

        gram_sum: torch.Tensor | None = None
        rhs: torch.Tensor | None = None
        for w, src, label in zip(tasks, self.stats, self.labels):
            g = src.get(key).to(torch.float64)
            if not torch.isfinite(g).all():
                raise InputError(f"{label}: Gram entry {key!r} has inf or NaN values; recompute it")
            g = alpha * g + (1.0 - alpha) * torch.diag(g.diagonal())
            gw = g @ in_first(w)
            if gram_sum is None or rhs is None:
                gram_sum, rhs = g, gw
            else:
                gram_sum.add_(g)
                rhs.add_(gw)
        assert gram_sum is not None and rhs is not None  # a merge has at least one task
        solution = _solve(gram_sum, rhs, lambda: in_first(mean_of(tasks)), name)
        return (solution if in_out else solution.T).to(torch.float32)


def _solve(gram: torch.Tensor, rhs: torch.Tensor, average: Callable[[], torch.Tensor], name: str) -> torch.Tensor:
    """gram⁻¹ rhs for a symmetric PSD `gram` (Cholesky); with a ridge towards `average()` if singular."""
    chol, info = torch.linalg.cholesky_ex(gram)
    scale = gram.diagonal().mean().item()
    delta = RIDGE * scale if scale > 0 else 1.0
    if info.item() == 0 and chol.diagonal().min().item() ** 2 > delta:
        return torch.cholesky_solve(rhs, chol)
    warnings.warn(f"regmean: the summed Gram of {name!r} is singular (some input directions never occur); "
                  f"solving with a ridge of {delta:.3g} towards the plain average", RuntimeWarning, stacklevel=3)
    gram.diagonal().add_(delta)
    rhs.add_(average(), alpha=delta)
    chol, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
        raise InputError(f"regmean: cannot solve for {name!r}: its summed Gram is not positive semi-definite; "
                         "recompute the Grams with modelstore.merging.statistics.gram()")
    return torch.cholesky_solve(rhs, chol)
