"""Switch a resident model between tasks in place, in time and memory O(entries the tasks change).

A switched model holds a base with one task's edits on top (modelstore.kinds.base.Edit). Before
writing an edit, the switch keeps the values it overwrites (positions and old values per tensor:
the base's values there, in the model's dtype), so the next switch puts those back, rewrites the
tensors whose base differs when the next task sits on another base, and applies the next task.
Nothing of the size of the model is kept. The state is a `SwitchState` attached to the model.

With a `resident` budget, the writes of recently switched tasks (positions, the base's values
there, the task's values there) stay on the model's device, most recently used first, up to that
many bytes: switching back to one of them reads nothing from the store and is the floor of any
in-place switch, the previous task's entries and the new task's scattered into the model.

A model the switch does not know (never switched, or moved, cast or re-allocated since: its
tensors' memory changed) first gets its task's base written whole, like `load_into`. Weights
changed in place by other means are not noticed: `Store.load_into` forgets the state, and the
next switch writes the base again.

Task tensors, and the base tensors they stand for, go where `ModuleTensors.fit` places them (a
task saved as `bert.…` over a base saved as `…` writes the model's `bert.…`): the state records
which base tensor each model tensor holds, and a task placing the base differently (rare: tasks
saved under other prefixes) gets the differing tensors written first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from modelstore.kinds.base import Edit
from modelstore.serving.modules import ModuleTensors, Placement, flat_view

_ATTR = "_modelstore_switch"


class SwitchSource(Protocol):
    """One task of a store as a switch reads it (Store.switch makes it)."""

    #: Names the task's base and the task itself: equal keys, equal contents.
    base_key: str
    task_key: str
    task: str

    def base_dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of base tensor `name`, None if the base has no such tensor."""
        ...

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The task's tensors (what a load returns): each one's shape, by name, in order."""
        ...

    def base_names(self) -> list[str]:
        """The names of the base's tensors."""
        ...

    def base_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every base tensor in its stored dtype on the model's device, one at a time, read-only."""
        ...

    def base_values(self, name: str, positions: torch.Tensor | None) -> torch.Tensor:
        """The base's stored values of tensor `name` at flat `positions` (None: the whole tensor), on the
        model's device: for a model whose dtype differs from the base's, which holds them rounded."""
        ...

    def edits(self) -> Iterator[Edit]:
        """The task's edits of its base, one tensor at a time."""
        ...


@dataclass
class SwitchState:
    """What a switched model holds, so that the next switch undoes only what the last one wrote."""

    base: str
    task: str | None
    layout: tuple
    #: model tensor name -> the base tensor it holds (when no task is applied)
    placed: dict[str, str] = field(default_factory=dict)
    #: tensor name -> (flat positions as int64, or None for the whole tensor; the values the task overwrote)
    saved: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)
    #: task key -> its writes on this base, (name, positions or None, old values, new values) per
    #: tensor, least recently used first; `resident_bytes` at most `budget` bytes
    resident: OrderedDict[str, list[Write]] = field(default_factory=OrderedDict)
    budget: int = 0

    def entries(self) -> int:
        """Tensor entries kept to undo the current task: the entries it changed."""
        return sum(int(old.numel()) for _, old in self.saved.values())

    def resident_bytes(self) -> int:
        """Bytes of the resident tasks' writes."""
        return sum(_nbytes(w) for writes in self.resident.values() for w in writes)

    def keep(self, task: str, writes: list[Write]) -> None:
        """Keep `task`'s writes if they fit the budget, dropping the least recently used tasks."""
        if sum(_nbytes(w) for w in writes) > self.budget:
            return
        self.resident[task] = writes
        self.shrink()

    def shrink(self) -> None:
        """Drop the least recently used resident tasks until the rest fit the budget."""
        while self.resident and self.resident_bytes() > self.budget:
            self.resident.popitem(last=False)


#: One tensor's part of a switch: name, flat positions (int64) or None for the whole tensor, the
#: base's values there, the task's values there.
Write = tuple[str, "torch.Tensor | None", torch.Tensor, torch.Tensor]


def _nbytes(w: Write) -> int:
    return sum(t.numel() * t.element_size() for t in w[1:] if t is not None)


def state_of(model: torch.nn.Module, target: ModuleTensors | None = None) -> SwitchState | None:
    """The model's switch state, or None if it has none or its tensors moved since it was recorded."""
    state = model.__dict__.get(_ATTR)
    if state is None or state.layout != (target or ModuleTensors(model)).layout():
        return None
    return state


def forget(model: torch.nn.Module) -> None:
    """Drop the model's switch state: its weights were written by other means."""
    model.__dict__.pop(_ATTR, None)


def switch(model: torch.nn.Module, open_source: Callable[[torch.device], SwitchSource], strict: bool,
           resident: int = 0) -> None:
    """Make `model` hold the task of `open_source(the model's device)`, rewriting only what differs
    from what it holds now; keep its writes on the model's device within a `resident` budget of
    bytes (module docstring)."""
    target = ModuleTensors(model)
    source = open_source(target.device)
    state = state_of(model, target)
    if state is not None:
        state.budget = resident
        state.shrink()
    if state is not None and state.task == source.task_key:
        return
    with torch.no_grad():
        if state is not None and source.task_key in state.resident and state.base == source.base_key:
            _restore(target, state)
            state.resident.move_to_end(source.task_key)
            _rewrite(target, state, source.task_key)
            return
        shapes = source.shapes()
        placement = target.fit(source.task, shapes, strict, source.base_names(), shapes=shapes)
        held = {m: b for b, m in placement.base.items()}  # model tensor -> the base tensor it holds
        if state is not None:
            _restore(target, state)  # the model holds state.base again
        if state is None or state.base != source.base_key:
            forget(model)  # until the base is written whole: a failure part way leaves an unknown model
            _write_base(target, source, placement.base, compare=state is not None)
            state = SwitchState(source.base_key, None, target.layout(), held, budget=resident)
            model.__dict__[_ATTR] = state
        else:
            todo = {b: m for m, b in held.items() if state.placed.get(m) != b}
            if todo:  # the task places the base where no task of this base did: write it there
                state.resident.clear()  # their writes assumed the base as it was placed
                _write_base(target, source, todo, compare=True)
                state.placed.update({m: b for b, m in todo.items()})
        _apply(target, source, state, placement)


def _restore(target: ModuleTensors, state: SwitchState) -> None:
    """Put back what the current task overwrote: the model holds `state.base` again."""
    for name, (index, old) in state.saved.items():
        dst = target.tensors[name]
        if index is None:
            dst.copy_(old)
        else:
            flat_view(dst, name).index_copy_(0, index, old)
    state.saved.clear()
    state.task = None


def _rewrite(target: ModuleTensors, state: SwitchState, task: str) -> None:
    """Write a resident task's kept writes (the model holds the base)."""
    for name, index, old, new in state.resident[task]:
        dst = target.tensors[name]
        state.saved[name] = (index, old)
        if index is None:
            dst.copy_(new)
        else:
            flat_view(dst, name).index_copy_(0, index, new)
    state.task = task


def _write_base(target: ModuleTensors, source: SwitchSource, where: dict[str, str], compare: bool) -> None:
    """Copy the base tensors `where` names into the model tensors it maps them to; with `compare`,
    only those that differ from what the model holds."""
    written: set[str] = set()
    for name, t in source.base_tensors():
        dst = target.claim(source.task, where[name], t.shape, written) if name in where else None
        if dst is None or (compare and torch.equal(dst, t.to(dst.dtype))):
            continue
        dst.copy_(t)


def _apply(target: ModuleTensors, source: SwitchSource, state: SwitchState, placement: Placement) -> None:
    """Write the task's edits over the base, keeping what each overwrites in `state` first (so a
    failure part way still leaves a state the next switch can undo)."""
    written: set[str] = set()
    writes: list[Write] = []
    for e in source.edits():
        name = placement.model_name(e.name)
        if name is None:
            continue
        dst = target.claim(source.task, name, e.shape, written)
        if dst is None or not e.count():
            continue
        exact = source.base_dtype(e.source) == dst.dtype  # then the model holds the base's own values
        dtype = dst.dtype if dst.dtype.is_floating_point else None
        if e.positions is None:
            old = dst.detach().clone()
            base = (old if exact else source.base_values(e.source, None)) if e.uses_base else None
            state.saved[name] = (None, old)
            dst.copy_(e.values(base, dtype).view(dst.shape))
            if state.budget:
                writes.append((name, None, old, dst.detach().clone()))
        else:
            flat, index = flat_view(dst, name), e.index()
            old = torch.index_select(flat, 0, index)  # faster than flat[p] on CPU
            base = old if exact else source.base_values(e.source, index)
            state.saved[name] = (index, old)
            e.write_at(flat, index, base, holds_base=exact)
            if state.budget:
                writes.append((name, index, old, torch.index_select(flat, 0, index)))
    state.task = source.task_key
    if state.budget:
        state.keep(source.task_key, writes)


__all__ = ["SwitchSource", "SwitchState", "switch", "state_of", "forget"]
