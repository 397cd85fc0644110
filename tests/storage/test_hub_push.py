"""Writing stores to the Hugging Face Hub through huggingface_hub's real HfApi / HfFileSystem over HTTP,
against tests/hub_server.py (a Hub API server on 127.0.0.1; no Hub that takes uploads installs offline):
one commit per task, never one per file; a moved branch is a conflict that is retried; reads match."""

from __future__ import annotations

import pytest
import torch
from hub_server import HubServer

import modelstore


@pytest.fixture()
def hub(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest sets it for the rest
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with HubServer() as server:
        server.create_repo("org/store")
        yield server, {"endpoint": server.url, "token": "test-token"}


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_build_add_rm_push_one_commit_each(hub, bert_models, tmp_path):
    server, opts = hub
    t = bert_models["tasks"]
    start = len(server.commits("org/store"))
    s = modelstore.build("hf://org/store", bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1,
                         storage_options=opts)
    assert len(server.commits("org/store")) == start + 3  # the base, then one per task
    local = modelstore.build(str(tmp_path / "twin"), bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]},
                             keep=0.1)
    remote = modelstore.open("hf://org/store@main", storage_options=opts)
    assert remote.tasks() == ["alpha", "beta"]
    assert _same(remote.load("beta"), local.load("beta"))
    files = server.files("org/store")
    assert "manifest.json" in files and any(p.startswith("tasks/alpha/") for p in files)

    s.add_task("gamma", t["gamma"])
    assert len(server.commits("org/store")) == start + 4
    gamma_files = [p for p in server.files("org/store") if p.startswith("tasks/gamma/")]
    assert gamma_files and all(p in server.commits("org/store")[-1].files for p in gamma_files)
    assert server.commits("org/store")[-2].files.get("manifest.json") != server.files("org/store")["manifest.json"]

    old = s.entry("alpha")["path"]
    s.remove("alpha")
    assert len(server.commits("org/store")) == start + 5
    assert not [p for p in server.files("org/store") if p.startswith(old)]  # deleted in the same commit
    assert modelstore.open("hf://org/store", storage_options=opts).tasks() == ["beta", "gamma"]


def test_a_moved_branch_is_retried_and_both_tasks_land(hub, bert_models):
    server, opts = hub
    t = bert_models["tasks"]
    modelstore.build("hf://org/store", bert_models["pre"], {"alpha": t["alpha"]}, keep=0.1, storage_options=opts)
    a = modelstore.open("hf://org/store", mode="a", storage_options=opts)
    b = modelstore.open("hf://org/store", mode="a", storage_options=opts)
    from modelstore.storage import hub as hub_backend
    real = hub_backend.HubRepo.commit
    calls = {"n": 0}

    def racing(self, blob, token, obsolete=()):
        calls["n"] += 1
        if calls["n"] == 1:  # another writer commits between a's read and a's publish
            b.add_task("gamma", t["gamma"])
        return real(self, blob, token, obsolete)

    hub_backend.HubRepo.commit = racing
    try:
        a.add_task("beta", t["beta"])
    finally:
        hub_backend.HubRepo.commit = real
    assert calls["n"] >= 3  # a's refused publish (412), b's, a's retry
    s = modelstore.open("hf://org/store", storage_options=opts)
    assert s.tasks() == ["alpha", "beta", "gamma"]
    assert set(s.load("beta")) == set(bert_models["sd0"])


def test_sync_to_and_from_the_hub(hub, bert_models, tmp_path):
    server, opts = hub
    t = bert_models["tasks"]
    src = str(tmp_path / "src")
    modelstore.build(src, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1)
    start = len(server.commits("org/store"))
    report = modelstore.sync(src, "hf://org/store", dst_options=opts)
    assert report.copied == ["alpha", "beta"] and len(server.commits("org/store")) == start + 3
    again = modelstore.sync(src, "hf://org/store", dst_options=opts)
    assert again.up_to_date == ["alpha", "beta"] and len(server.commits("org/store")) == start + 3
    back = str(tmp_path / "back")
    modelstore.sync("hf://org/store", back, src_options=opts)
    assert _same(modelstore.open(back).load("alpha"), modelstore.open(src).load("alpha"))
