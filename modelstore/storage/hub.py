"""Stores on the Hugging Face Hub (`hf://org/repo[@branch][/folder]`): one Hub commit per task.

The Hub has no conditional write of one file, but a commit can carry many files and be refused
when its branch moved (`parent_commit`, HTTP 412). So a writer stages a payload in a local
directory, and publishing the manifest is one `create_commit` holding the staged files, the new
manifest and the deletion of payloads it no longer references, on the commit the manifest was
read at. A half-pushed task is never visible, and the Hub's commit rate limit is met by one
commit per task, never one per file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from modelstore.storage.slots import ManifestSlot, Vouch


class HubRepo(ManifestSlot):
    """The manifest of a store in a Hub repo folder; the token is the commit sha it was read at."""

    writers = "many writers (one Hub commit per change, refused when the branch moved)"

    def __init__(self, fs: Any, root: str):
        from huggingface_hub import HfApi
        resolved = fs.resolve_path(root)
        self.fs = fs
        self.repo_id, self.repo_type = resolved.repo_id, resolved.repo_type
        self.revision, self.folder = resolved.revision, resolved.path_in_repo.strip("/")
        self.api = HfApi(endpoint=fs.endpoint, token=fs.token)
        self._staging: str | None = None

    @property
    def staging(self) -> str:
        """A local directory mirroring the store's layout, holding what the next commit uploads."""
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="modelstore-hub-")
        return self._staging

    def in_repo(self, rel: str) -> str:
        """Path of store file `rel` inside the repo."""
        return f"{self.folder}/{rel}" if self.folder else rel

    def read(self) -> tuple[bytes | None, Any]:
        sha = self.api.repo_info(self.repo_id, repo_type=self.repo_type, revision=self.revision).sha
        prefix = {"model": ""}.get(self.repo_type, f"{self.repo_type}s/")
        try:
            blob = self.fs.cat_file(f"{prefix}{self.repo_id}@{sha}/{self.in_repo('manifest.json')}")
        except FileNotFoundError:
            blob = None
        return blob, sha

    def replace(self, blob: bytes, token: Any, vouch: Vouch | None = None) -> bool:
        """A commit that deletes nothing (see `commit`)."""
        if vouch is not None:
            vouch()
        return self.commit(blob, token)

    def commit(self, blob: bytes, token: Any, obsolete: tuple[str, ...] = ()) -> bool:
        """One commit: the staged payload files, the manifest, and the deletion of `obsolete` payloads."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError
        ops: list[Any] = []
        for here, _, files in os.walk(self._staging or self.staging):
            for f in sorted(files):
                full = os.path.join(here, f)
                rel = os.path.relpath(full, self.staging).replace(os.sep, "/")
                ops.append(CommitOperationAdd(path_in_repo=self.in_repo(rel), path_or_fileobj=full))
        ops.append(CommitOperationAdd(path_in_repo=self.in_repo("manifest.json"), path_or_fileobj=blob))
        ops += [CommitOperationDelete(path_in_repo=self.in_repo(rel) + "/") for rel in obsolete]
        try:
            self.api.create_commit(self.repo_id, operations=ops, repo_type=self.repo_type, revision=self.revision,
                                   parent_commit=token, commit_message="modelstore: update the store")
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code == 412:
                return False
            raise
        self.clear_staging()
        self.fs.invalidate_cache()
        return True

    def stage(self, rel: str) -> str:
        """The local path where store file or directory `rel` is staged until the next commit."""
        return os.path.join(self.staging, *rel.split("/"))

    def clear_staging(self, rel: str | None = None) -> None:
        """Forget staged files (all, or those under `rel`)."""
        if rel is None:
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging, exist_ok=True)
        else:
            shutil.rmtree(self.stage(rel), ignore_errors=True)

    def delete(self, rels: list[str]) -> None:
        """Delete committed directories in one commit (garbage collection)."""
        from huggingface_hub import CommitOperationDelete
        if rels:
            self.api.create_commit(self.repo_id, repo_type=self.repo_type, revision=self.revision,
                                   operations=[CommitOperationDelete(path_in_repo=self.in_repo(r) + "/") for r in rels],
                                   commit_message="modelstore gc: remove unreferenced payloads")
            self.fs.invalidate_cache()


__all__ = ["HubRepo"]
