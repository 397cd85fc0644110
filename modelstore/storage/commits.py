"""The commit protocol: optimistic concurrency on the manifest (spec/FORMAT.md, section 9).

A writer puts its payload under a fresh directory, then publishes a new manifest only if the
manifest is still the one it read (compare-and-swap, storage/slots.py). On a conflict it re-reads,
re-applies its change to the newer manifest (the change itself decides whether that is still
valid: another task added or removed is fine; its own task taken meanwhile, or its base replaced,
is a ConflictError) and retries with jittered backoff, a bounded number of times. Each manifest
records a generation and the writer's id and transaction, so a writer whose answer was lost can
re-read and tell whether its publish won. Payload directories the published manifest no longer
references (a replaced or removed task) are deleted by the writer that unreferenced them; a writer
never deletes a directory it did not create or unreference.

A writer never publishes a payload it cannot vouch for: right before its publish (inside the
commit lock, where gc deletes too; on S3 after renewing its lease, storage/leases.py) it checks
that every file of its payload is still there. Only the files the payload's own metadata says it
has are checked, by one listing and their sizes, not by reading them back: gc deletes whole files,
so a missing or emptied one is what it leaves, and a listing costs little however large the task.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import time
import uuid
import warnings
from collections.abc import Callable

import zarr

from modelstore.errors import (
    ConflictError,
    CorruptStoreError,
    ModelStoreError,
    SingleWriterWarning,
    StorageError,
)
from modelstore.format.manifest import (
    FORMAT_VERSION,
    Manifest,
    PayloadFields,
    new_manifest,
    now,
    payload_paths,
    seal,
    table_digest,
)
from modelstore.storage import Location
from modelstore.storage.leases import Lease, PayloadLostError
from modelstore.storage.slots import Vouch

#: Publishing attempts before a writer gives up (each re-reads the manifest and re-applies its change).
MAX_ATTEMPTS = 12
#: The first and the longest pause between attempts, in seconds; each pause is jittered.
BACKOFF_S, MAX_BACKOFF_S = 0.02, 2.0

#: This process as a writer: host, pid and a random part (pids are reused).
WRITER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

Change = Callable[[Manifest], Manifest]


class UncertainCommit(StorageError):
    """The publish failed in a way that leaves unknown whether it happened; keep the payload."""


def commit(loc: Location, change: Change, *, create: bool = False, payload: str | None = None,
           lease: Lease | None = None) -> Manifest:
    """Apply `change` to the store's current manifest and publish the result atomically.

    `change` gets a private copy of the latest manifest (a new, empty one when `create` and there
    is none) and returns the manifest to publish; it raises to refuse (TaskExistsError,
    ConflictError...). It may be called several times, once per attempt. `payload` is the
    directory of this writer's new base or task and `lease` its lease: both are checked right
    before each publish.

    Raises:
        ConflictError: every attempt lost to other writers.
        PayloadLostError: `payload` lost files or `lease` was broken (by gc); nothing was published.
        UncertainCommit: the last publish failed without telling whether it happened.
    """
    if not loc.slot.conditional:
        warnings.warn(f"{loc.url}: {loc.slot.writers}", SingleWriterWarning, stacklevel=3)
    error: Exception | None = None
    for attempt in range(MAX_ATTEMPTS):
        current, token = loc.read_manifest_versioned()
        if current is None:
            if not create:
                loc.require_manifest()  # raises StoreNotFoundError
            loc.create_root_group({"modelstore": {"format_version": FORMAT_VERSION}})
        base = new_manifest() if current is None else current
        new = change(copy.deepcopy(base))
        if new == base and current is not None:
            return current  # nothing to publish
        txn = uuid.uuid4().hex
        new["generation"] = base.get("generation", 0) + 1
        new["writer"] = {"id": WRITER_ID, "txn": txn, "time": now()}
        blob = seal(new)
        obsolete = sorted(payload_paths(current) - payload_paths(new))
        try:
            with loc.errors("publish manifest.json"):
                if loc.publish(blob, token, obsolete, _voucher(loc, new, payload, lease)):
                    return new
            error = None
        except StorageError as e:
            error = e
            try:  # did the publish happen although its answer was lost?
                won, _ = loc.read_manifest_versioned()
            except ModelStoreError:
                won = None
            if won is not None and won.get("writer", {}).get("txn") == txn:
                return won
        time.sleep(random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2 ** attempt)))
    if error is not None:
        raise UncertainCommit(f"{error}; if it did not publish, rerun the command") from None
    raise ConflictError(f"{loc.url}: gave up after {MAX_ATTEMPTS} attempts: other writers kept changing the "
                        "manifest; retry")


def _voucher(loc: Location, new: Manifest, payload: str | None, lease: Lease | None) -> Vouch | None:
    """The check that `payload`, as `new` lists it, is whole, then the renewal of its lease."""
    entry = next((e for e in [*new["bases"].values(), *new["tasks"].values()] if e["path"] == payload), None)
    if entry is None or loc.stages_locally:  # nothing new, or staged where no gc reaches it (the Hub)
        return None
    found = entry

    def vouch() -> None:
        problem = payload_problem(loc, found)
        if problem:
            raise PayloadLostError(f"{loc.url}: {payload}, the payload this writer was about to publish, {problem} "
                                   "(deleted by `modelstore gc --force`?); nothing was published, write it again")
        if lease is not None:
            lease.confirm()

    return vouch


def payload_problem(loc: Location, entry: PayloadFields) -> str | None:
    """What is missing from payload `entry` (None: nothing): its group and array metadata, every
    chunk its arrays' counts need (each more than its 4-byte checksum) and its model files (their
    sizes), found by reading its metadata and one listing."""
    rel = entry["path"]
    expected: dict[str, int] = {}  # file -> the least size it may have
    with loc.errors(f"check {rel}"):
        try:
            group = loc.open_group(rel)
            if table_digest(group.attrs.get("tensors", [])) != entry["table_sha256"]:
                return "has a changed tensor table"
            for name, info in entry["arrays"].items():
                array = group[name]
                if not isinstance(array, zarr.Array):
                    raise KeyError(name)
                expected[f"{name}/zarr.json"] = 1
                for i in range(-(-info["count"] // array.chunks[0])):
                    expected[f"{name}/{array.metadata.encode_chunk_key((i,))}"] = 5
        except (CorruptStoreError, KeyError, FileNotFoundError):
            return "lost its metadata"
        for name, kept in entry.get("files", {}).items():  # type: ignore[attr-defined]
            expected[f"files/{name}"] = kept["bytes"]
        have = loc.files(rel)
    gone = sorted(f for f, least in expected.items() if have.get(f, -1) < least)
    return f"lost {len(gone)} of its {len(expected)} files ({', '.join(gone[:2])}...)" if gone else None


__all__ = ["commit", "payload_problem", "PayloadLostError", "Change", "UncertainCommit", "WRITER_ID", "MAX_ATTEMPTS"]
