"""Model soup: θ* = mean of the task models."""

from collections.abc import Sequence

import torch

from modelstore.merging.base import MergeMethod


def mean_of(tasks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean of the task tensors, summed in place (one extra tensor, not T)."""
    out = tasks[0].clone()
    for t in tasks[1:]:
        out += t
    return out.div_(len(tasks))


class Average(MergeMethod):
    name = "average"
    rowwise = True

    def merge(self, name, base, tasks):
        return mean_of(tasks)
