"""The storage layer: one store location on any fsspec filesystem, seen as files and as zarr groups.

Everything that touches bytes at a location goes through `Location`: reading and publishing the
manifest (conditionally, through the filesystem's slot, see slots.py), creating and reading the
zarr groups of payloads, listing, and deleting. Reads, writes and deletes never leave the store's
root through a symbolic link, and I/O failures become one-line StorageErrors that name the location.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import fsspec
import zarr
from zarr.abc.store import Store
from zarr.errors import ContainsGroupError

from modelstore.errors import (
    CorruptStoreError,
    InputError,
    ModelStoreError,
    StorageError,
    StoreNotFoundError,
    is_io_error,
)
from modelstore.format.manifest import Manifest, parse_manifest
from modelstore.format.paths import MANIFEST
from modelstore.storage.hub import HubRepo
from modelstore.storage.slots import ManifestSlot, Vouch, slot_for


class Entry(NamedTuple):
    """One name in a listing: a folder or not, and when it was last written (None if unknown)."""

    is_dir: bool
    mtime: float | None


class Location:
    """One store location seen two ways: a sync fsspec filesystem (manifest, listing, deletes)
    and a zarr store (arrays and groups), rooted at the same place."""

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
                 read_only: bool = True, create: bool | None = None):
        """`create`: make a missing local directory (default: when writable); a store that is only
        opened for writing is never created by it."""
        url = os.fspath(url)
        self.url = url
        self.storage_options = dict(storage_options or {})
        if url.startswith(("s3://", "s3a://")):
            # one GET per object: s3fs otherwise splits each read into concurrent ranges after a HEAD
            # for its size; modelstore fetches several chunk objects at once instead (format/chunks.py)
            self.storage_options.setdefault("max_concurrency", 1)
        self.local = "://" not in url or url.startswith("file://")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        except (ValueError, ImportError) as e:
            raise InputError(f"cannot open {url}: {e}") from None
        self.root = self.root.rstrip("/")
        if self.local:
            self.root = os.path.abspath(self.root)
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise InputError(f"{url} is a file, not a store directory; give a directory path")
            if not read_only if create is None else create:
                with self.errors("create the store directory"):
                    os.makedirs(self.root, exist_ok=True)
            self.zstore: Store = zarr.storage.LocalStore(self.root, read_only=read_only)
        else:
            self.zstore = zarr.storage.FsspecStore.from_url(url, storage_options=self.storage_options or None,
                                                             read_only=read_only)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.hub = HubRepo(self.fs, self.root) if "hf" in protocols else None
        self.slot: ManifestSlot = self.hub or slot_for(self.fs, self.path(MANIFEST), self.local)
        # where new payloads are written: the location itself, or the Hub's local staging
        self._zwrite = zarr.storage.LocalStore(self.hub.staging) if self.hub and not read_only else self.zstore

    def path(self, rel: str) -> str:
        """The filesystem path of `rel` (relative to the store's root)."""
        return f"{self.root}/{rel}"

    def same_place(self, other: Location) -> bool:
        """Whether two locations are one store (same filesystem type and root)."""
        return type(self.fs) is type(other.fs) and self.root == other.root

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Turn I/O failures (an outage past the filesystem's own retries, permissions) into one line."""
        try:
            yield
        except ModelStoreError:
            raise
        except Exception as e:
            if not is_io_error(e):
                raise
            raise StorageError(f"{self.url}: could not {doing} ({_reason(e)}); nothing partial is visible, "
                               "rerun when the location is reachable") from None

    # -- the manifest ----------------------------------------------------------
    def read_manifest_versioned(self) -> tuple[Manifest | None, Any]:
        """The manifest (checked) or None, and the token a conditional publish needs."""
        self.refuse_links(MANIFEST)
        with self.errors("read manifest.json"):
            blob, token = self.slot.read()
        return (None if blob is None else parse_manifest(blob, self.url)), token

    def read_manifest(self) -> Manifest | None:
        """The store's manifest, checked (modelstore's, not newer, not damaged), or None if absent."""
        return self.read_manifest_versioned()[0]

    def require_bucket(self) -> None:
        """Refuse an S3 location whose bucket does not exist, in one line: its store would read as
        empty and every write would fail file by file.

        Raises:
            InputError: naming the bucket.
        """
        head = getattr(self.fs, "call_s3", None)  # s3fs
        if head is None:
            return
        bucket = self.root.split("/", 1)[0]
        with self.errors(f"look up bucket {bucket}"):
            try:
                head("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise InputError(f"{self.url}: bucket {bucket!r} does not exist; create it first, or give another "
                                 "location") from None
            except PermissionError:  # it may exist for credentials that write but do not look up buckets
                pass

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

    def publish(self, blob: bytes, token: Any, obsolete: Sequence[str] = (), vouch: Vouch | None = None) -> bool:
        """Replace the manifest with `blob` if it is still version `token`, `vouch` called right
        before (slots.py); then delete `obsolete` payload directories, which the new manifest no
        longer references, and their task's folder if that leaves it empty. False on a conflict."""
        if self.hub is not None:  # one commit: staged payloads, manifest, deletions
            return self.hub.commit(blob, token, tuple(obsolete))
        if not self.slot.replace(blob, token, vouch):
            return False
        for rel in obsolete:
            with contextlib.suppress(ModelStoreError):  # space only: gc frees what is left
                self.discard(rel)
        return True

    # -- directories -----------------------------------------------------------
    def _inside(self, rel: str) -> str:
        """The path of `rel`, refusing to follow a symbolic link on the way (local disks)."""
        link = self._link_on_path(rel)
        if link is not None:
            raise StorageError(f"{self.url}: {link} is a symbolic link; "
                               "modelstore never writes or deletes through links, remove it")
        return self.path(rel)

    def _link_on_path(self, rel: str) -> str | None:
        """The first of `rel`'s components that is a symbolic link (local disks), relative to the root."""
        if self.local:
            here = self.root
            for part in filter(None, rel.split("/")):
                here = os.path.join(here, part)
                if os.path.islink(here):
                    return os.path.relpath(here, self.root)
        return None

    def refuse_links(self, rel: str, tree: bool = False) -> None:
        """Refuse to read `rel` (`""`: the root) through a symbolic link (local disks): one on the way
        to it, or with `tree` anywhere below it. A store never holds links; one could serve, or let
        sync copy, bytes from outside the store. One lstat per component, plus one listing per
        directory of the tree (file types come with the listing): no stat per chunk file.

        Raises:
            CorruptStoreError: naming the link.
        """
        link = self._link_on_path(rel)
        if link is None and tree and self.local:
            with self.errors(f"list {rel}"):
                link = _link_below(self.root, self.path(rel))
        if link is not None:
            raise CorruptStoreError(f"{self.url}: {link} is a symbolic link, which a store never holds; the store "
                                    "is damaged (remove the link and restore the store from a good copy)")

    def read_bytes(self, rel: str) -> bytes | None:
        """The content of file `rel` (None if there is none), never read through a symbolic link."""
        self.refuse_links(rel)
        with self.errors(f"read {rel}"):
            try:
                return bytes(self.fs.cat_file(self.path(rel)))
            except FileNotFoundError:
                return None

    def payload_files(self, rel: str) -> dict[str, int]:
        """Every file under payload directory `rel`: its path and size (empty if it is missing).

        Raises:
            CorruptStoreError: a symbolic link is on the way to or inside it.
        """
        self.refuse_links(rel, tree=True)
        return {path: int(info["size"]) for path, info in self._files(rel).items()}

    def open_write(self, rel: str) -> Any:
        """A new binary file at `rel` (staged for the next commit on the Hub), never through a link."""
        if self.hub is not None:
            path = self.hub.stage(rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return open(path, "wb")
        full = self._inside(rel)
        if self.local:
            os.makedirs(os.path.dirname(full), exist_ok=True)
        return self.fs.open(full, "wb")

    @property
    def stages_locally(self) -> bool:
        """Whether new payloads are staged off the location until their commit (the Hub): then a
        payload directory at the location that no manifest references is never in flight."""
        return self.hub is not None

    def listdir(self, rel: str) -> list[str]:
        """Names directly under `rel` (empty if it does not exist)."""
        with self.errors(f"list {rel}"):
            try:
                return [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self._inside(rel), detail=False)]
            except FileNotFoundError:
                return []

    def remove_tree(self, rel: str) -> None:
        """Delete `rel` and everything under it; nothing there is fine. Never through a link.
        On the Hub this forgets a staged, uncommitted payload; `remove_committed` deletes."""
        if self.hub is not None:
            self.hub.clear_staging(rel)
            return
        target = self._inside(rel)
        with self.errors(f"delete {rel}"):
            try:
                self.fs.rm(target, recursive=True)
            except FileNotFoundError:
                pass

    def discard(self, rel: str) -> None:
        """Delete payload `rel` (this writer's own uncommitted one, or one its publish unreferenced),
        and the folders above it that then hold nothing but group metadata (a failed first write or
        the removal of a task leaves no directory behind)."""
        self.remove_tree(rel)
        parent = rel.rpartition("/")[0]
        while parent and self.hub is None and self.listdir(parent) == ["zarr.json"]:
            self.remove_empty(parent)
            parent = parent.rpartition("/")[0]

    def remove_empty(self, rel: str) -> None:
        """Delete folder `rel`, which holds at most its group metadata, if it still does."""
        with contextlib.suppress(OSError, ModelStoreError):  # another writer may be starting there
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._inside(f"{rel}/zarr.json"))
            if self.local:
                os.rmdir(self.path(rel))

    def remove_committed(self, rels: list[str]) -> None:
        """Delete committed directories (one commit on the Hub)."""
        if self.hub is not None:
            with self.errors("delete unreferenced payloads"):
                self.hub.delete(rels)
            return
        for rel in rels:
            self.remove_tree(rel)

    def entries(self, rel: str) -> dict[str, Entry]:
        """What is directly under `rel` (empty if it does not exist), never from a cached listing."""
        with self.errors(f"list {rel}"):
            self.fs.invalidate_cache(self.path(rel))  # other processes write here: never a cached listing
            try:
                found = self.fs.ls(self._inside(rel), detail=True)
            except FileNotFoundError:
                return {}
        return {os.path.basename(info["name"].rstrip("/")): Entry(info.get("type") == "directory", _mtime(info))
                for info in found}

    def mtime(self, rel: str) -> float | None:
        """When file `rel` was last written, by the store's clock (None if unknown or gone)."""
        with self.errors(f"read {rel}"):
            self.fs.invalidate_cache(self.path(rel))
            try:
                return _mtime(self.fs.info(self.path(rel)))
            except FileNotFoundError:
                return None

    def remove_file(self, rel: str) -> None:
        """Delete file `rel`; nothing there is fine. Never through a link."""
        target = self._inside(rel)
        with self.errors(f"delete {rel}"):
            try:
                self.fs.rm_file(target)
            except FileNotFoundError:
                pass

    def files(self, rel: str) -> dict[str, int]:
        """Every file under `rel` (path relative to it -> size in bytes)."""
        prefix = self.path(rel).rstrip("/") + "/"
        return {name[len(prefix):] if name.startswith(prefix) else name: int(info.get("size") or 0)
                for name, info in self._files(rel).items() if info.get("type") != "directory"}

    def _files(self, rel: str) -> dict[str, Any]:
        with self.errors(f"list {rel}"):
            self.fs.invalidate_cache(self.path(rel))
            try:
                return self.fs.find(self.path(rel), detail=True)
            except FileNotFoundError:
                return {}

    def size_of(self, rel: str) -> int:
        """Bytes of the files under `rel`."""
        return sum(int(info.get("size") or 0) for info in self._files(rel).values())

    def newest(self, rel: str) -> float | None:
        """When the newest file under `rel` was written, by the store's clock (None if unknown)."""
        times = [_mtime(info) for info in self._files(rel).values()]
        known = [t for t in times if t is not None]
        return max(known) if known else None

    # -- zarr groups -----------------------------------------------------------
    def create_root_group(self, attributes: dict[str, Any]) -> None:
        """The zarr group at the store's root (its `zarr.json`) with `attributes`, unless it has them
        (writing a payload's group first writes the root's metadata without attributes)."""
        with self.errors("create the root group"):
            try:
                group = zarr.open_group(self._zwrite, mode="a")
            except ContainsGroupError:  # another writer's first commit made it meanwhile
                group = zarr.open_group(self._zwrite, mode="r+")
            missing = {k: v for k, v in attributes.items() if k not in group.attrs}
            if missing:
                group.attrs.update(missing)

    def create_group(self, rel: str) -> zarr.Group:
        """A new, empty zarr group at `rel` (and the group metadata of its parents)."""
        self._inside(rel)
        with self.errors(f"create {rel}"):
            return zarr.create_group(self._zwrite, path=rel, attributes={})

    def open_group(self, rel: str) -> zarr.Group:
        """The zarr group at `rel`, which the manifest lists.

        Raises:
            CorruptStoreError: it is missing or its metadata is unreadable.
        """
        staged = self.hub is not None and os.path.isdir(self.hub.stage(rel))  # written, not yet committed
        self.refuse_links(rel, tree=True)
        with self.errors(f"read {rel}"):
            try:
                return zarr.open_group(self._zwrite if staged else self.zstore, path=rel, mode="r", zarr_format=3)
            except FileNotFoundError:  # zarr's GroupNotFoundError is one
                raise CorruptStoreError(f"{self.url}: {rel} is listed in the manifest but missing; "
                                        "the store is damaged") from None
            except (ValueError, KeyError, TypeError) as e:  # unreadable zarr.json
                raise CorruptStoreError(f"{self.url}: the metadata of {rel} is unreadable ({type(e).__name__}); "
                                        "the store is damaged") from None


def _link_below(root: str, top: str) -> str | None:
    """The first symbolic link in directory tree `top`, relative to `root`, or None (also when
    `top` is missing: its readers report that)."""
    try:
        with os.scandir(top) as entries:
            for entry in entries:
                if entry.is_symlink():
                    return os.path.relpath(entry.path, root)
                if entry.is_dir(follow_symlinks=False):
                    link = _link_below(root, entry.path)
                    if link is not None:
                        return link
    except (FileNotFoundError, NotADirectoryError):
        pass
    return None


def _mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


__all__ = ["Location", "Entry"]
