"""tests/hub_server.py driven by huggingface_hub's real client: HfApi writes commits, HfFileSystem reads them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hub_server import HubServer, git_blob_oid
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
)
from huggingface_hub.errors import HfHubHTTPError

REPO = "org/store"
FILES = {
    "README.md": b"# a store\n",
    "config.json": b'{"keep": 0.1}\n',
    "empty.bin": b"",
    "tasks/alpha/delta.bin": bytes(range(256)) * 40,
    "tasks/beta/delta.bin": bytes((i * 37 + 11) % 256 for i in range(5000)),
    "tasks/beta/deep/er/x.bin": b"\x00\xff\r\n" * 300,
}


@pytest.fixture()
def hub(monkeypatch):
    """A running HubServer holding the empty repo org/store."""
    import huggingface_hub.constants
    # conftest sets HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every request
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer() as server:
        server.create_repo(REPO)
        yield server


def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token="x")


def fs(hub: HubServer) -> HfFileSystem:
    """A fresh HfFileSystem (no instance or listing cache shared with other tests)."""
    return HfFileSystem(endpoint=hub.url, token=False, skip_instance_cache=True)


def add_all(files: dict[str, bytes]) -> list[CommitOperationAdd]:
    return [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in files.items()]


def push(hub: HubServer, files: dict[str, bytes] = FILES, message: str = "push") -> str:
    """Commit `files` on top of main's head; return the new commit's sha."""
    return api(hub).create_commit(REPO, operations=add_all(files), commit_message=message,
                                  parent_commit=hub.head(REPO)).oid


def test_create_commit_makes_one_commit(hub):
    initial = hub.head(REPO)
    hub.requests.clear()
    info = api(hub).create_commit(REPO, operations=add_all(FILES), commit_message="add task alpha",
                                  commit_description="two tasks", parent_commit=initial)
    commits = hub.commits(REPO)
    assert [c.sha for c in commits] == [initial, info.oid] and hub.head(REPO) == info.oid
    assert (commits[1].parent, commits[1].title, commits[1].message) == (initial, "add task alpha", "two tasks")
    assert hub.files(REPO) == FILES and hub.files(REPO, initial) == {}
    assert info.commit_url == f"{hub.url}/{REPO}/commit/{info.oid}" and info.repo_url.repo_id == REPO
    # README.md is validated first, then one preupload call, then one commit with the content inline
    assert [m for m, _ in hub.requests] == ["POST"] * 3
    assert [p.split("/")[-2 if "models" in p else -1] for _, p in hub.requests] == \
        ["validate-yaml", "preupload", "commit"]


def test_stale_parent_commit_is_refused_with_412(hub):
    initial = hub.head(REPO)
    first = push(hub)
    with pytest.raises(HfHubHTTPError) as e:
        api(hub).create_commit(REPO, operations=add_all({"config.json": b"{}"}), commit_message="late",
                               parent_commit=initial)
    assert e.value.response.status_code == 412
    assert "A commit has happened since" in str(e.value)
    assert [c.sha for c in hub.commits(REPO)] == [initial, first] and hub.files(REPO) == FILES


def test_concurrent_commits_on_one_parent_one_wins(hub):
    parent, results = hub.head(REPO), []

    def commit(i: int) -> None:
        try:
            api(hub).create_commit(REPO, operations=add_all({f"t{i}.bin": bytes([i])}), commit_message=f"t{i}",
                                   parent_commit=parent)
            results.append(200)
        except HfHubHTTPError as e:
            results.append(e.response.status_code)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [412] * 5 and len(hub.commits(REPO)) == 2


def test_unchanged_files_are_left_out_of_the_commit(hub):
    first = push(hub)
    info = api(hub).create_commit(REPO, operations=add_all(FILES), commit_message="same again",
                                  parent_commit=first)
    assert info.oid == first and len(hub.commits(REPO)) == 2
    second = push(hub, {**FILES, "config.json": b"{}"})
    assert hub.files(REPO, second) == {**FILES, "config.json": b"{}"}


def test_hffilesystem_reads_branch_and_commit(hub, tmp_path):
    first = push(hub)
    changed = {"tasks/alpha/delta.bin": b"new alpha"}
    second = push(hub, changed, "update alpha")
    f = fs(hub)
    for path, data in FILES.items():
        assert f.cat_file(f"{REPO}@{first}/{path}") == data
        assert f.cat_file(f"{REPO}/{path}") == changed.get(path, data)
        assert f.cat_file(f"hf://{REPO}@{second}/{path}") == changed.get(path, data)
    assert f.ls(REPO, detail=False) == [f"{REPO}/{p}" for p in ("README.md", "config.json", "empty.bin", "tasks")]
    assert f.find(f"{REPO}@{first}/tasks") == sorted(f"{REPO}@{first}/{p}" for p in FILES if p.startswith("tasks/"))
    assert f.find(f"{REPO}/tasks", withdirs=True, detail=False)[:2] == [f"{REPO}/tasks", f"{REPO}/tasks/alpha"]
    info = f.info(f"{REPO}@{first}/tasks/beta/delta.bin")
    assert (info["type"], info["size"], info["blob_id"]) == ("file", 5000, git_blob_oid(FILES["tasks/beta/delta.bin"]))
    assert f.info(f"{REPO}/tasks/beta")["type"] == "directory" and f.isdir(f"{REPO}/tasks/beta/deep")
    assert f.info(f"{REPO}/tasks/alpha/delta.bin", expand_info=True)["last_commit"].oid == second
    assert f.info(f"{REPO}/tasks/beta/delta.bin", expand_info=True)["last_commit"].oid == first
    assert not f.exists(f"{REPO}/nope.bin") and not f.exists(f"{REPO}/tasks/alpha/delta.bin/x")
    with pytest.raises(FileNotFoundError):
        f.cat_file(f"{REPO}@{'0' * 40}/config.json")
    with pytest.raises(FileNotFoundError):
        f.ls("org/missing")
    # ranged reads: small blocks force several Range requests
    data = FILES["tasks/alpha/delta.bin"]
    hub.requests.clear()
    with f.open(f"{REPO}@{first}/tasks/alpha/delta.bin", "rb", block_size=1000) as fh:
        fh.seek(3000)
        assert fh.read(2500) == data[3000:5500]
        fh.seek(-10, 2)
        assert fh.read() == data[-10:]
    assert sum("/resolve/" in p for _, p in hub.requests) >= 2
    assert f.read_block(f"{REPO}/tasks/beta/delta.bin", 4990, 100) == FILES["tasks/beta/delta.bin"][4990:]
    # hf_hub_download: HEAD for the metadata, then GET
    local = api(hub).hf_hub_download(REPO, "tasks/beta/deep/er/x.bin", revision=first, cache_dir=tmp_path)
    assert Path(local).read_bytes() == FILES["tasks/beta/deep/er/x.bin"]


def test_delete_operations(hub):
    first = push(hub)
    info = api(hub).create_commit(REPO, operations=[CommitOperationDelete("config.json"),
                                                    CommitOperationDelete("tasks/beta/", is_folder=True)],
                                  commit_message="drop beta", parent_commit=first)
    assert hub.files(REPO) == {p: d for p, d in FILES.items() if p != "config.json" and not p.startswith("tasks/beta")}
    f = fs(hub)
    assert not f.exists(f"{REPO}/config.json") and not f.exists(f"{REPO}/tasks/beta")
    assert f.cat_file(f"{REPO}@{first}/tasks/beta/delta.bin") == FILES["tasks/beta/delta.bin"]
    with pytest.raises(HfHubHTTPError) as e:
        api(hub).create_commit(REPO, operations=[CommitOperationDelete("config.json")], commit_message="again",
                               parent_commit=info.oid)
    assert e.value.response.status_code == 404 and len(hub.commits(REPO)) == 3


def test_model_info_and_repo_api(hub):
    sha = push(hub)
    a = api(hub)
    info = a.model_info(REPO, revision="main")
    assert info.sha == sha == a.model_info(REPO).sha and info.id == REPO
    assert sorted(s.rfilename for s in info.siblings) == sorted(FILES)
    initial = hub.commits(REPO)[0].sha
    assert a.model_info(REPO, revision=initial).siblings == []
    assert [c.commit_id for c in a.list_repo_commits(REPO)] == [sha, initial]
    assert a.repo_exists(REPO) and not a.repo_exists("org/missing") and not a.revision_exists(REPO, "dev")
    assert a.create_repo("org/other").repo_id == "org/other" and hub.commits("org/other")[0].files == {}
    a.create_repo("org/other", exist_ok=True)


def test_tree_pagination(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(page_size=2) as hub:
        hub.create_repo(REPO)
        push(hub)
        tree = list(api(hub).list_repo_tree(REPO, recursive=True))
        assert sorted(e.path for e in tree if hasattr(e, "size")) == sorted(FILES)
        assert len(tree) == len(FILES) + 5  # tasks, tasks/alpha, tasks/beta, tasks/beta/deep, tasks/beta/deep/er
        assert sorted(fs(hub).find(REPO, detail=False)) == sorted(f"{REPO}/{p}" for p in FILES)
