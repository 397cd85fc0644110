"""Garbage collection: payload directories that no manifest references, and writers' leftovers.

Writers leave such directories only when they are killed between writing a payload and publishing
it (a failed write deletes its own). gc removes one only when its lease has expired (or it has
none) and its newest file is older than a grace period, and removes it inside the commit lock (local
disks) or after breaking its lease (S3), so a payload its writer is still writing, waiting to
publish or publishing is never touched (storage/leases.py, storage/commits.py). A grace under
`SAFE_GRACE_S` needs `force`, as Delta Lake's VACUUM refuses a short retention: the lease guards
a live writer, the grace guards against clocks that disagree and writers that do not lease.

It also removes what killed processes leave beside payloads: temporary manifests
(`manifest.json.<hex>.tmp`), zarr's temporary metadata files (`zarr.<hex>.partial`), expired
leases of payloads that are gone or published, and task or base folders left holding nothing but
their group metadata, each under the same grace.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from modelstore.errors import InputError
from modelstore.format.manifest import payload_paths
from modelstore.format.paths import BASES, GROUP_META, TASKS, is_payload_dir
from modelstore.storage import Location
from modelstore.storage.leases import SUFFIX, break_lease, lease_path, lease_state

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The shortest grace gc accepts without `force`.
SAFE_GRACE_S = 600.0
#: Temporary files of killed writers: the manifest's (slots.py) and zarr's metadata (zarr.json).
_ZARR_TEMP = re.compile(r"zarr\.[0-9a-f]{32}\.partial")
_TEMP_FILE = re.compile(r"manifest\.json\.[0-9a-f]{32}\.tmp|" + _ZARR_TEMP.pattern)
#: The youngest zarr temporary file gc removes, whatever the grace: zarr writes a group's zarr.json
#: to one and renames it, outside the commit lock, so a forced gc at grace 0 that deleted a fresh
#: one failed a live writer's rename (a task folder's group, made as its first payload starts).
#: A live writer holds one for the milliseconds of a small write.
ZARR_TEMP_MIN_AGE_S = 60.0


def parse_duration(text: str) -> float:
    """Seconds in "0s", "90", "30m", "1h", "2d".

    Raises:
        InputError: not a duration.
    """
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise InputError(f"--grace takes a duration such as 0s, 30m, 1h or 2d, not {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def check_grace(grace_s: float, force: bool) -> None:
    """Refuse a grace under SAFE_GRACE_S unless forced.

    Raises:
        InputError: the grace is too short and not `force`.
    """
    if grace_s < SAFE_GRACE_S and not force:
        raise InputError(f"a grace of {grace_s:g} s is under the {SAFE_GRACE_S / 60:g}-minute safety floor "
                         "(payloads of writers at work could go); pass --force (force=True) if no writer "
                         "without a lease is running")


@dataclass
class GcReport:
    """What was removed (or, with dry_run, would be): unreferenced payload directories and
    leftovers (temporary files, stale leases, empty folders); the payloads kept because they are
    younger than the grace period or leased by a writer at work; and the bytes freed."""

    removed: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    kept_young: list[str] = field(default_factory=list)
    kept_leased: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    grace_s: float = 0.0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (`modelstore gc --json`)."""
        return asdict(self)


def collect(loc: Location, grace_s: float, dry_run: bool = False, force: bool = False) -> GcReport:
    """Remove what no manifest references and no live lease holds, older than `grace_s`.

    Raises:
        InputError: `grace_s` is under SAFE_GRACE_S without `force` (a dry run may go lower).
    """
    if not dry_run:
        check_grace(grace_s, force)
    gc = _Collector(loc, grace_s, GcReport(grace_s=grace_s, dry_run=dry_run))
    gc.temp_files("")
    for top in (BASES, TASKS):
        gc.temp_files(top)
        for owner, entry in loc.entries(top).items():
            if entry.is_dir:
                gc.folder(f"{top}/{owner}", entry.mtime)
    for found in (gc.report.removed, gc.report.leftovers, gc.report.kept_young, gc.report.kept_leased):
        found.sort()
    return gc.report


class _Collector:
    """One run of gc: its clock, the manifest's payloads when it started, and its report."""

    def __init__(self, loc: Location, grace_s: float, report: GcReport):
        self.loc, self.grace_s, self.report = loc, grace_s, report
        self.live = payload_paths(loc.require_manifest())
        self.now = time.time()

    def old(self, stamp: float | None) -> bool:
        """Older than the grace; of unknown age, only with no grace or on the Hub (where unpublished
        payloads are staged off the location, so an unreferenced one is never in flight)."""
        if stamp is None:
            return self.grace_s <= 0 or self.loc.stages_locally
        return self.now - stamp >= self.grace_s

    def folder(self, parent: str, made: float | None) -> None:
        """The payloads, leases and temporary files in one task or base folder (written at `made`);
        then the folder, if that leaves nothing in it but its group metadata."""
        loc, report = self.loc, self.report
        entries = loc.entries(parent)
        uids = {n for n in entries if is_payload_dir(n)} | \
            {n[:-len(SUFFIX)] for n in entries if n.endswith(SUFFIX) and is_payload_dir(n[:-len(SUFFIX)])}
        for uid in sorted(uids):
            rel = f"{parent}/{uid}"
            lease = lease_state(loc, rel, self.now) if uid + SUFFIX in entries else None
            if rel in self.live:
                if lease is not None and lease[0] != "live":  # its writer published it and was killed
                    self.remove_file(lease_path(rel), locked=False)
            elif lease is not None and lease[0] == "live":
                report.kept_leased.append(rel)
            elif uid in entries and not self.old(loc.newest(rel)):
                report.kept_young.append(rel)
            else:
                self.payload(rel, uid in entries, lease)
        self.temp_files(parent)
        rest = entries if report.dry_run else loc.entries(parent)
        if set(rest) <= {GROUP_META} and not any(p.startswith(parent + "/") for p in self.live) \
                and self.old(rest[GROUP_META].mtime if rest else made):
            report.leftovers.append(parent + "/")
            if not report.dry_run:
                loc.remove_empty(parent)

    def payload(self, rel: str, exists: bool, lease: tuple[str, Any] | None) -> None:
        """Remove unreferenced payload `rel` (if it `exists`) and its lease: inside the commit lock,
        after re-reading the manifest, and on S3 only once its lease is broken."""
        loc, report = self.loc, self.report
        if report.dry_run:
            if exists:
                report.removed.append(rel)
                report.bytes_freed += loc.size_of(rel)
            else:
                report.leftovers.append(lease_path(rel))
            return
        with loc.slot.exclusive():
            if rel in payload_paths(loc.require_manifest()):  # a writer published it meanwhile
                return
            if lease is not None and not break_lease(loc, rel, lease[1]):  # its writer renewed it meanwhile
                report.kept_leased.append(rel)
                return
            if exists:
                size = loc.size_of(rel)
                loc.remove_committed([rel])
                report.removed.append(rel)
                report.bytes_freed += size
        if lease is not None:
            self.remove_file(lease_path(rel), locked=False)

    def temp_files(self, parent: str) -> None:
        """Temporary files of killed writers directly under `parent`, older than the grace."""
        for name, entry in self.loc.entries(parent).items():
            young_zarr = _ZARR_TEMP.fullmatch(name) and (entry.mtime is None or
                                                         self.now - entry.mtime < ZARR_TEMP_MIN_AGE_S)
            if _TEMP_FILE.fullmatch(name) and self.old(entry.mtime) and not young_zarr:
                # inside the lock: a temporary manifest exists only while its writer holds it
                self.remove_file(f"{parent}/{name}" if parent else name, locked=True)

    def remove_file(self, rel: str, locked: bool) -> None:
        self.report.leftovers.append(rel)
        if self.report.dry_run:
            return
        if locked:
            with self.loc.slot.exclusive():
                self.loc.remove_file(rel)
        else:
            self.loc.remove_file(rel)


__all__ = ["parse_duration", "check_grace", "collect", "GcReport", "SAFE_GRACE_S"]
