"""Leases on payloads in flight (spec/FORMAT.md, section 9): what keeps gc off a payload whose
writer has not published it yet, however long the writer waits.

The age of a payload's files cannot tell a dead writer's payload from one whose writer waits for
the commit lock or backs off between attempts. So before it makes its payload directory
`<parent>/<uid>`, a writer creates `<parent>/<uid>.lease` and renews it from a thread every
`ttl_s / 4` seconds until its commit or failure, then deletes it. gc never deletes a payload whose
lease is live (its file modified less than `ttl_s` ago, by the store's clock); a killed writer's
lease expires, and its payload is then collected after the grace like any other.

Where manifests are published without a lock (S3), a lease is compare-and-swapped like the
manifest: gc breaks an expired lease with a conditional overwrite before it deletes the payload,
and the writer renews conditionally right before it publishes, so only one of them can win. Under
a lock (local disks, `memory://`), gc deletes and the writer makes its last check inside the lock,
and the lease only keeps gc away while the writer is at work.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import TYPE_CHECKING, Any, Literal

from modelstore.errors import ConflictError, ModelStoreError, StorageError, is_io_error
from modelstore.storage.slots import S3Slot

if TYPE_CHECKING:
    from modelstore.storage import Location

#: Seconds a lease stays live after its last renewal (tests shorten it through the environment).
LEASE_S = float(os.environ.get("MODELSTORE_LEASE_S", "120"))
#: The longest `ttl_s` gc honours, so a damaged or hostile lease cannot pin a payload for ever.
MAX_LEASE_S = 3600.0
SUFFIX = ".lease"

State = Literal["live", "expired", "broken"]


class PayloadLostError(ConflictError):
    """The writer's unpublished payload was deleted or its lease broken (by gc) before its commit."""


def lease_path(payload: str) -> str:
    """`<parent>/<uid>.lease`: the lease file of payload directory `<parent>/<uid>`."""
    return payload + SUFFIX


def _cas(loc: Location, rel: str) -> S3Slot | None:
    """The compare-and-swap slot of lease file `rel` where manifests are published without a lock."""
    return S3Slot(loc.fs, loc.path(rel)) if isinstance(loc.slot, S3Slot) else None


class Lease:
    """This writer's lease on its payload `payload` at location `loc`, renewed from a thread until
    `release()`. Create it before the payload directory."""

    def __init__(self, loc: Location, payload: str, writer: str, ttl_s: float = LEASE_S):
        self.loc, self.payload, self.rel = loc, payload, lease_path(payload)
        self.writer, self.ttl_s = writer, ttl_s
        self._slot = _cas(loc, self.rel)
        self._token: Any = None
        self._renewals = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.lost = False
        with loc.errors(f"create {self.rel}"):
            if self._slot is not None:
                if not self._slot.replace(self._body(0), None):
                    raise ConflictError(f"{loc.url}: {self.rel} exists already; retry")
                self._token = self._slot.read()[1]
            else:
                with loc.open_write(self.rel) as fh:
                    fh.write(self._body(0))
        self._thread = threading.Thread(target=self._run, name="modelstore-lease", daemon=True)
        self._thread.start()

    def _body(self, n: int) -> bytes:
        return json.dumps({"writer": self.writer, "payload": self.payload, "ttl_s": self.ttl_s,
                           "renewal": n}).encode()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and not self.lost:
            with contextlib.suppress(ModelStoreError, OSError):  # a missed renewal is retried next time
                self.renew()

    def renew(self) -> None:
        """Renew the lease now; sets `lost` for good if gc broke or removed it.

        Raises:
            StorageError: the renewal failed for want of the storage (it is retried).
        """
        with self._lock:
            if not self.lost:
                self.lost = not (self._renew_cas() if self._slot is not None else self._renew_plain())

    def _renew_plain(self) -> bool:
        path = self.loc.path(self.rel)
        with self.loc.errors(f"renew {self.rel}"):
            try:
                if self.loc.local:
                    os.utime(path)
                elif self.loc.fs.exists(path):  # a single-writer filesystem: no race to lose
                    self.loc.fs.pipe_file(path, self._body(self._renewals + 1))
                else:
                    return False
            except FileNotFoundError:
                return False
        self._renewals += 1
        return True

    def _renew_cas(self) -> bool:
        assert self._slot is not None
        body = self._body(self._renewals + 1)
        with self.loc.errors(f"renew {self.rel}"):
            try:
                if not self._slot.replace(body, self._token):
                    return False
            except FileNotFoundError:  # If-Match on a lease gc removed
                return False
            except Exception as e:
                if not is_io_error(e):
                    raise
                # the answer may have been lost: the read below tells
            blob, token = self._slot.read()
        if blob is None or _broken(blob):
            return False
        if blob != body:
            raise StorageError(f"{self.loc.url}: could not renew {self.rel}; retrying")
        self._token = token
        self._renewals += 1
        return True

    def confirm(self) -> None:
        """Renew the lease right before a publish: then gc cannot break it for `ttl_s`.

        Raises:
            PayloadLostError: gc broke or removed the lease; the payload must not be published.
        """
        self.renew()
        if self.lost:
            raise PayloadLostError(f"{self.loc.url}: the lease on {self.payload} was broken while this writer "
                                   f"waited to commit (by `modelstore gc` with a short --grace and --force?); "
                                   "nothing was published, write it again")

    def release(self) -> None:
        """Stop renewing and delete the lease file (a leftover expires and gc removes it); once."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(ModelStoreError, OSError):
            with self.loc.errors(f"delete {self.rel}"):
                self.loc.fs.rm_file(self.loc.path(self.rel))


def _broken(blob: bytes) -> bool:
    try:
        return bool(json.loads(blob).get("broken"))
    except (ValueError, AttributeError):
        return False


def lease_state(loc: Location, payload: str, now: float) -> tuple[State, Any] | None:
    """The state of `payload`'s lease at time `now` and the token `break_lease` needs; None: none."""
    rel = lease_path(payload)
    slot = _cas(loc, rel)
    with loc.errors(f"read {rel}"):
        try:
            if slot is not None:
                blob, token = slot.read()
                modified = slot.modified
            else:
                blob, token = loc.fs.cat_file(loc.path(rel)), None
                modified = loc.mtime(rel)
        except FileNotFoundError:
            return None
    if blob is None:
        return None
    try:
        body = json.loads(blob)
        ttl = min(float(body.get("ttl_s", LEASE_S)), MAX_LEASE_S)
        if body.get("broken"):
            return "broken", token
    except (ValueError, TypeError, AttributeError):  # torn or foreign: live until it ages out
        ttl = LEASE_S
    stamp = modified.timestamp() if hasattr(modified, "timestamp") else modified
    live = stamp is None or now - float(stamp) < ttl
    return ("live" if live else "expired"), token


def break_lease(loc: Location, payload: str, token: Any) -> bool:
    """Mark an expired lease broken, if it is still the version `token` (on S3; under the commit
    lock elsewhere there is nothing to race). False: its writer renewed or deleted it meanwhile."""
    slot = _cas(loc, lease_path(payload))
    if slot is None:
        return True
    with loc.errors(f"break {lease_path(payload)}"):
        try:
            return slot.replace(json.dumps({"broken": True}).encode(), token)
        except FileNotFoundError:  # its writer deleted it meanwhile, having published or given up
            return False


__all__ = ["Lease", "PayloadLostError", "lease_path", "lease_state", "break_lease", "LEASE_S", "SUFFIX"]
