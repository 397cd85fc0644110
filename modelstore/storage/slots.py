"""Compare-and-swap of the manifest, one way per kind of filesystem (spec/FORMAT.md, "Commits").

A slot reads the manifest together with a version token and replaces it only if the token still
holds, so two writers that read the same manifest cannot both publish: one wins, the other sees a
conflict, re-reads and tries again. How the condition is enforced is the filesystem's business:

- local disks: an exclusive `flock` held only for read-compare-replace; the kernel drops it when
  its holder dies, so a killed writer never blocks the others;
- S3: conditional PUT (`If-Match` on the ETag read, `If-None-Match: *` for the first manifest);
- `memory://`: a lock of this process (the filesystem lives in it);
- anything else: no condition (single writer), said by `conditional = False`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from modelstore.errors import StorageError

#: How long a writer waits for another's short read-compare-replace before giving up.
LOCK_TIMEOUT_S = 60.0
#: Reads of an S3 manifest that another writer keeps replacing between its HEAD and its GET.
READ_ATTEMPTS = 20

#: A writer's last check before it publishes (storage/commits.py: its payload is intact); it raises to stop
#: the publish. Called after the token compare while the lock is held where there is one.
Vouch = Callable[[], None]


class ManifestSlot:
    """Read the manifest with a version token; replace it only if the token still holds."""

    #: Whether `replace` is conditional (safe for many writers).
    conditional: ClassVar[bool] = True
    #: What `modelstore info` says about concurrent writers here.
    writers: ClassVar[str] = "many writers (compare-and-swap commits)"

    def read(self) -> tuple[bytes | None, Any]:
        """The manifest's bytes (None if there is none) and a token for `replace`."""
        raise NotImplementedError

    def replace(self, blob: bytes, token: Any, vouch: Vouch | None = None) -> bool:
        """Write `blob` as the manifest if it is still the version `token` names (None: absent),
        calling `vouch` right before the write (inside the lock where there is one).

        Returns False on a conflict; raises on other failures (the write may or may not have
        happened: the caller re-reads to find out) and whatever `vouch` raises (nothing written).
        """
        raise NotImplementedError

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every publish while inside (the lock `replace` takes; a no-op where there is
        none, such as S3, whose writers and gc rely on payload leases instead: leases.py)."""
        yield


def _digest(blob: bytes | None) -> str | None:
    return None if blob is None else hashlib.sha256(blob).hexdigest()


class LocalSlot(ManifestSlot):
    """A manifest file on a local (POSIX) disk."""

    def __init__(self, path: str):
        self.path = path
        self.lock = os.path.join(os.path.dirname(path), ".manifest.lock")

    def read(self) -> tuple[bytes | None, Any]:
        try:
            with open(self.path, "rb") as fh:
                blob = fh.read()
        except FileNotFoundError:
            blob = None
        return blob, _digest(blob)

    def replace(self, blob: bytes, token: Any, vouch: Vouch | None = None) -> bool:
        with self.exclusive():
            if self.read()[1] != token:
                return False
            if vouch is not None:
                vouch()
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "xb") as fh:
                    fh.write(blob)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return True

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            self._lock(fd)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _lock(self, fd: int) -> None:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise StorageError(f"{self.lock}: another writer has held the manifest lock for over "
                                       f"{LOCK_TIMEOUT_S:.0f} s; is it stuck? Retry later") from None
                time.sleep(0.01)


class S3Slot(ManifestSlot):
    """A manifest object on S3 (s3fs): the ETag is the token, PUT is conditional on it."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        #: the LastModified of the object last read (the store's clock; leases.py)
        self.modified: Any = None

    def read(self) -> tuple[bytes | None, Any]:
        for attempt in range(READ_ATTEMPTS):
            self.fs.invalidate_cache(self.path)
            try:
                with self.fs.open(self.path, "rb") as fh:  # the body is fetched If-Match the ETag it reports
                    self.modified = fh.details.get("LastModified")
                    return fh.read(), fh.details["ETag"]
            except FileNotFoundError:
                return None, None
            except OSError as e:  # replaced between the HEAD and the GET (s3fs's FileExpired): read again
                if not _precondition_failed(e) or attempt == READ_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def replace(self, blob: bytes, token: Any, vouch: Vouch | None = None) -> bool:
        if vouch is not None:
            vouch()
        try:
            if token is None:
                self.fs.pipe_file(self.path, blob, mode="create")
            else:
                self.fs.pipe_file(self.path, blob, IfMatch=token)
        except FileExistsError:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True


def _precondition_failed(e: OSError) -> bool:
    """An S3 condition (If-Match / If-None-Match) that did not hold, as s3fs reports it."""
    text = str(e)
    return type(e).__name__ == "FileExpired" or any(
        s in text for s in ("pre-condition", "PreconditionFailed", "412", "ETag"))


class ProcessLockedSlot(ManifestSlot):
    """A filesystem living in this process (`memory://`): a process-wide lock makes replace atomic."""

    _lock = threading.Lock()

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes | None, Any]:
        try:
            blob = self.fs.cat_file(self.path)
        except FileNotFoundError:
            blob = None
        return blob, _digest(blob)

    def replace(self, blob: bytes, token: Any, vouch: Vouch | None = None) -> bool:
        with self._lock:
            if self.read()[1] != token:
                return False
            if vouch is not None:
                vouch()
            self.fs.pipe_file(self.path, blob)
            return True

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            yield


class UnconditionalSlot(ProcessLockedSlot):
    """A filesystem with no conditional write: safe for one writer process at a time only."""

    conditional = False
    writers = "single writer (this filesystem has no conditional write; run one writer at a time)"


def slot_for(fs: Any, path: str, local: bool) -> ManifestSlot:
    """The slot that makes manifest replaces conditional on filesystem `fs`."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if local:
        return LocalSlot(path)
    if {"s3", "s3a"} & set(protocols):
        return S3Slot(fs, path)
    if "memory" in protocols:
        return ProcessLockedSlot(fs, path)
    return UnconditionalSlot(fs, path)


__all__ = ["Vouch", "ManifestSlot", "LocalSlot", "S3Slot", "ProcessLockedSlot", "UnconditionalSlot", "slot_for"]
