"""Task kinds: how a task is kept next to a base. Add a kind: one module, one entry in KINDS,
one section in spec/FORMAT.md."""

from __future__ import annotations

from ..errors import CorruptStoreError
from .base import TaskKind
from .low_rank import AdapterInput, LoraOptions, LowRankAdapter, StoredAdapter
from .sparse_delta import FFTOptions, SparseDelta

KINDS: list[TaskKind] = [SparseDelta(), LowRankAdapter()]


def kind_names() -> list[str]:
    """The `kind` values a store may record."""
    return [k.name for k in KINDS]


def get_kind(name: str) -> TaskKind:
    """The task kind a manifest entry names.

    Raises:
        CorruptStoreError: no such kind (a damaged manifest, or one written by a newer modelstore).
    """
    for k in KINDS:
        if k.name == name:
            return k
    raise CorruptStoreError(f"unknown task kind {name!r} (known: {', '.join(kind_names())}); the manifest is "
                            "damaged or was written by a newer modelstore")


__all__ = ["TaskKind", "KINDS", "kind_names", "get_kind", "SparseDelta", "LowRankAdapter", "FFTOptions",
           "LoraOptions", "AdapterInput", "StoredAdapter"]
