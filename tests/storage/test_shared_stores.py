"""Many writers on one store, attacked with real processes: concurrent add-task (local disk and moto's S3
server), add-task racing rm and sync, two writers of one name, kill -9 between payload and commit,
garbage collection, and readers that hold a store while others rewrite it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import start_moto

import modelstore

WRITERS = 4


def _env(storage_options: dict | None) -> dict:
    env = dict(os.environ)
    if storage_options:
        env["MODELSTORE_STORAGE_OPTIONS"] = json.dumps(storage_options)
    return env


def _start_together(writers: list[list[list[str]]], env: dict, tmp_path) -> list[subprocess.CompletedProcess]:
    """One process per writer, all released at once when the last has loaded its interpreter and torch
    (a barrier of files); each runs its modelstore commands one after another, so the writers contend
    for several rounds without paying a process start per command. A process exits with the highest
    exit status of its commands."""
    gate = tmp_path / f"gate-{time.time_ns()}"
    gate.mkdir()
    procs = []
    for i, commands in enumerate(writers):
        code = textwrap.dedent(f"""
            import os, sys, time, torch, modelstore.cli
            open(os.path.join({str(gate)!r}, "{i}"), "w").close()
            while len(os.listdir({str(gate)!r})) < {len(writers)}:
                time.sleep(0.005)
            codes = []
            for argv in {commands!r}:
                try:
                    modelstore.cli.main.main(args=argv, prog_name="modelstore", standalone_mode=False)
                    codes.append(0)
                except SystemExit as e:
                    codes.append(e.code or 0)
            sys.exit(max(codes))
        """)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_concurrent_writers_lose_no_task(shared, bert_models, reference, tmp_path):
    url, opts = shared
    names = list(bert_models["tasks"])
    rounds = 3 if opts is None else 2  # moto answers slowly; two rounds still race four writers twice
    expected = {f"r{r}w{w}": names[(r + w) % len(names)] for r in range(rounds) for w in range(WRITERS)}
    writers = [[["add-task", url, f"r{r}w{w}", bert_models["tasks"][expected[f"r{r}w{w}"]]]
                for r in range(rounds)] for w in range(WRITERS)]
    results = _start_together(writers, _env(opts), tmp_path)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    s = modelstore.open(url, storage_options=opts)
    assert s.tasks() == sorted(expected)  # every writer's every task, none lost
    assert s.manifest["generation"] == 1 + len(expected)  # θ0, then exactly one publish per task
    for task, ck in expected.items():
        assert _same(s.load(task), reference[ck]), task
    assert not modelstore.open(url, mode="a", storage_options=opts).collect_garbage(0, force=True).removed  # no orphans


def test_two_writers_of_one_name_one_wins_one_conflicts(shared, bert_models, reference, tmp_path):
    url, opts = shared
    t = bert_models["tasks"]
    results = _start_together([[["add-task", url, "same", t["alpha"]]], [["add-task", url, "same", t["beta"]]]],
                              _env(opts), tmp_path)
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 1)
    assert ("already" in loser.stderr or "meanwhile" in loser.stderr) and "'same'" in loser.stderr, loser.stderr
    assert loser.stderr.count("\n") == 1 and "Traceback" not in loser.stderr
    winner = "alpha" if results[0].returncode == 0 else "beta"
    got = modelstore.open(url, storage_options=opts).load("same")
    assert _same(got, reference[winner])  # one whole task, never a mix
    assert modelstore.open(url, storage_options=opts).collect_garbage(0, dry_run=True).removed == []


def test_add_task_racing_rm_and_sync(tmp_path, bert_models, reference):
    url, mirror = str(tmp_path / "s"), str(tmp_path / "mirror")
    t = bert_models["tasks"]
    modelstore.init(url, bert_models["pre"])
    for name in ("alpha", "beta"):
        modelstore.add_task(url, name, t[name])
    results = _start_together([[["add-task", url, "new0", t["gamma"]], ["add-task", url, "new1", t["gamma"]]],
                               [["rm", url, "alpha"], ["rm", url, "beta"]],
                               [["sync", url, mirror], ["sync", url, mirror]]], _env(None), tmp_path)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    s = modelstore.open(url)
    assert s.tasks() == ["new0", "new1"]
    for task in s.tasks():
        s.load(task)  # every listed task loads
    m = modelstore.open(mirror)
    for task in m.tasks():  # the mirror holds whole tasks, whatever moment it copied
        m.load(task)
    assert _same(modelstore.open(url).load("new1"), reference["gamma"])


def test_writer_killed_between_payload_and_commit(tmp_path, bert_models):
    url = str(tmp_path / "s")
    t = bert_models["tasks"]
    modelstore.init(url, bert_models["pre"])
    modelstore.add_task(url, "alpha", t["alpha"])
    before = modelstore.open(url).load("alpha")
    code = textwrap.dedent(f"""
        import os, signal, modelstore
        from modelstore.storage import Location
        Location.publish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        modelstore.add_task({url!r}, "beta", {t['beta']!r})
    """)
    env = {**os.environ, "MODELSTORE_LEASE_S": "1"}  # its lease expires a second after the kill
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, env=env)
    assert p.returncode == -signal.SIGKILL
    s = modelstore.open(url)
    assert s.tasks() == ["alpha"] and _same(s.load("alpha"), before)
    orphans = [d for d in os.listdir(os.path.join(url, "tasks", "beta")) if d != "zarr.json" and "." not in d]
    assert len(orphans) == 1  # the killed writer's payload, referenced by nothing
    time.sleep(1.5)
    w = modelstore.open(url, mode="a")
    young = w.collect_garbage("1h")
    assert young.removed == [] and young.kept_young == [f"tasks/beta/{orphans[0]}"]
    done = w.collect_garbage("0s", force=True)
    assert done.removed == [f"tasks/beta/{orphans[0]}"] and done.bytes_freed > 0
    assert not os.path.exists(os.path.join(url, "tasks", "beta", orphans[0]))
    assert modelstore.add_task(url, "beta", t["beta"]).tasks() == ["alpha", "beta"]


def test_reader_follows_a_task_rewritten_by_another_writer(tmp_path, bert_models, reference):
    url = str(tmp_path / "s")
    t = bert_models["tasks"]
    modelstore.init(url, bert_models["pre"])
    modelstore.add_task(url, "x", t["alpha"])
    reader = modelstore.open(url)  # holds the old manifest
    other = modelstore.open(url, mode="a")  # another writer (a process of its own would do the same)
    other.add_task("x", t["beta"], overwrite=True)
    assert _same(reader.load("x"), reference["beta"])
    other.remove("x")
    with pytest.raises(modelstore.TaskNotFoundError, match="removed by another writer"):
        reader.load("x")


def test_gc_cli_and_durations(tmp_path, bert_models):
    from click.testing import CliRunner

    from modelstore.cli import main
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    orphan = os.path.join(url, "tasks", "x", "0123456789abcdef")
    os.makedirs(orphan)
    open(os.path.join(orphan, "zarr.json"), "w").write("{}")
    foreign = os.path.join(url, "tasks", "x", "notes")  # not a payload directory: never touched
    os.makedirs(foreign)
    r = CliRunner().invoke(main, ["gc", url, "--dry-run", "--grace", "0s", "--json"])
    assert json.loads(r.output)["removed"] == ["tasks/x/0123456789abcdef"] and os.path.isdir(orphan)
    r = CliRunner().invoke(main, ["gc", url, "--grace", "0s", "--force"])
    assert r.exit_code == 0 and "removed 1" in r.output and not os.path.exists(orphan) and os.path.isdir(foreign)
    r = CliRunner().invoke(main, ["gc", url, "--grace", "soon"])
    assert r.exit_code == 1 and "--grace takes a duration" in r.output


def test_symlinked_task_folder_is_never_written_through(tmp_path, bert_models):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    os.makedirs(os.path.join(url, "tasks"), exist_ok=True)
    os.symlink(outside, os.path.join(url, "tasks", "evil"))
    from click.testing import CliRunner

    from modelstore.cli import main
    r = CliRunner().invoke(main, ["add-task", url, "evil", bert_models["tasks"]["alpha"]])
    assert r.exit_code == 1 and "symbolic link" in r.output and r.output.count("\n") == 1, r.output
    assert [p.name for p in outside.iterdir()] == ["keep.txt"] and (outside / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["zarr.json", "manifest.json"])
def test_names_of_store_files_are_refused(tmp_path, bert_models, name):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    with pytest.raises(modelstore.InputError, match="name of a store file"):
        modelstore.add_task(url, name, bert_models["tasks"]["alpha"])


def test_interrupted_build_resumes(tmp_path, bert_models, monkeypatch):
    url = str(tmp_path / "s")
    t = bert_models["tasks"]
    real = modelstore.Store.add_task

    def dies_on_beta(self, name, *a, **k):
        if name == "beta":
            raise KeyboardInterrupt
        return real(self, name, *a, **k)

    monkeypatch.setattr(modelstore.Store, "add_task", dies_on_beta)
    with pytest.raises(KeyboardInterrupt):
        modelstore.build(url, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1)
    monkeypatch.setattr(modelstore.Store, "add_task", real)
    half = modelstore.open(url)
    assert half.tasks() == ["alpha"]
    s = modelstore.build(url, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1)
    assert s.tasks() == ["alpha", "beta"]
    assert s.manifest["bases"]["merged"]["path"] == half.manifest["bases"]["merged"]["path"]  # kept
    assert s.entry("alpha") == half.entry("alpha")  # not redone
    twin = modelstore.build(str(tmp_path / "twin"), bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]},
                            keep=0.1)
    assert _same(s.load("beta"), twin.load("beta"))
    with pytest.raises(modelstore.InputError, match="other inputs or settings"):
        modelstore.build(url, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1, lam=0.5)


def test_s3_outage_mid_add_task_and_mid_sync_then_rerun(tmp_path, bert_models):
    server, opts = start_moto()
    port = int(opts["endpoint_url"].rsplit(":", 1)[1])
    url = f"s3://models/outage-{tmp_path.name}"
    t = bert_models["tasks"]
    opts = {**opts, "config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 2}}}
    try:
        modelstore.init(url, bert_models["pre"], storage_options=opts)
        modelstore.add_task(url, "alpha", t["alpha"], storage_options=opts)
        from modelstore.format import payload
        real = payload.FlatWriter.append
        calls = {"n": 0}

        def outage(self, a):
            calls["n"] += 1
            if calls["n"] == 3:
                server.stop()
            return real(self, a)

        payload.FlatWriter.append = outage
        try:
            with pytest.raises(modelstore.StorageError, match=f"{url}.*rerun"):
                modelstore.add_task(url, "beta", t["beta"], storage_options=opts)
        finally:
            payload.FlatWriter.append = real
        server, _ = start_moto(port)  # the same server back: moto keeps its buckets in this process
        s = modelstore.open(url, storage_options=opts)
        assert s.tasks() == ["alpha"]  # nothing partial visible
        modelstore.add_task(url, "beta", t["beta"], storage_options=opts)
        assert modelstore.open(url, storage_options=opts).tasks() == ["alpha", "beta"]

        from modelstore.storage import transfer
        real_copy, calls["n"] = transfer._copy_file, 0

        def outage_copy(*a):
            calls["n"] += 1
            if calls["n"] == 4:
                server.stop()
            return real_copy(*a)

        transfer._copy_file = outage_copy
        dst = str(tmp_path / "dst")
        try:
            with pytest.raises(modelstore.StorageError, match="rerun"):
                modelstore.sync(url, dst, src_options=opts)
        finally:
            transfer._copy_file = real_copy
        server, _ = start_moto(port)
        assert sorted(modelstore.sync(url, dst, src_options=opts).copied) == ["alpha", "beta"] or \
            modelstore.open(dst).tasks() == ["alpha", "beta"]
        assert modelstore.open(dst).tasks() == ["alpha", "beta"]
        assert _same(modelstore.open(dst).load("beta"), modelstore.open(url, storage_options=opts).load("beta"))
    finally:
        server.stop()


def test_a_filesystem_without_conditional_writes_says_it_is_single_writer(bert_models):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class PlainFileSystem(MemoryFileSystem):
        """An object store with no conditional write (in memory, under its own protocol name)."""
        protocol = "plainmem"
        store: dict = {}
        pseudo_dirs = [""]

    fsspec.register_implementation("plainmem", PlainFileSystem, clobber=True)
    url = "plainmem://bucket/store"
    with pytest.warns(modelstore.SingleWriterWarning, match="single writer"):
        modelstore.init(url, bert_models["pre"])
    with pytest.warns(modelstore.SingleWriterWarning):
        modelstore.add_task(url, "alpha", bert_models["tasks"]["alpha"])
    info = modelstore.open(url).info()
    assert "single writer" in info["writers"] and info["tasks"] == ["alpha"]


def test_a_lost_response_is_resolved_by_the_writer_id_and_transient_failures_are_retried(tmp_path, bert_models,
                                                                                        monkeypatch):
    from modelstore.storage import slots
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    real = slots.LocalSlot.replace
    calls = {"n": 0}

    def flaky(self, blob, token, vouch=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("connection reset before the write")  # nothing happened: retried
        if calls["n"] == 2:
            real(self, blob, token, vouch)
            raise TimeoutError("the answer was lost")  # it happened: the writer id tells
        return real(self, blob, token, vouch)

    monkeypatch.setattr(slots.LocalSlot, "replace", flaky)
    s = modelstore.add_task(url, "alpha", bert_models["tasks"]["alpha"])
    assert calls["n"] == 2  # no third publish: the re-read showed the second had won
    m = modelstore.open(url).manifest
    from modelstore.storage.commits import WRITER_ID
    assert s.tasks() == ["alpha"] and m["generation"] == 2 and m["writer"]["id"] == WRITER_ID


def test_bench_commit_json_is_only_json_and_loses_no_task() -> None:
    """`python -m tools.bench_commit --json` on a local disk and moto's S3: stdout parses as JSON
    (moto's start banner goes to stderr) and every contended writer's task is in the manifest."""
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-m", "tools.bench_commit", "--commits", "2", "--tasks", "3",
                          "--writers", "2", "--json"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["location"] for r in rows] == ["local", "s3 (moto, 127.0.0.1)"]
    assert all(r["tasks_after_contention"] == r["tasks_expected"] for r in rows)
