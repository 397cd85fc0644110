"""A resident nn.Module as the target of a load: its tensors by state-dict name, tied ones grouped.

Tied weights (GPT-2's lm_head and wte) are one tensor under two names; a checkpoint saved by
transformers keeps one of them. So a name the task lacks is not missing when it shares storage
with a name the task has, and a tensor is written once per pass whichever of its names comes first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import InputError


def _storage_key(t: torch.Tensor) -> tuple:
    """Equal for two names of one tensor (the same Parameter, or views of the same memory)."""
    if t.device.type == "meta" or t.numel() == 0:  # no memory to compare: identity only
        return ("object", id(t))
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


class ModuleTensors:
    """The parameters and buffers of `model` by state-dict name, to be written in place."""

    def __init__(self, model: torch.nn.Module):
        self.tensors: dict[str, torch.Tensor] = model.state_dict(keep_vars=True)
        first: dict[tuple, str] = {}
        #: name -> the first name of the tensor it shares storage with (itself if none)
        self.owner = {n: first.setdefault(_storage_key(t), n) for n, t in self.tensors.items()}

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (the first one's device; CPU for an empty model)."""
        return next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")

    def layout(self) -> tuple:
        """Where each tensor's memory is: changes when the model is moved, cast or re-allocated."""
        return tuple((n, t.device, t.dtype, t.data_ptr()) for n, t in self.tensors.items())

    def check_fit(self, task: str, names: Iterable[str], strict: bool) -> None:
        """Raise InputError when `strict` and the task's tensor names differ from the model's (tied
        names the task lacks count as present when one of their tensor's names is there)."""
        if not strict:
            return
        have = set(names)
        covered = {self.owner[n] for n in have if n in self.owner}
        missing = sorted(n for n in self.tensors if n not in have and self.owner[n] not in covered)
        unexpected = sorted(have - set(self.tensors))
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise InputError(f"task {task!r} does not fit this model: {what} key(s) in its state dict")

    def claim(self, task: str, name: str, shape: Iterable[int], written: set[str]) -> torch.Tensor | None:
        """The model's tensor to write `name` into, or None when the model has no such tensor or one
        of its tied names was already written in this pass (`written`, updated here).

        Raises:
            InputError: the model's tensor has another shape.
        """
        dst = self.tensors.get(name)
        if dst is None or self.owner[name] in written:
            return None
        if tuple(dst.shape) != tuple(shape):
            raise InputError(f"task {task!r} does not fit this model: {name} has shape {list(shape)} in "
                             f"the store but {list(dst.shape)} in the model")
        written.add(self.owner[name])
        return dst


def flat_view(dst: torch.Tensor, name: str) -> torch.Tensor:
    """`dst` as a flat view sharing its memory, so that writes at flat positions reach the model.

    Raises:
        InputError: `dst` is not contiguous.
    """
    if not dst.is_contiguous():
        raise InputError(f"the model's tensor {name} is not contiguous; make it so (p.data = p.data.contiguous()) "
                         "before switching tasks")
    return dst.view(-1)


__all__ = ["ModuleTensors", "flat_view"]
