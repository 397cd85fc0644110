"""Symbolic links planted in a store are damage: no read and no copy follows one (sync would
otherwise copy the bytes of a file outside the store into the destination, and a load serve them),
and `check` names them. Also: a manifest that lost its checksum, concurrent first syncs into one
new destination, and a sync into a bucket that does not exist."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import start_moto

import modelstore
from modelstore.cli import main

V1 = Path(__file__).parents[1] / "data" / "v1" / "store"
SECRET = b"bytes of a file outside the store"


@pytest.fixture(scope="module")
def s3():
    server, opts = start_moto()
    yield opts
    server.stop()


@pytest.fixture()
def kept_files_store(bert_models, tmp_path) -> str:
    """A store whose base keeps a model file (vocab.txt) beside its arrays."""
    pre = tmp_path / "pre"
    shutil.copytree(bert_models["pre"], pre)
    (pre / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\n")
    url = str(tmp_path / "s")
    modelstore.build(url, str(pre), {"alpha": bert_models["tasks"]["alpha"]}, keep=0.1)
    assert "vocab.txt" in modelstore.open(url).manifest["bases"]["merged"]["files"]
    return url


def _payload(url: str, task: str) -> Path:
    return Path(url) / modelstore.open(url).info(task)["path"]


def _relink(path: Path, outside: Path) -> None:
    """Replace `path` (a file or directory) by a symbolic link to an identical copy outside the
    store: the bytes read through it are the right ones, only the link is wrong."""
    if path.is_dir():
        shutil.copytree(path, outside)
        shutil.rmtree(path)
    else:
        shutil.copyfile(path, outside)
        path.unlink()
    path.symlink_to(outside)


def _refused(url: str, rel: str, load) -> None:
    """Loading and checking refuse the store, naming the link `rel`, in one line."""
    with pytest.raises(modelstore.CorruptStoreError, match=f"{rel} is a symbolic link") as e:
        load(modelstore.open(url))
    assert "\n" not in str(e.value)
    report = modelstore.open(url).check()
    assert not report.ok and any(f"{rel} is a symbolic link" in why for why in report.damaged.values())
    r = CliRunner().invoke(main, ["check", url])
    assert r.exit_code != 0 and rel in r.output


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


# ---- sync ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
def test_sync_does_not_copy_what_a_planted_link_points_at(store2, tmp_path, where, request):
    outside = tmp_path / "secret.txt"
    outside.write_bytes(SECRET)
    rel = f"{modelstore.open(store2).info('alpha')['path']}/notes.txt"
    (Path(store2) / rel).symlink_to(outside)
    if where == "local":
        dst, opts = str(tmp_path / "dst"), None
    else:
        dst, opts = "s3://models/linked", request.getfixturevalue("s3")
    with pytest.raises(modelstore.CorruptStoreError, match=f"{rel} is a symbolic link") as e:
        modelstore.sync(store2, dst, dst_options=opts)
    assert "\n" not in str(e.value)
    if where == "local":
        assert SECRET not in _all_bytes(tmp_path / "dst")
    else:
        import s3fs
        fs = s3fs.S3FileSystem(**opts)
        assert all(SECRET not in fs.cat_file(p) for p in fs.find("models/linked"))
    dest = modelstore.open(dst, storage_options=opts)
    assert "alpha" not in dest.tasks()  # what was sound before the link may have been copied; alpha was not
    _refused(store2, rel, lambda s: s.load("alpha"))


def test_sync_refuses_linked_group_metadata(store2, tmp_path):
    rel = "tasks/alpha/zarr.json"
    _relink(Path(store2) / rel, tmp_path / "meta.json")
    with pytest.raises(modelstore.CorruptStoreError, match=f"{rel} is a symbolic link"):
        modelstore.sync(store2, str(tmp_path / "dst"), tasks=["alpha"])
    assert modelstore.open(store2).load("alpha")  # a load reads no group metadata above its payload
    report = modelstore.open(store2).check()  # but check reports what sync refuses
    assert report.sound == ["base 'merged'", "task 'alpha'", "task 'beta'"]
    assert f"{rel} is a symbolic link" in report.damaged["store"]


# ---- load and check --------------------------------------------------------------------------------

def test_a_linked_chunk_file(store2, tmp_path):
    chunk = next(p for p in sorted((_payload(store2, "alpha") / "values").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    rel = os.path.relpath(chunk, store2)
    _relink(chunk, tmp_path / "chunk")
    _refused(store2, rel, lambda s: s.load("alpha"))


def test_a_linked_task_directory(store2, tmp_path):
    payload = _payload(store2, "alpha")
    rel = os.path.relpath(payload, store2)
    _relink(payload, tmp_path / "payload")
    _refused(store2, rel, lambda s: s.load("alpha"))
    assert modelstore.open(store2).load("beta")  # the other task reads on


def test_a_linked_base_and_tasks_directory(store2, tmp_path):
    _relink(Path(store2) / "tasks", tmp_path / "tasks")
    _refused(store2, "tasks", lambda s: s.load("beta"))


def test_a_linked_model_file(kept_files_store, tmp_path):
    url = kept_files_store
    rel = f"{modelstore.open(url).manifest['bases']['merged']['path']}/files/vocab.txt"
    _relink(Path(url) / rel, tmp_path / "vocab.txt")
    _refused(url, rel, lambda s: s.model_files("merged"))


def test_a_linked_notes_file_in_a_payload(store2, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_bytes(SECRET)
    rel = f"{modelstore.open(store2).info('alpha')['path']}/notes.txt"
    (Path(store2) / rel).symlink_to(outside)
    _refused(store2, rel, lambda s: s.load("alpha"))


def test_a_linked_manifest(store2, tmp_path):
    _relink(Path(store2) / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(modelstore.CorruptStoreError, match="manifest.json is a symbolic link"):
        modelstore.open(store2)
    r = CliRunner().invoke(main, ["check", store2])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "manifest.json is a symbolic link" in r.output


# ---- a manifest without its checksum ----------------------------------------------------------------

def _edit_manifest(url: str, edit) -> None:
    path = Path(url) / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("version", [2, 1])
def test_a_manifest_whose_checksum_was_deleted_is_refused(bert_models, tmp_path, version):
    """The attack: delete the checksum and switch a task onto the other base (other weights,
    served silently); lowering the version to 1 does not help, since version-1 writers recorded
    no chunk digests."""
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]}, keep=0.1)
    modelstore.open(url, mode="a").add_pretrained(bert_models["pre"])
    want = modelstore.open(url).load("alpha")

    def edit(m):
        del m["checksum"]
        m["version"] = version
        m["tasks"]["alpha"]["base"] = "pretrained"

    _edit_manifest(url, edit)
    with pytest.raises(modelstore.CorruptStoreError, match="manifest.json has no checksum") as e:
        got = modelstore.open(url).load("alpha")
        assert any(not got[k].equal(want[k]) for k in want)  # what the old code served
    assert "\n" not in str(e.value)
    r = CliRunner().invoke(main, ["check", url])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no checksum" in r.output


def test_a_version_1_manifest_without_checksum_still_opens(tmp_path):
    url = tmp_path / "v1"
    shutil.copytree(V1, url)
    assert "checksum" not in json.loads((url / "manifest.json").read_text())
    s = modelstore.open(str(url))
    assert s.tasks() == ["a", "b", "bf", "l"] and s.check().ok


# ---- concurrent first syncs into one new destination -------------------------------------------------

def _sync_rounds(barrier, src: str, dests: list[str], opts, results) -> None:
    import modelstore as ms
    for dst in dests:
        barrier.wait()
        try:
            ms.sync(src, dst, tasks=["a"], dst_options=opts)
            results.put(None)
        except Exception:  # noqa: BLE001 - the test prints what went wrong
            results.put(traceback.format_exc(limit=-3))


def _race(src: str, dests: list[str], opts, writers: int = 6) -> list[str]:
    """`writers` processes sync task a of `src` into each of `dests` at once (one destination per round)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_sync_rounds, args=(barrier, src, dests, opts, results)) for _ in range(writers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(writers * len(dests))]
    for p in procs:
        p.join(60)
    return [g for g in got if g is not None]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_first_syncs_into_one_new_destination(tmp_path, where, request):
    rounds = 3
    if where == "local":
        dests, opts = [str(tmp_path / f"dst{i}") for i in range(rounds)], None
    else:
        dests, opts = [f"s3://models/race{i}" for i in range(rounds)], request.getfixturevalue("s3")
    failures = _race(str(V1), dests, opts)
    assert not failures, failures[0]
    want = modelstore.open(str(V1))
    for dst in dests:
        s = modelstore.open(dst, storage_options=opts)
        assert s.tasks() == ["a"] and s.check().ok
        got, ref = s.load("a"), want.load("a")
        assert got.keys() == ref.keys() and all(got[k].equal(ref[k]) for k in ref)


# ---- a destination bucket that does not exist -----------------------------------------------------

def test_sync_into_a_missing_bucket(s3, tmp_path):
    for dry_run in (True, False):
        with pytest.raises(modelstore.InputError, match="bucket 'no-such-bucket' does not exist") as e:
            modelstore.sync(str(V1), "s3://no-such-bucket/store", dst_options=s3, dry_run=dry_run)
        assert "\n" not in str(e.value)
