"""Reading every stored byte back and checking it, without the original checkpoints.

`modelstore check` and `sync` use this: a payload is sound when its table matches the manifest's
digest and is consistent with its arrays, every chunk passes its crc32c, and every array matches
the count and digest the manifest records (chunks are fetched and checked, not decoded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CorruptStoreError, ModelStoreError
from .format.manifest import Manifest, PayloadFields
from .format.payload import PayloadReader
from .kinds import TaskKind, get_kind
from .storage import Location


def payload_reader(loc: Location, entry: PayloadFields, what: str, kind: TaskKind | None = None) -> PayloadReader:
    """The reader of a base's (`kind` None) or task's payload, the task's entry first checked by its kind.

    Raises:
        CorruptStoreError: the entry, the table or the group metadata is damaged.
    """
    what = f"{loc.url}: {what}"
    array_dtypes = None
    if kind is not None:
        problem = kind.check_entry(entry)  # type: ignore[arg-type]
        if problem:
            raise CorruptStoreError(f"{what}: {problem}; the manifest is damaged, restore it")
        array_dtypes = kind.array_dtypes(entry)  # type: ignore[arg-type]
    return PayloadReader(loc.open_group(entry["path"]), entry, what, array_dtypes)


def verify_payload(loc: Location, entry: PayloadFields, what: str, kind: TaskKind | None = None) -> None:
    """Read base or task payload `entry` whole and check every byte of it (with a base's model files).

    Raises:
        CorruptStoreError: naming `what` and the damaged array, file or field.
    """
    payload_reader(loc, entry, what, kind).verify()
    read_model_files(loc, entry, what)


def write_model_files(loc: Location, payload: str, files: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Copy local files (name -> path) into `<payload>/files/`; return their manifest records."""
    kept = {}
    for name, path in sorted(files.items()):
        with open(path, "rb") as fh:
            data = fh.read()
        with loc.open_write(f"{payload}/files/{name}") as out:
            out.write(data)
        kept[name] = {"sha256": "sha256:" + hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return kept


def read_model_files(loc: Location, entry: Mapping[str, Any], what: str) -> dict[str, bytes]:
    """The files a base keeps beside its arrays (tokenizer, generation config), each checked.

    Raises:
        CorruptStoreError: a file is missing or fails its checksum.
    """
    out = {}
    for name, info in sorted(entry.get("files", {}).items()):
        data = loc.read_bytes(f"{entry['path']}/files/{name}")
        if data is None or "sha256:" + hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CorruptStoreError(f"{loc.url}: {what}: model file {name!r} is "
                                    f"{'missing' if data is None else 'damaged'}; restore the store or add the base again")
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


def check_store(loc: Location, manifest: Manifest) -> CheckReport:
    """Verify every base and task of the store, and that it holds no symbolic link; damage is
    reported, not raised."""
    report = CheckReport(url=loc.url)
    items: list[tuple[str, PayloadFields, TaskKind | None]] = [
        (f"base {b!r}", e, None) for b, e in sorted(manifest["bases"].items())]
    for t, e in sorted(manifest["tasks"].items()):
        try:
            items.append((f"task {t!r}", e, get_kind(e["kind"])))
        except CorruptStoreError as err:
            report.damaged[f"task {t!r}"] = str(err)
    for what, entry, kind in items:
        try:
            verify_payload(loc, entry, what, kind)
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
