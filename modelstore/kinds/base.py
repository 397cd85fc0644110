"""The interface every task kind implements.

A task kind owns one way of keeping a task next to a base: how it is written from its input
(`write`), rebuilt on a device (`materialize`), returned unmerged (`unmerged`), summarized for
`ls` / `info`, and exported in its own native format. The Store, the CLI and export know a task
only through its kind; the manifest records the kind's `name` in each task entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..format.manifest import BaseEntry, TableEntry, TaskEntry
from ..format.payload import PayloadWriter
from ..sources import TensorSource


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
    #: Native export formats besides "hf" (full weights), mapped to what they write.
    export_formats: ClassVar[Mapping[str, str]] = {}

    def base_id(self, bases: Mapping[str, BaseEntry], requested: str | None) -> str:
        """The base a new task of this kind sits on, given the store's bases and the user's choice."""
        raise NotImplementedError

    def check_entry(self, entry: TaskEntry) -> str | None:
        """What is wrong with a task entry's kind-specific fields (a damaged manifest), or None."""
        return None

    def array_dtypes(self, entry: TaskEntry) -> dict[str, str]:
        """Logical dtypes of the task's arrays whose names do not end in `.<dtype>`."""
        return {}

    def write(self, out: PayloadWriter, task: str, source: Any, base: TensorSource, base_entry: BaseEntry,
              options: Any, progress: bool) -> dict[str, Any]:
        """Compress `source` against `base` into `out`'s arrays and table.

        Returns the task entry's kind-specific fields (method, params, kept, total, ...); the
        Store adds the payload fields, `kind`, `base` and commits.
        """
        raise NotImplementedError

    def materialize(self, arrays: dict[str, torch.Tensor], table: list[TableEntry],
                    base: Mapping[str, torch.Tensor], entry: TaskEntry, device: torch.device,
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The task's full state dict on `device` from its arrays (already on `device`) and its base."""
        raise NotImplementedError

    def unmerged(self, arrays: dict[str, torch.Tensor], table: list[TableEntry], entry: TaskEntry,
                 device: torch.device) -> Any:
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


__all__ = ["TaskKind"]
