"""Task kinds: how a task is kept next to a base. Add a kind: one module, one entry in KINDS,
one section in spec/FORMAT.md."""

from __future__ import annotations

from modelstore.errors import CorruptStoreError, InputError
from modelstore.kinds.base import TaskKind, WithOtherBases
from modelstore.kinds.exact import Exact
from modelstore.kinds.fft.sparse_delta import FFTOptions, SparseDelta
from modelstore.kinds.lora.low_rank import (
    AdapterInput,
    LoraOptions,
    LowRankAdapter,
    StoredAdapter,
)
from modelstore.kinds.masks.bit_delta import BitDelta
from modelstore.kinds.masks.vector_masks import EMRMask, TallMask

KINDS: list[TaskKind] = [SparseDelta(), LowRankAdapter(), TallMask(), EMRMask(), BitDelta(), Exact()]


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


def checkpoint_kinds() -> list[str]:
    """The kinds `add-task` / `build` make from a full fine-tuned checkpoint (`--kind`)."""
    return [k.name for k in KINDS if k.from_checkpoint]


def checkpoint_kind(name: str) -> TaskKind:
    """The kind a user named for a full fine-tuned checkpoint.

    Raises:
        InputError: no such kind, or one that takes another input (LoRA adapters: `--lora`).
    """
    for k in KINDS:
        if k.name == name and k.from_checkpoint:
            return k
    raise InputError(f"--kind must be one of {', '.join(checkpoint_kinds())}, not {name!r}"
                     + (" (LoRA adapters are added with --lora)" if name in kind_names() else ""))


__all__ = ["TaskKind", "WithOtherBases", "KINDS", "kind_names", "get_kind", "checkpoint_kinds", "checkpoint_kind",
           "TallMask", "EMRMask", "BitDelta", "Exact", "SparseDelta", "LowRankAdapter", "FFTOptions",
           "LoraOptions", "AdapterInput", "StoredAdapter"]
