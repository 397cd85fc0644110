"""The commit rule: payloads go to fresh directories, the manifest is replaced last.

Single writer at a time. A crashed or interrupted write leaves only an unreferenced
directory, removed by the next write of the same base or task.
"""

from __future__ import annotations

from .errors import InputError, TaskExistsError, TaskNotFoundError
from .format.manifest import FORMAT_VERSION, BaseEntry, Manifest, TaskEntry, new_manifest
from .format.paths import MANIFEST, check_task_name, is_payload_dir, new_payload_dir, task_dir
from .format.payload import PayloadWriter
from .storage import Location


class ManifestWriter:
    """Write access to the manifest of one store location, and the payload directories it references."""

    def __init__(self, loc: Location, create: bool = False):
        self.loc = loc
        if not create:
            self.manifest: Manifest = loc.require_manifest()
            return
        if loc.read_json(MANIFEST) is not None:
            raise InputError(f"{loc.url} already holds a store; add tasks with `modelstore add-task` "
                             "or remove it first")
        loc.create_root_group({"modelstore": {"format_version": FORMAT_VERSION}})
        self.manifest = new_manifest()

    # -- payload directories ---------------------------------------------------
    def new_payload(self, parent: str) -> PayloadWriter:
        """A writer into a fresh `parent/<uid>` group that the manifest does not reference yet."""
        self.cleanup(parent)
        rel = new_payload_dir(parent)
        return PayloadWriter(rel, self.loc.create_group(rel))

    def new_dir(self, parent: str) -> str:
        """A fresh directory name under `parent` for a payload copied in file by file."""
        self.cleanup(parent)
        return new_payload_dir(parent)

    def cleanup(self, parent: str) -> None:
        """Remove payload directories under `parent` that the manifest does not reference (crash leftovers)."""
        live = {e["path"] for e in [*self.manifest["bases"].values(), *self.manifest["tasks"].values()]}
        for child in self.loc.listdir(parent):
            rel = f"{parent}/{child}"
            if is_payload_dir(child) and rel not in live:
                self.loc.remove_tree(rel)

    # -- commits ---------------------------------------------------------------
    def commit(self) -> None:
        self.loc.write_json_atomic(MANIFEST, self.manifest)

    def commit_base(self, base_id: str, entry: BaseEntry) -> None:
        """Make base `base_id` visible; a store never replaces a base."""
        if base_id in self.manifest["bases"]:
            raise InputError(f"{self.loc.url} already has a {base_id} base")
        self.manifest["bases"][base_id] = entry
        self.commit()

    def commit_task(self, name: str, entry: TaskEntry) -> None:
        """Make task `name` visible (replacing an older version, whose payload is then removed)."""
        old = self.manifest["tasks"].get(name)
        self.manifest["tasks"][name] = entry
        self.commit()
        if old is not None and old["path"] != entry["path"]:
            self.loc.remove_tree(old["path"])

    def check_new_task(self, name: str, overwrite: bool) -> None:
        """Raise unless task `name` may be written (a valid name, new or `overwrite`)."""
        check_task_name(name)
        if name in self.manifest["tasks"] and not overwrite:
            raise TaskExistsError(f"{self.loc.url} already has a task {name!r}; pass --overwrite to replace it")

    def remove_task(self, name: str) -> None:
        """Drop task `name` from the manifest, then delete its payloads."""
        check_task_name(name)
        entry = self.manifest["tasks"].pop(name, None)
        if entry is None:
            raise TaskNotFoundError(f"{self.loc.url} has no task {name!r}")
        self.commit()
        self.loc.remove_tree(entry["path"])
        self.cleanup(task_dir(name))


__all__ = ["ManifestWriter"]
