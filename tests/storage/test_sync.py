"""modelstore sync: copying stores between locations, task by task, with the manifest committed last."""

from __future__ import annotations

import json

import pytest
import torch

import modelstore
from modelstore.storage import transfer as sync_mod
from modelstore.storage.transfer import sync


def _same_tasks(a: modelstore.Store, b: modelstore.Store, tasks: list[str]) -> None:
    for t in tasks:
        got, want = b.load(t), a.load(t)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), t


@pytest.fixture()
def src(store2):
    return store2  # at tmp_path / "s"


def test_full_copy_then_nothing_to_do(src, tmp_path):
    dst = str(tmp_path / "dst")
    plan = sync(src, dst, dry_run=True)
    assert (plan.copied, plan.bases_copied, plan.bytes_copied) == (["alpha", "beta"], ["merged"], 0)
    assert not (tmp_path / "dst").exists()  # a dry run writes nothing
    m = modelstore.open(src).manifest
    assert plan.bytes_to_copy == m["bases"]["merged"]["bytes"] + sum(e["bytes"] for e in m["tasks"].values())
    report = sync(src, dst)
    assert report.bytes_to_copy == plan.bytes_to_copy < report.bytes_copied  # plus zarr.json metadata
    a, b = modelstore.open(src), modelstore.open(dst)
    assert b.tasks() == ["alpha", "beta"]
    _same_tasks(a, b, ["alpha", "beta"])
    torch.testing.assert_close(b.base("merged"), a.base("merged"), rtol=0, atol=0)
    root = tmp_path / "s"
    on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.parent != root)
    assert report.bytes_copied == on_disk  # every file below the root, group metadata included
    for name in ("alpha", "beta"):  # same content, fresh directories
        ia, ib = a.info(name), b.info(name)
        assert ia["path"] != ib["path"] and {k: v for k, v in ia.items() if k != "path"} == {
            k: v for k, v in ib.items() if k != "path"}
    again = sync(src, dst)
    assert (again.copied, again.up_to_date, again.bytes_copied) == ([], ["alpha", "beta"], 0)


def test_subset_then_rest_and_a_replaced_task(src, bert_models, tmp_path):
    dst = str(tmp_path / "dst")
    r = sync(src, dst, tasks=["beta"])
    assert (r.copied, r.bases_copied) == (["beta"], ["merged"])
    assert modelstore.open(dst).tasks() == ["beta"]
    old_path = modelstore.open(dst).info("beta")["path"]
    modelstore.add_task(src, "beta", bert_models["tasks"]["beta"], keep=0.3, overwrite=True)  # new content
    r = sync(src, dst)
    assert (sorted(r.copied), r.up_to_date, r.bases_copied) == (["alpha", "beta"], [], [])
    b = modelstore.open(dst)
    assert b.info("beta")["params"]["keep"] == 0.3
    _same_tasks(modelstore.open(src), b, ["alpha", "beta"])
    assert not (tmp_path / "dst" / old_path).exists()  # the replaced payload is gone


def test_delete_mirrors_and_refuses_a_subset(src, bert_models, tmp_path):
    dst = str(tmp_path / "dst")
    sync(src, dst)
    modelstore.add_task(dst, "gamma", bert_models["tasks"]["gamma"], keep=0.1)
    assert sync(src, dst).up_to_date == ["alpha", "beta"] and "gamma" in modelstore.open(dst).tasks()
    assert sync(src, dst, delete=True, dry_run=True).deleted == ["gamma"]
    assert sync(src, dst, delete=True).deleted == ["gamma"]
    assert modelstore.open(dst).tasks() == ["alpha", "beta"]
    with pytest.raises(modelstore.InputError, match="cannot be combined"):
        sync(src, dst, delete=True, tasks=["alpha"])


def test_refuses_another_base_unknown_task_and_itself(src, bert_models, tmp_path):
    other = str(tmp_path / "other")
    t = bert_models["tasks"]
    modelstore.build(other, bert_models["pre"], {"gamma": t["gamma"], "beta": t["beta"]}, keep=0.1)
    with pytest.raises(modelstore.InputError, match="different 'merged' base"):
        sync(src, other)
    assert modelstore.open(other).tasks() == ["beta", "gamma"]  # untouched
    with pytest.raises(modelstore.TaskNotFoundError, match="no task 'nope'"):
        sync(src, str(tmp_path / "x"), tasks=["nope"])
    with pytest.raises(modelstore.InputError, match="same store"):
        sync(src, src)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "not a store"}')
    with pytest.raises(modelstore.StoreNotFoundError, match="not ours"):
        sync(src, str(foreign))
    assert [p.name for p in foreign.iterdir()] == ["manifest.json"]


def test_interrupted_sync_leaves_finished_tasks_and_no_partial_one(src, tmp_path, monkeypatch):
    dst = str(tmp_path / "dst")
    real, calls = sync_mod._copy_file, {"n": 0}
    beta_dir = modelstore.open(src).info("beta")["path"]

    def flaky(src_loc, dst_loc, source, target, size):
        if beta_dir in source:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(src_loc, dst_loc, source, target, size)

    monkeypatch.setattr(sync_mod, "_copy_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        sync(src, dst)
    b = modelstore.open(dst)
    assert b.tasks() == ["alpha"]  # committed before the interruption; beta invisible
    _same_tasks(modelstore.open(src), b, ["alpha"])
    assert not (tmp_path / "dst" / "tasks" / "beta").exists()  # the interrupted copier removed its half copy
    monkeypatch.setattr(sync_mod, "_copy_file", real)
    assert sync(src, dst).copied == ["beta"]
    _same_tasks(modelstore.open(src), modelstore.open(dst), ["alpha", "beta"])
    live = modelstore.open(dst).info("beta")["path"].rsplit("/", 1)[1]
    assert {p.name for p in (tmp_path / "dst" / "tasks" / "beta").iterdir() if p.is_dir()} == {live}


def test_a_payload_missing_at_the_source_is_reported(src, tmp_path):
    import shutil

    shutil.rmtree(tmp_path / "s" / modelstore.open(src).info("alpha")["path"])
    with pytest.raises(modelstore.CorruptStoreError, match="listed in the manifest but missing"):
        sync(src, str(tmp_path / "dst"))


def test_memory_filesystem_round_trip(src, tmp_path):
    sync(src, "memory://sync-test/store", tasks=["alpha"])
    assert modelstore.open("memory://sync-test/store").tasks() == ["alpha"]
    sync("memory://sync-test/store", str(tmp_path / "back"))
    _same_tasks(modelstore.open(src), modelstore.open(str(tmp_path / "back")), ["alpha"])


def test_cli(src, tmp_path):
    from click.testing import CliRunner

    from modelstore.cli import main

    dst = str(tmp_path / "dst")
    r = CliRunner().invoke(main, ["sync", src, dst, "--dry-run"])
    assert r.exit_code == 0 and r.output.startswith("would copy 2 task(s): alpha, beta and base(s) merged")
    assert not (tmp_path / "dst").exists()
    r = CliRunner().invoke(main, ["sync", src, dst, "--task", "alpha", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["copied"] == ["alpha"]
    r = CliRunner().invoke(main, ["sync", src, dst])
    assert r.exit_code == 0 and "copied 1 task(s): beta" in r.output and "up to date: alpha" in r.output
    r = CliRunner().invoke(main, ["sync", src, dst, "--delete", "--task", "alpha"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("Error: --delete")


def test_tasks_join_a_store_initialised_from_the_same_model(bert_models, tmp_path):
    """Bases are matched by content, not by directory: two stores initialised independently from
    the same pre-trained model share tasks."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for url in (a, b):
        modelstore.init(url, pretrained=bert_models["pre"])
    modelstore.add_task(a, "alpha", bert_models["tasks"]["alpha"], keep=0.1)
    modelstore.add_task(b, "gamma", bert_models["tasks"]["gamma"], keep=0.1)
    base_dir = modelstore.open(b).manifest["bases"]["pretrained"]["path"]
    assert modelstore.open(a).manifest["bases"]["pretrained"]["path"] != base_dir
    r = sync(a, b)
    assert (r.copied, r.bases_copied) == (["alpha"], [])
    assert modelstore.open(b).tasks() == ["alpha", "gamma"]
    assert modelstore.open(b).manifest["bases"]["pretrained"]["path"] == base_dir  # b's own base, kept
    _same_tasks(modelstore.open(a), modelstore.open(b), ["alpha"])


def test_a_task_removed_while_its_files_are_copied_is_reported_vanished(src, tmp_path, monkeypatch):
    """Another writer removes a task after the sync listed its files: the copy of a file that is
    gone is not an outage, the task is reported vanished and the rest is copied."""
    original, removed = sync_mod._copy_file, []

    def racing(src_loc, dst_loc, source, rel, size):
        if "/beta/" in source and not removed:
            modelstore.remove_task(src, "beta")  # deletes its directory: this file is gone
            removed.append(source)
        return original(src_loc, dst_loc, source, rel, size)

    monkeypatch.setattr(sync_mod, "_copy_file", racing)
    monkeypatch.setattr(sync_mod, "COPY_THREADS", 1)
    dst = str(tmp_path / "dst")
    r = sync(src, dst)
    assert removed and r.vanished == ["beta"] and "beta" not in r.copied
    assert modelstore.open(dst).tasks() == sorted(set(modelstore.open(src).tasks()))
