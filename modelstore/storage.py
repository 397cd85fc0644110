"""The storage layer: one store location on any fsspec filesystem, seen as files and as zarr groups.

Everything that touches bytes at a location goes through `Location`: reading and atomically
replacing the manifest, listing, deleting, and opening or creating the zarr groups of payloads.
It is the one place that knows how each filesystem makes a replace atomic.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import zarr

from .errors import CorruptStoreError, InputError, StoreNotFoundError
from .format.manifest import Manifest, check_manifest
from .format.paths import MANIFEST


class Location:
    """One store location seen two ways: a sync fsspec filesystem (manifest, listing, deletes)
    and a zarr store (arrays and groups), rooted at the same place."""

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
                 read_only: bool = True):
        url = os.fspath(url)
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.local = "://" not in url or url.startswith("file://")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        except (ValueError, ImportError) as e:
            raise InputError(f"cannot open {url}: {e}") from None
        self.root = self.root.rstrip("/")
        if self.local:
            self.root = os.path.abspath(self.root)
            if not read_only:
                os.makedirs(self.root, exist_ok=True)
            self.zstore = zarr.storage.LocalStore(self.root, read_only=read_only)
        else:
            self.zstore = zarr.storage.FsspecStore.from_url(url, storage_options=self.storage_options or None,
                                                             read_only=read_only)

    def path(self, rel: str) -> str:
        """The filesystem path of `rel` (relative to the store's root)."""
        return f"{self.root}/{rel}"

    def same_place(self, other: Location) -> bool:
        """Whether two locations are one store (same filesystem type and root)."""
        return type(self.fs) is type(other.fs) and self.root == other.root

    # -- JSON objects ----------------------------------------------------------
    def read_json(self, rel: str) -> Any:
        """The parsed object at `rel`, or None if there is none."""
        try:
            blob = self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None
        try:
            return json.loads(blob)
        except ValueError:
            raise CorruptStoreError(f"{self.url}: {rel} is not valid JSON; the store is damaged") from None

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        """Replace `rel` in one step: readers see the old or the new object, never a mix."""
        blob = json.dumps(obj, indent=1, sort_keys=True).encode()
        if self.local:
            tmp = self.path(f".{rel}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(rel))
        else:
            self.fs.pipe_file(self.path(rel), blob)

    def read_manifest(self) -> Manifest | None:
        """The store's manifest, checked (modelstore's, not newer than this reader), or None if absent."""
        m = self.read_json(MANIFEST)
        return None if m is None else check_manifest(m, self.url)

    def require_manifest(self) -> Manifest:
        """The store's manifest.

        Raises:
            StoreNotFoundError: the location holds no store.
        """
        m = self.read_manifest()
        if m is None:
            raise StoreNotFoundError(f"{self.url} is not a modelstore store (no {MANIFEST}); "
                                     "create one with `modelstore build` or `modelstore init`")
        return m

    # -- directories -----------------------------------------------------------
    def listdir(self, rel: str) -> list[str]:
        """Names directly under `rel` (empty if it does not exist)."""
        try:
            return [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False)]
        except FileNotFoundError:
            return []

    def remove_tree(self, rel: str) -> None:
        """Delete `rel` and everything under it; nothing there is fine."""
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    # -- zarr groups -----------------------------------------------------------
    def create_root_group(self, attributes: dict[str, Any]) -> None:
        """The zarr group at the store's root (its `zarr.json`)."""
        zarr.open_group(self.zstore, mode="a", attributes=attributes)

    def create_group(self, rel: str) -> zarr.Group:
        """A new, empty zarr group at `rel` (and the group metadata of its parents)."""
        return zarr.create_group(self.zstore, path=rel, attributes={})

    def open_group(self, rel: str) -> zarr.Group:
        """The zarr group at `rel`, which the manifest lists.

        Raises:
            CorruptStoreError: it is missing or its metadata is unreadable.
        """
        try:
            return zarr.open_group(self.zstore, path=rel, mode="r")
        except FileNotFoundError:  # zarr's GroupNotFoundError is one
            raise CorruptStoreError(f"{self.url}: {rel} is listed in the manifest but missing; "
                                    "the store is damaged") from None
        except (ValueError, KeyError, TypeError) as e:  # unreadable zarr.json
            raise CorruptStoreError(f"{self.url}: the metadata of {rel} is unreadable ({type(e).__name__}); "
                                    "the store is damaged") from None


__all__ = ["Location"]
