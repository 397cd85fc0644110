"""A writer's payloads in flight and their commit (spec/FORMAT.md, section 9).

A payload directory is leased before it is made, so gc leaves it alone however long its writer
takes (storage/leases.py); a write that fails deletes it; its commit vouches for it, and ends its
lease whatever happens, deleting it unless the publish may have happened (storage/commits.py).
A writer may hold several payloads at once and commit one, discarding the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from modelstore._runtime.heap import release_free_memory
from modelstore.errors import InputError
from modelstore.format.manifest import Manifest
from modelstore.format.paths import new_payload_dir
from modelstore.format.payload import PayloadWriter
from modelstore.storage import Location
from modelstore.storage.commits import WRITER_ID, Change, UncertainCommit, commit
from modelstore.storage.leases import Lease

Filled = TypeVar("Filled")


class Transactions:
    """This writer's payloads at `loc` that are not yet committed or discarded."""

    def __init__(self, loc: Location):
        self.loc = loc
        self._leases: dict[str, Lease | None] = {}  # payload -> its lease (None: staged on the Hub)

    def new_payload(self, parent: str) -> PayloadWriter:
        """A new payload directory under `parent`, leased first so that gc leaves it alone until
        its commit or discard (not on the Hub, where it is staged off the location)."""
        rel = new_payload_dir(parent)
        self._leases[rel] = None if self.loc.stages_locally else Lease(self.loc, rel, WRITER_ID)
        try:
            return PayloadWriter(rel, self.loc.create_group(rel))
        except BaseException:
            self._end_lease(rel)
            raise

    def written(self, out: PayloadWriter, fill: Callable[[PayloadWriter], Filled]) -> Filled:
        """`fill(out)`; if it fails, `out` is discarded. Either way, what the write freed goes back
        to the kernel (modelstore/_runtime/heap.py)."""
        try:
            with self.loc.errors(f"write {out.path}"):
                return fill(out)
        except BaseException:
            out.abandon()
            self.discard(out.path)
            raise
        finally:
            release_free_memory()

    def discard(self, payload: str) -> None:
        """End the lease of `payload`, this writer's own uncommitted directory, then delete it (the
        lease first, so that a folder it leaves empty goes too).

        Raises:
            InputError: `payload` is not one of this writer's in flight.
        """
        self._own(payload)
        self._end_lease(payload)
        self.loc.discard(payload)

    def commit(self, change: Change, payload: str | None = None, *, create: bool = False) -> Manifest:
        """Publish `change` (commits.commit), vouching for `payload`, a directory of this writer's;
        on failure delete it, unless the publish may have happened. Either way its lease ends.

        Raises:
            InputError: `payload` is not one of this writer's in flight.
        """
        lease = self._leases.pop(self._own(payload)) if payload is not None else None
        try:
            return commit(self.loc, change, create=create, payload=payload, lease=lease)
        except UncertainCommit:
            raise
        except BaseException:
            if payload is not None:
                if lease is not None:
                    lease.release()  # first, so that the folder it leaves empty goes too
                self.loc.discard(payload)
            raise
        finally:
            if lease is not None:
                lease.release()

    def _own(self, payload: str) -> str:
        if payload not in self._leases:
            raise InputError(f"{self.loc.url}: {payload} is no payload of this writer's in flight "
                             "(committed or discarded already?)")
        return payload

    def _end_lease(self, payload: str) -> None:
        lease = self._leases.pop(payload, None)
        if lease is not None:
            lease.release()


__all__ = ["Transactions"]
