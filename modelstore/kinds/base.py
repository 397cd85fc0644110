"""The interface every task kind implements.

A task kind owns one way of keeping a task next to a base: how it is written from its input
(`write`), rebuilt on a device (`tensors`), described as changes to its base (`edits`, which
switching a resident model between tasks needs), returned unmerged (`unmerged`), summarized for
`ls` / `info`, and exported in its own native format. The Store, the CLI and export know a task
only through its kind; the manifest records the kind's `name` in each task entry. A kind may read
more than one base (TALL masks and EMR need θ0 next to the merged θ*): it names the others in
`extra_bases`, and its `base` then also answers `other(base_id)`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from modelstore._runtime.threads import side_by_side
from modelstore.errors import InputError
from modelstore.format import dtypes
from modelstore.format.manifest import BaseEntry, TableEntry, TaskEntry
from modelstore.format.payload import PayloadWriter, Segments
from modelstore.inputs.sources import TensorSource
from modelstore.options import Option


class BaseTensors(Protocol):
    """The base a task sits on, tensor by tensor, on the load's device."""

    def names(self) -> list[str]: ...

    def fresh(self, name: str) -> torch.Tensor:
        """Base tensor `name` in its stored dtype, as a new tensor the caller may change. Tensors
        are asked for in base order (a base read from storage is streamed front to back)."""
        ...

    def view(self, name: str) -> torch.Tensor:
        """Base tensor `name` to read only (it may be the cached base's own tensor), asked for in
        base order as `fresh` is: for a kind that makes a new tensor from it anyway."""
        ...

    def other(self, base_id: str) -> BaseTensors:
        """Another base the task reads (one of its kind's `extra_bases`), on the same device."""
        ...


class WithOtherBases:
    """A stored base as a TensorSource (what `TaskKind.write` gets), with the other bases its task
    reads: `other(base_id)`."""

    def __init__(self, main: TensorSource, others: Mapping[str, TensorSource]):
        self.main, self.others = main, dict(others)

    def names(self) -> list[str]:
        return self.main.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.main.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.main.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self.main.get(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.main.rows(name, start, stop)

    def other(self, base_id: str) -> TensorSource:
        return self.others[base_id]


#: Positions a load applies at once (gather, compute, scatter): temporaries of a few MB.
APPLY_ENTRIES = 1 << 20
#: Positions from which a CPU load applies an edit in two threads, each half of them (the add of
#: kept entries is bound by memory latency: 10.7M entries of a 2 GB model 0.27 -> 0.12 s); below
#: it, handing half to the other thread costs more than it saves.
SPLIT_ENTRIES = 1 << 16


@dataclass(frozen=True)
class Edit:
    """One tensor of a task as a change to its base tensor: the entries at the flat `positions`
    (every entry when None) take `new(base values there)`. A load applies it to a fresh base tensor
    (`applied`); a switch applies it in place to a model that holds the base, touching only those
    entries, and so both give the same bits."""

    name: str
    shape: tuple[int, ...]
    #: The task tensor's dtype as stored (what a load with dtype=None returns).
    dtype: torch.dtype
    #: Flat positions on the load's device, sorted (int32 where they fit: half the memory; `index`
    #: gives them as int64 for indexing); None: the whole tensor.
    positions: torch.Tensor | None
    #: The base tensor this one changes, when its name differs (a task saved under a head's prefix).
    base_name: str | None = field(default=None, kw_only=True)
    #: Whether `new` reads the base's values (False: the tensor is stored whole).
    uses_base: ClassVar[bool] = True

    def new(self, base: torch.Tensor | None) -> torch.Tensor:
        """The task's values at `positions` from the base's values there, in the base's stored dtype
        (None when not `uses_base`), before the cast to the output dtype. Must not change `base`."""
        raise NotImplementedError

    def part(self, start: int, stop: int) -> Edit:
        """The edit of positions[start:stop] alone (for edits with positions): a load applies a large
        edit in parts, so its temporaries stay small."""
        raise NotImplementedError

    @property
    def source(self) -> str:
        """The name of the base tensor the edit reads."""
        return self.base_name or self.name

    def index(self) -> torch.Tensor:
        """The positions as int64, what torch's index operations take."""
        assert self.positions is not None
        return self.positions.long()

    def count(self) -> int:
        """How many entries of the tensor the task changes."""
        return math.prod(self.shape) if self.positions is None else int(self.positions.numel())

    def values(self, base: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
        """`new(base)` in the output dtype of a load asking for `dtype` (None: the stored dtype)."""
        return self.new(base).to(dtypes.output_dtype(self.dtype, dtype))

    def write_at(self, flat: torch.Tensor, index: torch.Tensor, base: torch.Tensor | None, holds_base: bool) -> None:
        """flat[index] := the task's values there, in flat's dtype; `base` is the base's values at
        `index` and `holds_base` says flat holds exactly those (a switch writing into a model)."""
        flat.index_copy_(0, index, self.values(base, flat.dtype if flat.dtype.is_floating_point else None))

    def applied(self, base: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
        """The whole task tensor from its whole base tensor (a fresh one, which this may reuse)."""
        if self.positions is None:
            return self.values(base, dtype).view(self.shape)
        assert base is not None
        want = dtypes.output_dtype(self.dtype, dtype)
        flat = base.reshape(-1)
        out = flat if want == flat.dtype else flat.to(want)
        n = int(self.positions.numel())
        if n >= SPLIT_ENTRIES and out.device.type == "cpu":  # sorted positions: disjoint halves of out
            half = n // 2
            side_by_side(lambda: self._apply(out, flat, dtype, 0, half), lambda: self._apply(out, flat, dtype, half, n))
        else:
            self._apply(out, flat, dtype, 0, n)
        return out.view(self.shape)

    def _apply(self, out: torch.Tensor, flat: torch.Tensor, dtype: torch.dtype | None, start: int, stop: int) -> None:
        """`apply_part` of positions[start:stop], APPLY_ENTRIES at a time."""
        n = self.count()
        for i in range(start, stop, APPLY_ENTRIES):
            j = min(i + APPLY_ENTRIES, stop)
            (self if j - i == n else self.part(i, j)).apply_part(out, flat, dtype)

    def apply_part(self, out: torch.Tensor, flat: torch.Tensor, dtype: torch.dtype | None) -> None:
        """out[positions] := the task's values there, from the flat base tensor `flat` (`out` is
        `flat`, or `flat` cast to the output dtype); the other entries are left as they are."""
        p = self.index()
        out.index_copy_(0, p, self.values(torch.index_select(flat, 0, p), dtype))


@dataclass(frozen=True)
class Replace(Edit):
    """A tensor stored whole: the task's value whatever the base holds."""

    tensor: torch.Tensor
    uses_base: ClassVar[bool] = False

    def new(self, base: torch.Tensor | None) -> torch.Tensor:
        return self.tensor


class TaskKind:
    """Base class: subclasses set `name`, `title`, `base_id` and implement write / materialize."""

    #: The manifest's `kind` field.
    name: ClassVar[str]
    #: What a user calls a task of this kind, in messages ("a full fine-tune").
    title: ClassVar[str]
    #: How `info` names the entry counts and the original's bytes.
    kept_label: ClassVar[str]
    original_label: ClassVar[str]
    #: Whether `unmerged` gives the task without its base (`Store.load(merged=False)`).
    has_unmerged: ClassVar[bool] = False
    #: Whether its tasks load bit for bit as their fine-tunes: they agree with them on any data.
    lossless: ClassVar[bool] = False
    #: Native export formats besides "hf" (full weights), mapped to what they write.
    export_formats: ClassVar[Mapping[str, str]] = {}
    #: Whether `Store.add_task` and `build` make tasks of this kind from a full fine-tuned checkpoint.
    from_checkpoint: ClassVar[bool] = True
    #: Bases the kind reads besides the task's own `base` (recorded in the entry's `bases`).
    extra_bases: ClassVar[tuple[str, ...]] = ()
    #: The merge method `build` makes the base with when the user names none (None: task-arithmetic).
    default_merge: ClassVar[str | None] = None
    #: Per merge method, the options `build` gives it unless the user gives them.
    merge_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: The kind's options (flags of `add-task` / `build`, keywords of `Store.add_task`).
    declared: ClassVar[tuple[Option, ...]] = ()
    #: The kinds of table entries its tasks hold (spec section 3); a reader refuses others.
    entry_kinds: ClassVar[tuple[str, ...]] = ("dense", "sparse")
    #: Whether its tasks read their bases' tensors in table order (the bases are streamed), so that a
    #: table whose entries are out of the base's order is damage.
    base_in_table_order: ClassVar[bool] = True

    def parse_options(self, given: Mapping[str, Any]) -> Any:
        """The kind's options from those the user gave (the others take their defaults).

        Raises:
            InputError: an option this kind does not take, or a bad value.
        """
        known = {o.name for o in self.declared}
        for k in given:
            if k not in known:
                flags = ", ".join(o.flag for o in self.declared) or "none"
                raise InputError(f"--{k.replace('_', '-')} does not apply to --kind {self.name} tasks "
                                 f"(their options: {flags})")
        return self.make_options(dict(given))

    def make_options(self, given: dict[str, Any]) -> Any:
        """The kind's options object from known option names, validated."""
        return None

    def base_id(self, bases: Collection[str], requested: str | None) -> str:
        """The base a new task of this kind sits on, given the ids of the store's bases and the user's choice."""
        raise NotImplementedError

    def check_entry(self, entry: TaskEntry) -> str | None:
        """What is wrong with a task entry's kind-specific fields (a damaged manifest), or None."""
        return None

    def check_table(self, table: list[TableEntry], entry: TaskEntry) -> str | None:
        """What is wrong with a task's table (already consistent with its arrays, `format.payload.
        table_problem`) for this kind and the entry's params, or None."""
        return None

    def array_dtypes(self, entry: TaskEntry) -> dict[str, str]:
        """Logical dtypes of the task's arrays whose names do not end in `.<dtype>`."""
        return {}

    def write(self, out: PayloadWriter, task: str, source: Any, base: TensorSource, base_entry: BaseEntry,
              options: Any, progress: bool) -> dict[str, Any]:
        """Compress `source` against `base` into `out`'s arrays and table (`base` is a
        `WithOtherBases` when the kind has `extra_bases`).

        Returns the task entry's kind-specific fields (method, params, kept, total, ...); the
        Store adds the payload fields, `kind`, `base` and commits.
        """
        raise NotImplementedError

    def tensors(self, segments: Segments, table: list[TableEntry], base: BaseTensors, entry: TaskEntry,
                device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """The task's full tensors on `device`, one at a time (so a caller copying them into a model
        never holds two copies), from its arrays read front to back and its base."""
        raise NotImplementedError

    #: Whether the kind implements `edits`; a switch to a task of a kind that does not rewrites
    #: its tensors whole (as a load makes them), keeping what they overwrite.
    describes_edits: ClassVar[bool] = False

    def edits(self, segments: Segments, table: list[TableEntry], entry: TaskEntry,
              device: torch.device) -> Iterator[Edit]:
        """The task as changes to its base, one tensor at a time, from its arrays read front to back:
        one Edit per name of `output_names` except the base tensors it leaves as they are."""
        raise NotImplementedError

    def output_names(self, table: list[TableEntry], base_names: list[str]) -> list[str]:
        """The names of the tensors `tensors` yields: by default, those of the task's table."""
        return [t["name"] for t in table]

    def unmerged(self, segments: Segments, table: list[TableEntry], entry: TaskEntry, device: torch.device) -> Any:
        """The task without its base (e.g. LoRA factors), for kinds whose `has_unmerged` is true."""
        raise NotImplementedError

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        """The per-task setting `ls` shows: {"keep": m} or {"q": q}."""
        return {}

    def describe(self, info: Mapping[str, Any]) -> str:
        """One line for `add-task` to print about a written task, from `Store.info(task)`."""
        raise NotImplementedError

    def export(self, fmt: str, unmerged: Any, out: str) -> list[str]:
        """Write the unmerged task in native format `fmt` (a key of `export_formats`) into `out`."""
        raise NotImplementedError


__all__ = ["TaskKind", "BaseTensors", "WithOtherBases", "Edit", "Replace"]
