"""Copying a store to another location (local, s3://, memory://, hf://...), a task at a time.

A payload directory is copied file by file into a fresh directory of the destination, each
file's size checked against the source, and only then is the copied entry written into the
destination's manifest: the same commit rule as any write, so an interrupted sync leaves every
task it finished readable and no partial task visible (a half-copied directory is an orphan that
the next write of that task removes).
Entries are compared by content (tensor-table digest and per-array checksums), so a task already
at the destination is not copied again, whatever directory it sits in.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from modelstore.errors import (
    ConflictError,
    CorruptStoreError,
    InputError,
    TaskNotFoundError,
)
from modelstore.format.manifest import Manifest, PayloadFields, TaskEntry, same_content, task_bases
from modelstore.format.paths import check_task_name, new_payload_dir
from modelstore.kinds import TaskKind, get_kind
from modelstore.storage import Location
from modelstore.storage.commits import UncertainCommit, commit
from modelstore.storage.integrity import verify_payload

COPY_BLOCK = 8 << 20
"""Bytes read and written per call when streaming one file."""
COPY_THREADS = 8
"""Files copied at once: object stores answer many small requests in parallel."""


@dataclass
class SyncReport:
    """What a sync did (or, with dry_run, would do)."""

    copied: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bases_copied: list[str] = field(default_factory=list)
    bytes_to_copy: int = 0
    """Array bytes of what is copied, from the source's manifest (known before copying; the
    copy also carries each payload's small zarr.json metadata files)."""
    bytes_copied: int = 0
    vanished: list[str] = field(default_factory=list)
    """Tasks another writer removed from the source while the sync ran: not copied."""
    repaired: list[str] = field(default_factory=list)
    """Destination tasks (and `base <id>`s) whose content matched the source's but failed their
    checksums there: copied again."""
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (`modelstore sync --json`)."""
        return asdict(self)


def sync(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, tasks: Sequence[str] | None = None,
         delete: bool = False, dry_run: bool = False,
         src_options: Mapping[str, Any] | None = None, dst_options: Mapping[str, Any] | None = None,
         on_bytes: Callable[[int], None] | None = None) -> SyncReport:
    """Make the store at `dst` hold `src`'s tasks (all, or `tasks`), creating it if needed.

    Bases that the copied tasks sit on come along; a base the destination already has must hold
    the same tensors (tasks of one merged base do not apply to another). A destination task whose
    content differs from the source's is replaced. `delete` also removes the destination's tasks
    that `src` lacks (only with `tasks` unset).

    >>> modelstore.sync("store", "s3://bucket/store")

    Args:
        src, dst: store locations (paths or fsspec URLs); `dst` is created if it holds no store.
        tasks: copy only these tasks and the bases they sit on (default: all).
        delete: make `dst` a mirror (not with `tasks`).
        dry_run: report what would be copied; write nothing.
        src_options, dst_options: fsspec options of each side.
        on_bytes: called with each number of bytes copied (a progress bar).

    Returns:
        What was copied, found up to date and deleted.

    Raises:
        InputError: `dst` has a different base, is `src` itself, or bad arguments.
        TaskNotFoundError: `src` lacks a named task. CorruptStoreError: a source payload is missing.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if delete and tasks is not None:
        raise InputError("--delete mirrors the whole store; it cannot be combined with --task")
    src_loc = Location(src, src_options)
    source = src_loc.require_manifest()
    src_tasks, src_bases = source["tasks"], source["bases"]
    names = sorted(src_tasks) if tasks is None else list(dict.fromkeys(tasks))
    for name in names:
        if check_task_name(name) not in src_tasks:
            raise TaskNotFoundError(f"{src} has no task {name!r}; `modelstore ls {src}` lists them")
    bases = (list(src_bases) if tasks is None
             else list(dict.fromkeys(b for n in names for b in task_bases(src_tasks[n]))))

    dest_loc = Location(dst, dst_options, read_only=dry_run)
    dest_manifest = dest_loc.read_manifest()  # refuses a newer format, or someone else's manifest.json
    if dest_manifest is None:
        dest_loc.require_bucket()
    if dest_manifest is not None and src_loc.same_place(dest_loc):
        raise InputError(f"{src} and {dst} are the same store; give another destination")
    have_bases = dest_manifest["bases"] if dest_manifest else {}
    have_tasks = dest_manifest["tasks"] if dest_manifest else {}
    for b in bases:
        if b in have_bases and not same_content(have_bases[b], src_bases[b]):
            raise InputError(f"{dst} already has a different {b!r} base than {src}: the tasks of one do not "
                             "apply to the other; sync into a new location, or remove the destination first")

    report = SyncReport(dry_run=dry_run)
    todo = []
    for name in names:
        entry, have = src_tasks[name], have_tasks.get(name)
        if have is not None and task_bases(have) == task_bases(entry) and same_content(have, entry):
            if _sound(dest_loc, have, f"task {name!r}", get_kind(have["kind"])):
                report.up_to_date.append(name)
                continue
            report.repaired.append(name)
        todo.append(name)
    for b in bases:
        if b in have_bases and not _sound(dest_loc, have_bases[b], f"base {b!r}", None):
            report.repaired.append(f"base {b}")
    report.bases_copied = [b for b in bases if b not in have_bases or f"base {b}" in report.repaired]
    report.copied = todo
    report.bytes_to_copy = (sum(src_bases[b]["bytes"] for b in report.bases_copied)
                            + sum(src_tasks[t]["bytes"] for t in todo))  # fmt: skip
    report.deleted = sorted(set(have_tasks) - set(src_tasks)) if delete else []
    if dry_run:
        return report

    dest = Location(dst, dst_options, read_only=False)
    progress = on_bytes or (lambda n: None)
    for b in report.bases_copied:
        report.bytes_copied += _copy_entry(src_loc, dest, f"base {b!r}", src_bases[b], None, _put_base(b))
    for name in todo:
        current: TaskEntry | None = src_tasks[name]
        while current is not None:
            try:
                report.bytes_copied += _copy_entry(src_loc, dest, f"task {name!r}", current, get_kind(current["kind"]),
                                                   _put_task(name), progress)
                break
            except CorruptStoreError:  # missing at the source: damage, or another writer replaced or removed it
                fresh = src_loc.require_manifest()["tasks"].get(name)
                if fresh is not None and fresh["path"] == current["path"]:
                    raise
                current = fresh
        if current is None:
            report.copied.remove(name)
            report.vanished.append(name)
    for name in report.deleted:
        commit(dest, _drop_task(name))
    return report


def _drop_task(name: str) -> Callable[[Manifest], Manifest]:
    def drop(m: Manifest) -> Manifest:
        m["tasks"].pop(name, None)
        return m
    return drop


def _put_base(base_id: str) -> Callable[[Manifest, PayloadFields], Manifest]:
    def put(m: Manifest, entry: PayloadFields) -> Manifest:
        have = m["bases"].get(base_id)
        if have is not None and not same_content(have, entry):
            raise ConflictError(f"another writer put a different {base_id!r} base in the destination meanwhile")
        m["bases"][base_id] = entry  # type: ignore[assignment]  # new, or a sound copy of a damaged one
        return m
    return put


def _put_task(name: str) -> Callable[[Manifest, PayloadFields], Manifest]:
    def put(m: Manifest, entry: PayloadFields) -> Manifest:
        m["tasks"][name] = entry  # type: ignore[assignment]
        return m
    return put


def _sound(loc: Location, entry: PayloadFields, what: str, kind: TaskKind | None) -> bool:
    """Whether a destination payload reads back intact (its content already equals the source's)."""
    try:
        verify_payload(loc, entry, what, kind)
    except CorruptStoreError:
        return False
    return True


def _copy_entry(src: Location, dst: Location, what: str, entry: PayloadFields, kind: TaskKind | None,
                put: Callable[[Manifest, PayloadFields], Manifest],
                on_bytes: Callable[[int], None] = lambda n: None) -> int:
    """Copy one payload into a fresh directory of `dst`, verify the copy, commit its entry there.

    Raises:
        CorruptStoreError: the source payload is damaged (the copy is removed, nothing committed).
    """
    target, n = _copy_payload(src, dst, entry["path"], on_bytes)
    copied = {**entry, "path": target}
    try:
        try:
            verify_payload(dst, copied, what, kind)  # type: ignore[arg-type]
        except CorruptStoreError:
            verify_payload(src, entry, what, kind)  # raises if the source itself is damaged
            raise CorruptStoreError(f"{dst.url}: {what} was damaged in transit; rerun the sync") from None
        commit(dst, lambda m: put(m, copied), create=True)  # type: ignore[arg-type]
    except UncertainCommit:
        raise
    except BaseException:
        dst.discard(target)
        raise
    return n


def _copy_payload(src: Location, dst: Location, rel: str, on_bytes: Callable[[int], None]) -> tuple[str, int]:
    """Copy payload directory `rel` (``bases/<id>/<dir>`` or ``tasks/<name>/<dir>``) into a fresh
    directory beside where it would go, with the group metadata above it; return the new
    directory and the bytes copied. A live payload is never written over."""
    target = new_payload_dir(rel.rsplit("/", 1)[0])
    root = src.path(rel)
    files = src.payload_files(rel)  # refuses symbolic links: a copy never takes bytes from outside the store
    if not files:
        raise CorruptStoreError(f"{src.url}: {rel} is listed in the manifest but missing; the store is damaged")
    jobs = [(path, f"{target}/{path[len(root):].lstrip('/')}", size) for path, size in sorted(files.items())]
    parts = rel.split("/")
    with src.errors("read group metadata"):
        for i in range(len(parts) - 1, 0, -1):  # tasks/zarr.json, tasks/<name>/zarr.json: group metadata
            meta = "/".join(parts[:i]) + "/zarr.json"
            src.refuse_links(meta)
            if src.fs.exists(src.path(meta)) and not dst.fs.exists(dst.path(meta)):
                jobs.append((src.path(meta), meta, int(src.fs.size(src.path(meta)))))
    total = 0
    try:
        with dst.errors(f"copy {rel}"), concurrent.futures.ThreadPoolExecutor(COPY_THREADS) as pool:
            for done in concurrent.futures.as_completed([pool.submit(_copy_file, src, dst, *job) for job in jobs]):
                try:
                    n = done.result()
                except FileNotFoundError:  # removed meanwhile: the caller re-reads the source's manifest
                    raise CorruptStoreError(f"{src.url}: a file of {rel} went missing while it was copied") from None
                on_bytes(n)  # here, not in the workers: progress bars are not thread-safe
                total += n
    except BaseException:
        dst.discard(target)
        raise
    return target, total


def _copy_file(src: Location, dst: Location, source: str, rel: str, size: int) -> int:
    n = 0
    with src.fs.open(source, "rb") as r, dst.open_write(rel) as w:
        while block := r.read(COPY_BLOCK):
            w.write(block)
            n += len(block)
    if n != size:
        raise CorruptStoreError(f"{source}: read {n} bytes, the listing says {size}; the copy was stopped")
    return n


__all__ = ["sync", "SyncReport"]
