"""Reading every stored byte back and checking it, without the original checkpoints.

`modelstore check` and `sync` use this: a payload is sound when its table matches the manifest's
digest and is consistent with its arrays, every chunk passes its crc32c, and every array matches
the count and digest the manifest records (chunks are fetched and checked, not decoded). `check`
then reads each task as a load does (the same checks of its table against its bases, the same
decoding), so a store it calls sound loads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from modelstore.errors import CorruptStoreError, ModelStoreError
from modelstore.format.manifest import Manifest, PayloadFields
from modelstore.format.payload import PayloadReader, base_problem
from modelstore.kinds import TaskKind, get_kind
from modelstore.storage import Location

#: A base's tensors as a task's table is checked against them: name -> (shape, dtype), in base order.
BaseSpecs = Mapping[str, tuple[list[int], str]]


def payload_reader(loc: Location, entry: PayloadFields, what: str, kind: TaskKind | None = None,
                   bases: Mapping[str, BaseSpecs] | None = None) -> PayloadReader:
    """The reader of a base's (`kind` None) or task's payload, the task's entry first checked by its
    kind, its table by its kind and against the `bases` it reads (id -> their tensors), where given.

    Raises:
        CorruptStoreError: the entry, the table or the group metadata is damaged.
    """
    what = f"{loc.url}: {what}"
    if kind is None:
        return PayloadReader(loc.open_group(entry["path"]), entry, what)
    problem = kind.check_entry(entry)  # type: ignore[arg-type]
    if problem:
        raise CorruptStoreError(f"{what}: {problem}; the manifest is damaged, restore it")
    reader = PayloadReader(loc.open_group(entry["path"]), entry, what, kind.array_dtypes(entry),  # type: ignore[arg-type]
                           kind.entry_kinds)
    problem = kind.check_table(reader.table, entry)  # type: ignore[arg-type]
    for b, specs in (bases or {}).items():
        if problem is None:
            problem = base_problem(reader.table, specs, kind.base_in_table_order)
            problem = problem and f"{problem}, base {b!r}"
    if problem:
        raise CorruptStoreError(f"{what}: the tensor table is inconsistent ({problem}); the store is damaged")
    return reader


def verify_payload(loc: Location, entry: PayloadFields, what: str, kind: TaskKind | None = None) -> None:
    """Read base or task payload `entry` whole and check every byte of it (with a base's model files).

    Raises:
        CorruptStoreError: naming `what` and the damaged array, file or field.
    """
    payload_reader(loc, entry, what, kind).verify()
    read_model_files(loc, entry, what)


def write_model_files(loc: Location, payload: str, files: Mapping[str, str | bytes]) -> dict[str, dict[str, Any]]:
    """Copy local files (name -> path, or name -> content) into `<payload>/files/`; return their
    manifest records."""
    kept = {}
    for name, where in sorted(files.items()):
        if isinstance(where, bytes):
            data = where
        else:
            with open(where, "rb") as fh:
                data = fh.read()
        with loc.open_write(f"{payload}/files/{name}") as out:
            out.write(data)
        kept[name] = {"sha256": "sha256:" + hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return kept


def read_model_files(loc: Location, entry: Mapping[str, Any], what: str) -> dict[str, bytes]:
    """The files a base (tokenizer, generation config) or task (its config.json) keeps beside its
    arrays, each checked.

    Raises:
        CorruptStoreError: a file is missing or fails its checksum.
    """
    out = {}
    for name, info in sorted(entry.get("files", {}).items()):
        rel = f"{entry['path']}/files/{name}"
        staged = loc.hub.stage(rel) if loc.hub is not None else None  # written, not yet committed (a sync's copy)
        if staged is not None and os.path.isfile(staged):
            with loc.errors(f"read {name}"), open(staged, "rb") as fh:
                data: bytes | None = fh.read()
        else:
            data = loc.read_bytes(rel)  # never through a symbolic link
        if data is None or "sha256:" + hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CorruptStoreError(f"{loc.url}: {what}: model file {name!r} is "
                                    f"{'missing' if data is None else 'damaged'}; restore the store or add it again")
        out[name] = data
    return out


@dataclass
class CheckReport:
    """What `check` found: the bases and tasks that read back sound, and the damaged ones with why."""

    url: str
    sound: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (`modelstore check --json`)."""
        return {**asdict(self), "ok": self.ok}


def check_store(loc: Location, manifest: Manifest, load: Callable[[str], None] | None = None) -> CheckReport:
    """Verify every base and task of the store and that it holds no symbolic link, then read each
    sound task with `load(task)` (as a load reads it); damage is reported, not raised."""
    report = CheckReport(url=loc.url)
    items: list[tuple[str, PayloadFields, TaskKind | None, str | None]] = [
        (f"base {b!r}", e, None, None) for b, e in sorted(manifest["bases"].items())]
    for t, e in sorted(manifest["tasks"].items()):
        try:
            items.append((f"task {t!r}", e, get_kind(e["kind"]), t))
        except CorruptStoreError as err:
            report.damaged[f"task {t!r}"] = str(err)
    for what, entry, kind, task in items:
        try:
            verify_payload(loc, entry, what, kind)
            if task is not None and load is not None:
                load(task)
        except ModelStoreError as e:  # damage, or an unreadable location: reported, not hidden
            report.damaged[what] = str(e)
        else:
            report.sound.append(what)
    try:  # a link outside the payloads too (group metadata, strays): sync and writers refuse it
        loc.refuse_links("", tree=True)
    except CorruptStoreError as e:
        if str(e) not in report.damaged.values():
            report.damaged["store"] = str(e)
    return report


__all__ = ["payload_reader", "verify_payload", "check_store", "CheckReport", "write_model_files", "read_model_files"]
