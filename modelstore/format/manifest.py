"""The manifest and tensor tables as typed records, their checks and the table digest.

`manifest.json` is the commit point of a store (spec/FORMAT.md, section 2): a task exists exactly
when it is a key of `tasks`. The records stay plain dicts on the wire; the TypedDicts name their
fields for readers of the code and for type checkers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from typing import Any, TypedDict

from ..errors import CorruptStoreError, FormatVersionError, StoreNotFoundError

FORMAT_NAME = "modelstore"
FORMAT_VERSION = 1


class ArrayInfo(TypedDict):
    """What the manifest records per flat array: element count and CRC-32 of its content."""

    count: int
    crc32: int


class TableEntry(TypedDict, total=False):
    """One tensor of a base or task (spec section 3); kinds add their own fields."""

    name: str
    kind: str  # "dense" | "sparse" | "lowrank"
    shape: list[int]
    dtype: str
    array: str  # the flat array of a dense or lowrank entry
    start: int
    count: int


class PayloadFields(TypedDict):
    """Fields every base and task entry has, written by the payload writer."""

    path: str
    tensors: int
    table_sha256: str
    arrays: dict[str, ArrayInfo]
    bytes: int


class BaseEntry(PayloadFields, total=False):
    """A base: θ0 (`pretrained`) or the merge θ* (`merged`)."""

    kind: str
    merge: dict[str, Any]
    merged_tasks: list[str]
    selection: dict[str, str | None]
    source: dict[str, str]
    config_json: str | None
    nbytes: int
    created: str


class TaskEntry(PayloadFields, total=False):
    """A task: its kind (a key of the task-kind registry), the base it sits on, and what the kind records."""

    kind: str
    base: str
    method: str
    params: dict[str, Any]
    source: dict[str, str]
    kept: int
    total: int
    dense_tensors: int
    full_bytes: int
    adapter_config: dict[str, Any]


class Manifest(TypedDict):
    format: str
    version: int
    created: str
    bases: dict[str, BaseEntry]
    tasks: dict[str, TaskEntry]


def now() -> str:
    """UTC time stamp, to the second, as the manifest records it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_manifest() -> Manifest:
    """The manifest of an empty store."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": now(), "bases": {}, "tasks": {}}


def check_manifest(m: Any, url: str) -> Manifest:
    """`m` as a Manifest, if it is one this version reads.

    Raises:
        StoreNotFoundError: not a modelstore manifest.
        FormatVersionError: written by a newer format version.
        CorruptStoreError: its bases or tasks are not objects.
    """
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise StoreNotFoundError(f"{url} is not a modelstore store (its manifest.json is not ours)")
    v = m.get("version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise FormatVersionError(f"{url} has store format version {v}, newer than this modelstore reads "
                                 f"(version {FORMAT_VERSION}); upgrade modelstore")
    if not isinstance(m.get("bases"), dict) or not isinstance(m.get("tasks"), dict):
        raise CorruptStoreError(f"{url}: manifest.json lacks its bases or tasks; the store is damaged")
    return m  # type: ignore[return-value]


def table_digest(table: list[TableEntry]) -> str:
    """sha256 of a tensor table in canonical JSON, recorded in the manifest and checked on read."""
    blob = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def same_content(a: PayloadFields | BaseEntry | TaskEntry, b: PayloadFields | BaseEntry | TaskEntry) -> bool:
    """Whether two entries hold the same tensors: same table digest and the same count and CRC-32
    of every array, wherever their directories are."""
    return a.get("table_sha256") == b.get("table_sha256") and a.get("arrays") == b.get("arrays")


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ArrayInfo", "TableEntry", "PayloadFields", "BaseEntry", "TaskEntry",
           "Manifest", "now", "new_manifest", "check_manifest", "table_digest", "same_content"]
