"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean; θ* = θ0 + λ·merged delta.

Matches `peft.utils.merge_utils.ties` with unit weights by default: each task vector
vt = θt − θ0 keeps its k = int(density·numel) largest magnitudes per tensor, the sign
of each entry is elected from the trimmed vectors ("total": sign of their sum,
"frequency": sign of the count of positive minus negative entries; 0 elects +), and
the merged delta is the mean of the trimmed entries that agree with the elected sign
(divided by the number that agree, at least 1).

`granularity="global"` trims with one threshold per task over all merged tensors, as
the paper's reference code does on the flattened model; the threshold is found in
`prepare` by streaming over the checkpoints (modelstore.kinds.fft.topk). Ties in magnitude
at the threshold go to the lowest index (tensor order, then position); exact zeros are
never kept, which changes nothing as they add nothing and cast no vote.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from modelstore.inputs.sources import TensorSource
from modelstore.kinds.fft.topk import Cut, find_cut, magnitude_bits
from modelstore.merging.base import MergeMethod, Option
from modelstore.merging.task_arithmetic import LAMBDA_HELP

MAJORITY_SIGNS = ("total", "frequency")
GRANULARITIES = ("per-tensor", "global")


class Ties(MergeMethod):
    name = "ties"
    declared = (
        Option("density", 0.2, "fraction of each task vector kept by trimming"),
        Option("lam", 1.0, LAMBDA_HELP, key="lambda"),
        Option("majority_sign", "total", "how the sign of each entry is elected", choices=MAJORITY_SIGNS),
        Option("granularity", "per-tensor", "trim each tensor on its own or the whole model at once",
               flag="--ties-granularity", choices=GRANULARITIES),
    )
    #: Per task: global threshold bits and, per tensor name, how many entries equal to it are kept.
    _global: list[tuple[int, dict[str, int]]] | None = None

    def validate(self) -> None:
        self.check_number("density", 0.0, 1.0, low_open=True)
        self.check_number("lam")
        self.check_choices()

    def prepare(self, pretrained: TensorSource, tasks: Sequence[TensorSource], names: Sequence[str]) -> None:
        if self.options["granularity"] == "global":
            k = int(self.options["density"] * sum(math.prod(pretrained.shape(n)) for n in names))
            self._global = [_global_cut(pretrained, t, names, k) for t in tasks]
        else:
            self._global = None

    def merge(self, name, base, tasks):
        frequency = self.options["majority_sign"] == "frequency"
        cuts: list[Cut] = []
        votes = torch.zeros_like(base)
        for trimmed in self._trimmed(name, base, tasks, cuts):
            votes += trimmed.sign() if frequency else trimmed
        elected = torch.where(votes >= 0, 1.0, -1.0)
        del votes
        total, agreeing = torch.zeros_like(base), torch.zeros_like(base)
        for trimmed in self._trimmed(name, base, tasks, cuts):
            agree = trimmed.sign() == elected
            total += torch.where(agree, trimmed, 0.0)
            agreeing += agree
        return base + float(self.options["lam"]) * (total / agreeing.clamp(min=1.0))

    def _trimmed(self, name: str, base: torch.Tensor, tasks: Sequence[torch.Tensor],
                 cuts: list[Cut]) -> Iterator[torch.Tensor]:
        """Each task's delta with the entries outside its cut zeroed; the first pass fills `cuts`.

        Deltas are recomputed on the second pass rather than kept, so memory stays a few
        tensors whatever the number of tasks.
        """
        for i, t in enumerate(tasks):
            delta = (t - base).reshape(-1)
            bits = magnitude_bits(delta)
            if i == len(cuts):
                cuts.append(self._cut(name, i, bits))
            keep = cuts[i].keeper()(bits)
            trimmed = torch.zeros_like(delta)
            trimmed[keep] = delta[keep]
            yield trimmed.view_as(base)

    def _cut(self, name: str, task: int, bits: torch.Tensor) -> Cut:
        if self._global is not None:
            threshold, ties = self._global[task]
            return Cut(threshold, ties.get(name, 0))
        return find_cut(int(self.options["density"] * bits.numel()), lambda: [bits])


def _global_cut(pretrained: TensorSource, task: TensorSource, names: Sequence[str],
                k: int) -> tuple[int, dict[str, int]]:
    """One task's global threshold, and how many entries equal to it each tensor keeps (lowest index first)."""
    def bits():
        for n in names:
            yield n, magnitude_bits(task.get(n).float() - pretrained.get(n).float())

    cut = find_cut(k, lambda: (b for _, b in bits()))
    ties, remaining = {}, cut.ties
    if remaining:
        for n, b in bits():
            take = min(int((b == cut.threshold).sum()), remaining)
            if take:
                ties[n] = take
                remaining -= take
            if not remaining:
                break
    return cut.threshold, ties
