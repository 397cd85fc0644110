"""Opening a store: locations, the manifest (the commit point), and reading tasks.

A store is a zarr v3 hierarchy on any fsspec location plus `manifest.json`, the
single object that lists bases and tasks. Writers put a task's arrays under a
fresh directory and rewrite the manifest last (atomically: rename on local disks,
one PUT on object stores), so readers never see a partial task.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import torch
import zarr

from . import dtypes
from .errors import (CorruptStoreError, FormatVersionError, InputError,
                     StoreNotFoundError, TaskNotFoundError)
from .layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST, content_crc32
from .names import check_task_name


def table_digest(table: list[dict[str, Any]]) -> str:
    """sha256 of a tensor table in canonical JSON, recorded in the manifest and checked on read."""
    blob = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def arrays_of(entry: dict[str, Any]) -> tuple[str, ...]:
    """The flat arrays a table entry's payload lives in."""
    return ("indices", "values") if entry["kind"] == "sparse" else (entry["array"],)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Location:
    """One store location seen two ways: a sync fsspec filesystem (manifest, deletes)
    and a zarr store (arrays and groups), rooted at the same place."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, read_only: bool = True):
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
        return f"{self.root}/{rel}"

    def read_json(self, rel: str) -> Any:
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

    def remove_tree(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def listdir(self, rel: str) -> list[str]:
        try:
            return [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False)]
        except FileNotFoundError:
            return []


def new_manifest() -> dict[str, Any]:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": _now(), "bases": {}, "tasks": {}}


def check_manifest(m: Any, url: str) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise StoreNotFoundError(f"{url} is not a modelstore store (its manifest.json is not ours)")
    v = m.get("version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise FormatVersionError(f"{url} has store format version {v}, newer than this modelstore reads "
                                 f"(version {FORMAT_VERSION}); upgrade modelstore")
    return m


class Store:
    """An open store. Use `modelstore.open(url)`; reads are cached per open store.

    The base a task sits on is read once per device and kept, so loading a second
    task reads only that task's arrays.
    """

    def __init__(self, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None):
        if mode not in ("r", "a"):
            raise InputError(f"mode must be 'r' or 'a', not {mode!r}")
        self.mode = mode
        self.loc = Location(url, storage_options, read_only=(mode == "r"))
        self.url = url
        m = self.loc.read_json(MANIFEST)
        if m is None:
            raise StoreNotFoundError(f"{url} is not a modelstore store (no {MANIFEST}); "
                                     "create one with `modelstore build` or `modelstore init`")
        self.manifest = check_manifest(m, url)
        self._bases: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    # -- listing -------------------------------------------------------------
    def tasks(self) -> list[str]:
        """Names of the committed tasks, sorted."""
        return sorted(self.manifest["tasks"])

    def entry(self, task: str) -> dict[str, Any]:
        try:
            return self.manifest["tasks"][task]
        except KeyError:
            raise TaskNotFoundError(f"{self.url} has no task {task!r}; `modelstore ls {self.url}` lists them") from None

    def info(self, task: str | None = None) -> dict[str, Any]:
        """Summary of the store, or of one task (method, parameters, kept count, bytes on disk)."""
        if task is not None:
            e = dict(self.entry(task))
            e["name"] = task
            e["ratio"] = e["bytes"] / e["full_bytes"] if e.get("full_bytes") else None
            return e
        bases = {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in self.manifest["bases"].items()}
        task_bytes = sum(e["bytes"] for e in self.manifest["tasks"].values())
        base_bytes = sum(b["bytes"] for b in self.manifest["bases"].values())
        full = sum(e.get("full_bytes") or 0 for e in self.manifest["tasks"].values())
        return {"url": self.url, "format_version": self.manifest["version"], "bases": bases,
                "tasks": self.tasks(), "bytes": base_bytes + task_bytes, "base_bytes": base_bytes,
                "task_bytes": task_bytes, "full_bytes": full,
                "ratio": (base_bytes + task_bytes) / full if full else None}

    # -- reading -------------------------------------------------------------
    def _group(self, rel: str) -> zarr.Group:
        try:
            return zarr.open_group(self.loc.zstore, path=rel, mode="r")
        except FileNotFoundError:  # zarr's GroupNotFoundError is one
            raise CorruptStoreError(f"{self.url}: {rel} is listed in the manifest but missing; the store is damaged") from None
        except (ValueError, KeyError, TypeError) as e:  # unreadable zarr.json
            raise CorruptStoreError(f"{self.url}: the metadata of {rel} is unreadable ({type(e).__name__}); "
                                    "the store is damaged") from None

    def _table(self, rel: str, digest: str, what: str) -> tuple[zarr.Group, list[dict[str, Any]]]:
        g = self._group(rel)
        table = g.attrs.get("tensors")
        if not isinstance(table, list) or table_digest(table) != digest:
            raise CorruptStoreError(f"{self.url}: the tensor table of {what} fails its checksum; the store is damaged")
        return g, table

    def _read_flat(self, g: zarr.Group, array: str, table: list[dict[str, Any]], what: str,
                   start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read `array[start:stop]`, turning a checksum failure into an error naming the tensors hit."""
        arr = g[array]
        stop = arr.shape[0] if stop is None else stop
        try:
            return arr[start:stop]
        except Exception:  # crc32c mismatch (ValueError) or a codec failure on damaged bytes
            pass
        chunk = arr.chunks[0]
        for c in range(start - start % chunk, stop, chunk):
            try:
                arr[c:c + chunk]
            except Exception:
                hit = [e["name"] for e in table if array in arrays_of(e) and e["count"]
                       and e["start"] < c + chunk and e["start"] + e["count"] > c]
                raise CorruptStoreError(
                    f"{what}: chunk {c // chunk} of array '{array}' fails its checksum (tensor "
                    f"{', '.join(hit[:3]) or '?'}{' ...' if len(hit) > 3 else ''}); the stored bytes are damaged, "
                    "re-add this task or restore the store") from None
        raise CorruptStoreError(f"{what}: array '{array}' could not be read")

    def read_payload(self, entry: dict[str, Any], what: str, device: torch.device) -> Payload:
        """Every non-empty flat array of a base or task, checked against the manifest, on `device`."""
        g, table = self._table(entry["path"], entry["table_sha256"], what)
        names = sorted({a for t in table if t["count"] for a in arrays_of(t)})
        out = Payload(table)
        for a in names:
            flat = self._read_flat(g, a, table, what)
            want = entry.get("arrays", {}).get(a)
            if want is not None and (flat.size != want["count"] or content_crc32(flat) != want["crc32"]):
                raise CorruptStoreError(f"{what}: array '{a}' does not match the checksum recorded in the manifest "
                                        f"(a chunk is missing or was replaced); re-add it or restore the store")
            out[a] = torch.from_numpy(flat).to(device)
        return out

    def stored_base(self, base_id: str) -> StoredBase:
        """The base as a TensorSource read tensor by tensor (bounded memory, for writers)."""
        b = self._base_entry(base_id)
        g, table = self._table(b["path"], b["table_sha256"], f"base {base_id!r}")
        return StoredBase(self, g, table, f"base {base_id!r}")

    def _base_entry(self, base_id: str) -> dict[str, Any]:
        b = self.manifest["bases"].get(base_id)
        if b is None:
            raise CorruptStoreError(f"{self.url}: base {base_id!r} is not in the manifest")
        return b

    def base(self, base_id: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The base tensors (stored dtypes) on `device`, read once per open store and device."""
        device = torch.device(device)
        key = (base_id, str(device))
        if key not in self._bases:
            flats = self.read_payload(self._base_entry(base_id), f"base {base_id!r}", device)
            out = {}
            for e in flats.table:
                flat = flats[e["array"]][e["start"]:e["start"] + e["count"]]
                if e["dtype"] == "bfloat16":
                    flat = flat.view(torch.bfloat16)
                out[e["name"]] = flat.view(e["shape"])
            self._bases[key] = out
        return self._bases[key]

    def load(self, task: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             merged: bool = True) -> Any:
        """The full weights of `task` as a state dict on `device`.

        `dtype=None` keeps each tensor's original dtype; a float dtype casts floating tensors.
        For a LoRA task, `merged=False` returns its factors instead (a `StoredAdapter`:
        low-rank updates U·diag(S)·Vᵀ and whole tensors), to serve the base unmerged.
        """
        from .materialize import materialize
        if not merged:
            if self.entry(task)["kind"] != "lora":
                raise InputError(f"task {task!r} is not a LoRA task; merged=False applies to LoRA tasks only")
            from .lora.task import read_adapter_task
            return read_adapter_task(self, task, torch.device(device))
        return materialize(self, task, torch.device(device), dtype)

    def load_into(self, model: torch.nn.Module, task: str, strict: bool = True) -> torch.nn.Module:
        """Copy `task`'s weights into `model` in place, on the model's device (strict by default)."""
        params = list(model.parameters()) + list(model.buffers())
        device = params[0].device if params else torch.device("cpu")
        sd = self.load(task, device=device)
        try:
            model.load_state_dict(sd, strict=strict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise InputError(f"task {task!r} does not fit this model: {' '.join(l.strip() for l in first[:3])}") from None
        return model


class Payload(dict):
    """Flat arrays of one base or task by name, with the tensor table that indexes them."""

    def __init__(self, table: list[dict[str, Any]]):
        super().__init__()
        self.table = table


class StoredBase:
    """A stored base seen as a TensorSource (names/shape/dtype/get)."""

    def __init__(self, store: Store, group: zarr.Group, table: list[dict[str, Any]], what: str):
        self._store, self._g, self._what = store, group, what
        self.table = table
        self._by_name = {e["name"]: e for e in table}

    def names(self) -> list[str]:
        return list(self._by_name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._by_name[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return dtypes.torch_dtype(self._by_name[name]["dtype"])

    def get(self, name: str) -> torch.Tensor:
        e = self._by_name[name]
        a = self._store._read_flat(self._g, e["array"], self.table, self._what, e["start"], e["start"] + e["count"])
        return dtypes.from_numpy(a, e["dtype"]).view(e["shape"])


def open_store(url: str | os.PathLike, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> Store:
    """Open a store at a local path or fsspec URL (`s3://`, `memory://`, `hf://`...).

    >>> store = modelstore.open("s3://bucket/store", storage_options={"anon": False})
    >>> sd = store.load("sst2", device="cuda")
    """
    return Store(os.fspath(url), mode=mode, storage_options=storage_options)


def load(task: str, store: str | Store | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load one task's full weights; `store` defaults to $MODELSTORE_URL."""
    if store is None:
        store = os.environ.get("MODELSTORE_URL")
        if not store:
            raise InputError("no store given and $MODELSTORE_URL is not set; pass store=... or set it")
    if not isinstance(store, Store):
        store = open_store(store)
    return store.load(check_task_name(task), device=device, dtype=dtype)


__all__ = ["Store", "open_store", "load", "table_digest", "Location"]
