"""Model soup: θ* = mean of the task models."""

import torch

from .base import MergeMethod


class Average(MergeMethod):
    name = "average"

    def merge(self, name, base, tasks):
        return torch.stack(list(tasks)).mean(0) if len(tasks) > 1 else tasks[0].clone()
