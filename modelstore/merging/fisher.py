"""Fisher merging (Matena & Raffel, 2022): θ* = Σt Ft⊙θt / Σt Ft with diagonal Fishers Ft.

Each Ft is floored at `eps` (as `fisher_floor` in the paper's code, default 1e-6), so
entries no task is sensitive to get the plain average instead of 0/0. Tensors that no
task's Fisher has (e.g. a layer left out of `modelstore.merging.statistics.fisher(names=...)`) are
averaged; a tensor that only some tasks' Fishers have is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from modelstore.errors import InputError
from modelstore.inputs.sources import TensorSource
from modelstore.merging.average import mean_of
from modelstore.merging.base import Option
from modelstore.merging.stats_inputs import StatsMethod


class Fisher(StatsMethod):
    name = "fisher"
    declared = (Option("eps", 1e-6, "floor of the Fisher values"),)
    data_options = ("fishers",)
    stats_kind = "fisher"

    def validate(self) -> None:
        super().validate()
        self.check_number("eps", 0.0, math.inf, low_open=True)

    def prepare(self, pretrained: TensorSource, tasks: Sequence[TensorSource], names: Sequence[str]) -> None:
        self.open_stats(len(tasks))
        self._weighted = {n for n in names if self.has_stat(n, tuple(pretrained.shape(n)), n)}
        self.require_some(self._weighted)

    def merge(self, name, base, tasks):
        if name not in self._weighted:
            return mean_of(tasks)
        num, den = torch.zeros_like(base), torch.zeros_like(base)
        for theta, src, label in zip(tasks, self.stats, self.labels):
            f = src.get(name).to(torch.float32)
            if not torch.isfinite(f).all():
                raise InputError(f"{label}: Fisher entry {name!r} has inf or NaN values; recompute it")
            f = f.clamp(min=float(self.options["eps"]))
            num.addcmul_(f, theta)
            den += f
        return num.div_(den)
