"""Writing to a store: fresh directories for new payloads, the manifest commit last.

Single writer at a time. A crashed or interrupted write leaves only an
unreferenced directory, removed by the next write of the same base or task.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import zarr

from . import dtypes
from .errors import InputError, StoreNotFoundError, TaskExistsError, TaskNotFoundError
from .layout import MANIFEST, FlatWriter, array_nbytes, close_all
from .names import check_task_name
from .store import Location, Store, check_manifest, new_manifest, table_digest, _now


class StoreWriter:
    """Write access to one store location."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, create: bool = False):
        self.url = url
        self.storage_options = storage_options
        self.loc = Location(url, storage_options, read_only=False)
        m = self.loc.read_json(MANIFEST)
        if create:
            if m is not None:
                raise InputError(f"{url} already holds a store; add tasks with `modelstore add-task` or remove it first")
            zarr.open_group(self.loc.zstore, mode="a", attributes={"modelstore": {"format_version": 1}})
            self.manifest = new_manifest()
        else:
            if m is None:
                raise StoreNotFoundError(f"{url} is not a modelstore store (no {MANIFEST}); "
                                         "create one with `modelstore build` or `modelstore init`")
            self.manifest = check_manifest(m, url)

    def reopen(self, mode: str = "r") -> Store:
        return Store(self.url, mode=mode, storage_options=self.storage_options)

    # -- payload directories ---------------------------------------------------
    def new_group(self, prefix: str, attributes: dict[str, Any] | None = None) -> tuple[str, zarr.Group]:
        """A fresh group `prefix/<random>` for a payload not yet referenced by the manifest."""
        self.cleanup(prefix)
        rel = f"{prefix}/{uuid.uuid4().hex[:16]}"
        return rel, zarr.create_group(self.loc.zstore, path=rel, attributes=attributes or {})

    def cleanup(self, prefix: str) -> None:
        """Remove directories under `prefix` that the manifest does not reference (crash leftovers)."""
        live = {e["path"] for e in [*self.manifest["bases"].values(), *self.manifest["tasks"].values()]}
        for child in self.loc.listdir(prefix):
            rel = f"{prefix}/{child}"
            if child != "zarr.json" and rel not in live:
                self.loc.remove_tree(rel)

    # -- commits ---------------------------------------------------------------
    def commit(self) -> None:
        self.loc.write_json_atomic(MANIFEST, self.manifest)

    def commit_base(self, base_id: str, entry: dict[str, Any]) -> None:
        if base_id in self.manifest["bases"]:
            raise InputError(f"{self.url} already has a {base_id} base")
        self.manifest["bases"][base_id] = entry
        self.commit()

    def commit_task(self, name: str, entry: dict[str, Any]) -> None:
        """Make task `name` visible (replacing an older version, whose payload is then removed)."""
        old = self.manifest["tasks"].get(name)
        self.manifest["tasks"][name] = entry
        self.commit()
        if old is not None and old["path"] != entry["path"]:
            self.loc.remove_tree(old["path"])

    def check_new_task(self, name: str, overwrite: bool) -> None:
        check_task_name(name)
        if name in self.manifest["tasks"] and not overwrite:
            raise TaskExistsError(f"{self.url} already has a task {name!r}; pass --overwrite to replace it")

    def remove_task(self, name: str) -> None:
        check_task_name(name)
        entry = self.manifest["tasks"].pop(name, None)
        if entry is None:
            raise TaskNotFoundError(f"{self.url} has no task {name!r}")
        self.commit()
        self.loc.remove_tree(entry["path"])
        self.cleanup(f"tasks/{name}")


def write_base(w: StoreWriter, base_id: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
               tensors: Iterable[tuple[str, torch.Tensor]], entry: dict[str, Any]) -> dict[str, Any]:
    """Stream `tensors` (in `specs` order) into base `base_id` and commit it; return its manifest entry."""
    rel, g = w.new_group(f"bases/{base_id}")
    capacity: dict[str, int] = {}
    for _, shape, dt in specs:
        capacity[dtypes.dtype_name(dt)] = capacity.get(dtypes.dtype_name(dt), 0) + math.prod(shape)
    writers = {d: FlatWriter(g, f"data.{d}", dtypes.storage_dtype(d), n) for d, n in capacity.items()}
    table = []
    for name, t in tensors:
        d = dtypes.dtype_name(t.dtype)
        start = writers[d].append(dtypes.to_numpy(t))
        table.append({"name": name, "kind": "dense", "array": f"data.{d}", "shape": list(t.shape),
                      "dtype": d, "start": start, "count": t.numel()})
    arrays = close_all(writers.values())
    g.attrs["tensors"] = table
    entry = {**entry, "path": rel, "tensors": len(table), "table_sha256": table_digest(table), "arrays": arrays,
             "bytes": array_nbytes(g), "nbytes": sum(math.prod(s) * dt.itemsize for _, s, dt in specs),
             "created": _now()}
    w.commit_base(base_id, entry)
    return entry



__all__ = ["StoreWriter", "write_base"]
