"""A resident nn.Module as the target of a load: its tensors by state-dict name, tied ones grouped,
and where a task's tensors go in it (`Placement`).

Tied weights (GPT-2's lm_head and wte) are one tensor under two names; a checkpoint saved by
transformers keeps one of them. So a name the task lacks is not missing when it shares storage
with a name the task has, and a tensor is written once per pass whichever of its names comes first.

Every write of a task into a model (load_into, switch, load_model, eval, export) places the task's
tensors by `ModuleTensors.fit`, so they all agree on which model tensor each task tensor is.

A task's name that matches no model tensor is tried as transformers renames it as it loads a
checkpoint into this model (modelstore.inputs.architectures.checkpoint_renaming). Names it fuses
into other tensors (a MoE's experts stacked into one) have no tensor of their own to be written
into in place: a write refuses them, saying so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from modelstore.errors import InputError
from modelstore.inputs.architectures import checkpoint_renaming, not_fused
from modelstore.inputs.naming import match_names


def _storage_key(t: torch.Tensor) -> tuple:
    """Equal for two names of one tensor (the same Parameter, or views of the same memory)."""
    if t.device.type == "meta" or t.numel() == 0:  # no memory to compare: identity only
        return ("object", id(t))
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


_HINT = "build the model as the architecture the task was fine-tuned as (modelstore.load_model does)"


@dataclass(frozen=True)
class Placement:
    """Where a task's tensors go in a model (`ModuleTensors.fit`)."""

    #: task name -> the model's state-dict name, for every task tensor the model keeps
    model: dict[str, str]
    #: task tensors dropped: buffers the model makes itself and does not keep in its state dict
    dropped: frozenset[str]
    #: base name -> model name, for the base tensors the task's tensors stand for
    base: dict[str, str]

    def model_name(self, name: str) -> str | None:
        """The model's name for task tensor `name`, None for a dropped one."""
        return None if name in self.dropped else self.model[name]


class ModuleTensors:
    """The parameters and buffers of `model` by state-dict name, to be written in place."""

    def __init__(self, model: torch.nn.Module):
        self.tensors: dict[str, torch.Tensor] = model.state_dict(keep_vars=True)
        #: buffers the model registers but does not persist (transformers' position_ids)
        self.unsaved = {n for n, _ in model.named_buffers() if n not in self.tensors}
        #: tensors the model makes itself, which its checkpoints leave out (transformers'
        #: `_keys_to_ignore_on_save` patterns: Marian's sinusoidal position tables): a task need not have them
        made = getattr(model, "_keys_to_ignore_on_save", None) or ()
        self.made = {n for n in self.tensors if any(re.search(p, n) for p in made)}
        first: dict[tuple, str] = {}
        #: name -> the first name of the tensor it shares storage with (itself if none)
        self.owner = {n: first.setdefault(_storage_key(t), n) for n, t in self.tensors.items()}
        self.renamed, self.fused = checkpoint_renaming(model)

    @property
    def fuses(self) -> bool:
        """Whether transformers fuses some checkpoint tensors into others as it loads this model."""
        return self.fused is not not_fused

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (the first one's device; CPU for an empty model)."""
        return next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")

    def layout(self) -> tuple:
        """Where each tensor's memory is: changes when the model is moved, cast or re-allocated."""
        return tuple((n, t.device, t.dtype, t.data_ptr()) for n, t in self.tensors.items())

    def fit(self, task: str, names: Iterable[str], strict: bool, base_names: Iterable[str] = (),
            model: str = "this model", hint: str = _HINT,
            shapes: Mapping[str, Sequence[int]] | None = None) -> Placement:
        """Where each of the task's tensors `names` goes in the model, by the names add-task matches
        a fine-tune to its base with (modelstore.inputs.naming): its own name, or one with a first
        component stripped or added (`bert.x` and `x`). A tensor that lands on a buffer the model
        does not persist (position_ids, which transformers 5 makes itself) is dropped. With the
        task's `shapes` (name -> shape), every placed tensor is checked against the model's, so a
        write that would fail part way (a 3-label head into a 2-label model) fails before it starts.

        Raises:
            InputError: a task tensor has no place in the model (always: a write never leaves part
                of the task out) or, given `shapes`, another shape there, a name is ambiguous, or,
                when `strict`, a model tensor gets nothing (tied names count as one, and tensors
                the model makes itself need nothing); its message
                calls the model `model` and ends with `hint`.
        """
        names = list(names)
        what = f"task {task!r}"
        try:
            to_model = self._match(names, what)
            to_base = match_names(names, base_names, what)
        except ValueError as e:
            raise InputError(f"{e}; {hint}") from None
        dropped = frozenset(n for n, m in to_model.items() if m in self.unsaved)
        placed = {n: m for n, m in to_model.items() if n not in dropped}
        unexpected = sorted(n for n in names if n not in to_model)
        covered = {self.owner[m] for m in placed.values()}
        missing = sorted(n for n in self.tensors
                         if self.owner[n] not in covered and n not in self.made) if strict else []
        fused = next(((n, into) for n in unexpected if (into := self.fused(n)) is not None), None)
        if fused is not None:
            raise InputError(f"task {task!r} cannot be written into {model} in place: transformers fuses its "
                             f"checkpoint's tensors into others as it loads one ({fused[0]} into {fused[1]}); "
                             "`modelstore export` the task and load the export with from_pretrained")
        if unexpected or missing:
            problem = f"unexpected {unexpected[:3]}" if unexpected else f"missing {missing[:3]}"
            raise InputError(f"task {task!r} does not fit {model}: {problem} key(s) in its state dict "
                             f"({len(unexpected or missing)} in all); {hint}")
        for n, m in placed.items():
            if shapes is not None and n in shapes and tuple(shapes[n]) != tuple(self.tensors[m].shape):
                raise InputError(f"task {task!r} does not fit {model}: {m} has shape {list(shapes[n])} in the "
                                 f"task and {list(self.tensors[m].shape)} in the model; {hint}")
        return Placement(placed, dropped, {b: placed[t] for t, b in to_base.items() if t in placed})

    def _match(self, names: list[str], what: str) -> dict[str, str]:
        """task name -> model name, trying the names that match none as transformers renames them."""
        model_names = [*self.tensors, *self.unsaved]
        to_model = match_names(names, model_names, what, "model")
        renamed = {self.renamed(n): n for n in names if n not in to_model}
        taken = {m: n for n, m in to_model.items()}
        for r, m in match_names([r for r, n in renamed.items() if r != n], model_names, what, "model").items():
            if m in taken:
                raise ValueError(f"{what}: tensors {taken[m]!r} and {renamed[r]!r} both match model tensor {m!r}")
            to_model[renamed[r]] = taken[m] = m
        return to_model

    def claim(self, task: str, name: str, shape: Iterable[int], written: set[str]) -> torch.Tensor | None:
        """The model's tensor `name` (a name `fit` placed a task tensor at) to write into, or None
        when one of its tied names was already written in this pass (`written`, updated here).

        Raises:
            InputError: the model's tensor has another shape.
        """
        dst = self.tensors[name]
        if self.owner[name] in written:
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


__all__ = ["ModuleTensors", "Placement", "flat_view"]
