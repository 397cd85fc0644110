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

from .errors import ConflictError, ModelStoreError, SingleWriterWarning, StorageError
from .format.manifest import FORMAT_VERSION, Manifest, new_manifest, now, payload_paths, seal
from .storage import Location

#: Publishing attempts before a writer gives up (each re-reads the manifest and re-applies its change).
MAX_ATTEMPTS = 12
#: The first and the longest pause between attempts, in seconds; each pause is jittered.
BACKOFF_S, MAX_BACKOFF_S = 0.02, 2.0

#: This process as a writer: host, pid and a random part (pids are reused).
WRITER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

Change = Callable[[Manifest], Manifest]


class UncertainCommit(StorageError):
    """The publish failed in a way that leaves unknown whether it happened; keep the payload."""


def commit(loc: Location, change: Change, *, create: bool = False) -> Manifest:
    """Apply `change` to the store's current manifest and publish the result atomically.

    `change` gets a private copy of the latest manifest (a new, empty one when `create` and there
    is none) and returns the manifest to publish; it raises to refuse (TaskExistsError,
    ConflictError...). It may be called several times, once per attempt.

    Raises:
        ConflictError: every attempt lost to other writers.
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
                if loc.publish(blob, token, obsolete):
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


__all__ = ["commit", "Change", "UncertainCommit", "WRITER_ID", "MAX_ATTEMPTS"]
