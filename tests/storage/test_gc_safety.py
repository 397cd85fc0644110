"""gc never destroys a committed task, attacked with real processes: gc looped with no grace (forced)
and with the safety floor against concurrent writers on a local disk and moto's S3 server, a writer
stalled on the commit lock while gc runs (its lease renewed, starved, or ignored by a gc that deletes
anyway), the lease's compare-and-swap on S3, the safety floor, the leftovers gc removes, and store
paths that do not exist."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from test_shared_stores import _env, _same

import modelstore
from modelstore.storage.commits import PayloadLostError

WRITER = """
import json, os, sys, time
import modelstore.cli
{patch}
gate = {gate!r}
if gate:
    open(os.path.join(gate, str(os.getpid())), "w").close()
    while len(os.listdir(gate)) < {count}:
        time.sleep(0.005)
for argv in {commands!r}:
    try:
        modelstore.cli.main.main(args=argv, prog_name="modelstore", standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    print("outcome", json.dumps({{"task": argv[2], "code": code}}), flush=True)
"""
#: A writer whose lease is never renewed in the background (a starved or frozen renewal thread).
STARVED = "import modelstore.storage.leases as leases; leases.Lease._run = lambda self: None"


def _writers(commands: list[list[list[str]]], env: dict, tmp_path, patch: str = "") -> list[subprocess.Popen]:
    """One process per list of commands, released together once all have imported torch."""
    gate = tmp_path / f"gate-{time.time_ns()}"
    gate.mkdir()
    return [subprocess.Popen([sys.executable, "-c", WRITER.format(patch=patch, gate=str(gate), count=len(commands),
                                                                   commands=c)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]


def _outcomes(procs: list[subprocess.Popen]) -> tuple[dict[str, int], str]:
    """Each command's exit status by task name, and every writer's stderr."""
    codes, errors = {}, ""
    for p in procs:
        out, err = p.communicate(timeout=120)
        outcomes = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("outcome ")]
        codes.update({r["task"]: r["code"] for r in outcomes})
        errors += err
    return codes, errors


def _payload_files(url: str, opts: dict | None) -> set[str]:
    store = modelstore.open(url, storage_options=opts)
    return {e["path"] for e in [*store.manifest["bases"].values(), *store.manifest["tasks"].values()]}


@pytest.mark.parametrize("grace", ["0s", "10m"])
def test_gc_looped_against_concurrent_writers_damages_no_committed_task(shared, grace, bert_models, reference,
                                                                         tmp_path):
    url, opts = shared
    names = list(bert_models["tasks"])
    # moto answers slowly, and in this process: fewer rounds there, and one with the floor (whose gc removes less)
    writers, rounds = (3, 2) if opts is None else (2, 2 if grace == "0s" else 1)
    expected = {f"r{r}w{w}": names[(r + w) % len(names)] for r in range(rounds) for w in range(writers)}
    orphan = None
    if opts is None:  # a killed writer's payload, old and unleased: gc must still collect it
        orphan = os.path.join(url, "tasks", "dead", "0123456789abcdef")
        os.makedirs(orphan)
        open(os.path.join(orphan, "zarr.json"), "w").write("{}")
        os.utime(orphan + "/zarr.json", (time.time() - 3600, time.time() - 3600))
    env = {**_env(opts), "MODELSTORE_LEASE_S": "10"}  # gc forced to no grace: only renewed leases keep payloads
    procs = _writers([[["add-task", url, f"r{r}w{w}", bert_models["tasks"][expected[f"r{r}w{w}"]]]
                       for r in range(rounds)] for w in range(writers)], env, tmp_path)
    gc = modelstore.open(url, mode="a", storage_options=opts)
    runs, removed, leased = 0, [], 0
    while any(p.poll() is None for p in procs):
        report = gc.collect_garbage(grace, force=grace == "0s")
        removed, leased, runs = removed + report.removed, leased + len(report.kept_leased), runs + 1
        time.sleep(0.05 if opts is None else 0.3)
    codes, errors = _outcomes(procs)
    assert runs >= 3 and leased > 0, (runs, leased)  # gc met payloads in flight
    added = sorted(t for t, c in codes.items() if c == 0)
    assert added == sorted(expected), errors  # leased payloads are never collected: every writer succeeds
    s = modelstore.open(url, storage_options=opts)
    assert s.tasks() == added
    for task in added:  # every task reported added loads, bit-identical to a single writer's
        assert _same(s.load(task), reference[expected[task]]), task
    assert s.check().ok  # 0 committed tasks damaged
    assert not set(removed) & _payload_files(url, opts)
    if orphan is not None:
        assert "tasks/dead/0123456789abcdef" in removed and not os.path.exists(orphan)


def _hold_lock(url: str, seconds: float, during=None) -> None:
    """Hold the store's commit lock for `seconds` (as a stuck writer would), calling `during()` meanwhile."""
    fd = os.open(os.path.join(url, ".manifest.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        t0 = time.monotonic()
        if during is not None:
            during()
        time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    finally:
        os.close(fd)


def _wait_for_payload(url: str, task: str, timeout: float = 60) -> str:
    """The writer's payload directory, once written whole (its tensor table, written last, is in its
    group metadata): the writer then goes on to commit."""
    deadline = time.monotonic() + timeout
    folder = os.path.join(url, "tasks", task)
    while time.monotonic() < deadline:
        for uid in (d for d in os.listdir(folder) if len(d) == 16) if os.path.isdir(folder) else ():
            with contextlib.suppress(FileNotFoundError):
                if b'"tensors"' in open(os.path.join(folder, uid, "zarr.json"), "rb").read():
                    return f"tasks/{task}/{uid}"
        time.sleep(0.05)
    raise AssertionError("the writer wrote no payload")


def _start_writer(url: str, bert_models, tmp_path, patch: str = "") -> subprocess.Popen:
    env = {**os.environ, "MODELSTORE_LEASE_S": "1"}
    return _writers([[["add-task", url, "late", bert_models["tasks"]["alpha"]]]], env, tmp_path, patch)[0]


def test_writer_stalled_on_the_lock_keeps_its_payload_while_its_lease_is_renewed(tmp_path, bert_models, reference):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    p = _start_writer(url, bert_models, tmp_path)
    reports = []

    def gc_meanwhile():
        rel = _wait_for_payload(url, "late")
        for _ in range(3):  # well past the lease's 1 s: only its renewals keep it
            reports.append((rel, modelstore.open(url, mode="a").collect_garbage(0, force=True)))
            time.sleep(1.0)

    _hold_lock(url, 8.0, gc_meanwhile)
    codes, errors = _outcomes([p])
    assert codes == {"late": 0}, errors
    assert all(r.kept_leased == [rel] and not r.removed for rel, r in reports)
    s = modelstore.open(url)
    assert s.entry("late")["path"] == reports[0][0] and _same(s.load("late"), reference["alpha"])


def test_writer_whose_payload_is_deleted_during_its_lock_wait_publishes_nothing(tmp_path, bert_models):
    """A gc that ignores the lease (another implementation, an old version) deletes the payload of a
    writer stalled on the lock: the writer's check inside the lock finds it and fails cleanly."""
    import shutil
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    before = modelstore.open(url).manifest
    p = _start_writer(url, bert_models, tmp_path)
    _hold_lock(url, 3.0, lambda: shutil.rmtree(os.path.join(url, _wait_for_payload(url, "late"), "values")))
    codes, errors = _outcomes([p])
    assert codes == {"late": 1}
    assert errors.count("\n") == 1 and "Traceback" not in errors and "nothing was published" in errors, errors
    after = modelstore.open(url)
    assert after.manifest == before and after.tasks() == []  # never a dangling published task
    assert not os.path.exists(os.path.join(url, "tasks", "late"))  # its own leftovers went with it


def test_writer_whose_lease_starves_during_its_lock_wait_is_intact_or_fails_cleanly(tmp_path, bert_models,
                                                                                    reference):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    p = _start_writer(url, bert_models, tmp_path, patch=STARVED)
    runner: list[threading.Thread] = []

    def gc_meanwhile():
        _wait_for_payload(url, "late")
        time.sleep(1.5)  # the unrenewed lease has expired: gc waits for the lock to delete the payload
        runner.append(threading.Thread(target=modelstore.open(url, mode="a").collect_garbage, args=(0,),
                                       kwargs={"force": True}))
        runner[0].start()
        time.sleep(0.5)

    _hold_lock(url, 4.0, gc_meanwhile)
    runner[0].join(timeout=60)
    codes, errors = _outcomes([p])
    s = modelstore.open(url)
    if codes == {"late": 0}:  # it took the lock before gc: published whole, and gc then left it alone
        assert _same(s.load("late"), reference["alpha"]) and s.check().ok
    else:
        assert codes == {"late": 1} and errors.count("\n") == 1 and "nothing was published" in errors, errors
        assert s.tasks() == []


def test_s3_lease_is_compare_and_swapped_between_writer_and_gc(s3_server):
    """On S3, gc breaks an expired lease only if the writer did not renew it meanwhile, and a writer
    whose lease gc broke cannot renew it, so it never publishes."""
    from modelstore.storage import Location
    from modelstore.storage.commits import WRITER_ID
    from modelstore.storage.leases import Lease, break_lease, lease_state
    loc = Location("s3://models/leases", s3_server, read_only=False)
    lease = Lease(loc, "tasks/t/0123456789abcdef", WRITER_ID, ttl_s=60)
    try:
        state, token = lease_state(loc, lease.payload, time.time())
        assert state == "live"
        assert lease_state(loc, lease.payload, time.time() + 61)[0] == "expired"
        lease.confirm()  # renewed after gc read it: gc's break must fail
        assert not break_lease(loc, lease.payload, token)
        state, token = lease_state(loc, lease.payload, time.time() + 61)
        assert break_lease(loc, lease.payload, token)  # not renewed since gc read it: broken
        assert lease_state(loc, lease.payload, time.time())[0] == "broken"
        with pytest.raises(PayloadLostError, match="nothing was published"):
            lease.confirm()
    finally:
        lease.release()
    assert lease_state(loc, lease.payload, time.time()) is None
    assert not break_lease(loc, lease.payload, token)  # deleted by its writer: nothing to break


def test_s3_writer_whose_payload_gc_collects_while_it_backs_off_publishes_nothing(s3_server, bert_models, tmp_path):
    """A writer that backs off (here: 4 s before its first publish) with its lease starved: gc breaks the
    lease and deletes the payload, and the writer then fails cleanly instead of publishing it."""
    url = f"s3://models/backoff-{tmp_path.name}"
    modelstore.init(url, bert_models["pre"], storage_options=s3_server)
    marker = tmp_path / "written"
    patch = STARVED + textwrap.dedent(f"""
        import time, modelstore.storage.commits as c, modelstore.storage.transaction as st
        real = c.commit
        st.commit = lambda *a, **k: (open({str(marker)!r}, "w").close(), time.sleep(4), real(*a, **k))[2]
    """)
    env = {**_env(s3_server), "MODELSTORE_LEASE_S": "1"}
    p = _writers([[["add-task", url, "late", bert_models["tasks"]["alpha"]]]], env, tmp_path, patch)[0]
    while not marker.exists() and p.poll() is None:
        time.sleep(0.05)
    time.sleep(1.5)  # its unrenewed lease has expired
    gc = modelstore.open(url, mode="a", storage_options=s3_server)
    removed = []
    while p.poll() is None:
        removed += gc.collect_garbage(0, force=True).removed
        time.sleep(0.2)
    codes, errors = _outcomes([p])
    assert codes == {"late": 1} and errors.count("\n") == 1 and "nothing was published" in errors, errors
    assert len(removed) == 1 and removed[0].startswith("tasks/late/")
    assert modelstore.open(url, storage_options=s3_server).tasks() == []


def test_grace_under_the_floor_needs_force(tmp_path, bert_models):
    from click.testing import CliRunner

    from modelstore.cli import main
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    w = modelstore.open(url, mode="a")
    for grace in (0, "0s", "9m", 599):
        with pytest.raises(modelstore.InputError, match="10-minute safety floor.*--force"):
            w.collect_garbage(grace)
    assert w.collect_garbage("10m").removed == [] and w.collect_garbage(0, force=True).removed == []
    assert w.collect_garbage(0, dry_run=True).removed == []  # deletes nothing: no floor
    r = CliRunner().invoke(main, ["gc", url, "--grace", "0s"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "safety floor" in r.output and "--force" in r.output
    r = CliRunner().invoke(main, ["gc", url, "--grace", "0s", "--force"])
    assert r.exit_code == 0, r.output


def test_gc_removes_leftovers_of_killed_processes_and_empty_task_folders(tmp_path, bert_models):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    modelstore.add_task(url, "gone", bert_models["tasks"]["alpha"])
    modelstore.add_task(url, "kept", bert_models["tasks"]["beta"])
    modelstore.open(url, mode="a").remove("gone")
    assert not os.path.exists(os.path.join(url, "tasks", "gone"))  # rm leaves no empty folder

    def plant(rel: str, age_s: float, content: str = "x") -> str:
        path = os.path.join(url, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write(content)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return rel

    hex32 = "0123456789abcdef" * 2
    kept_uid = modelstore.open(url).entry("kept")["path"].rsplit("/", 1)[1]
    old = [plant(f"manifest.json.{hex32}.tmp", 3600), plant(f"tasks/zarr.{hex32}.partial", 3600),
           plant(f"tasks/kept/zarr.{hex32}.partial", 3600), plant("tasks/empty/zarr.json", 3600, "{}"),
           plant("tasks/dead/fedcba9876543210.lease", 3600, "{\"ttl_s\": 60}"),  # its writer died before its payload
           plant(f"tasks/kept/{kept_uid}.lease", 3600, "{\"ttl_s\": 60}")]  # its writer died after publishing
    os.utime(os.path.join(url, "tasks", "dead"), (time.time() - 3600, time.time() - 3600))
    young = [plant(f"manifest.json.{'a' * 32}.tmp", 0), plant(f"bases/zarr.{'b' * 32}.partial", 0)]
    foreign = [plant("tasks/kept/notes.txt", 3600), plant("manifest.json.bak", 3600), plant("tasks/zarr.partial", 3600)]
    before = modelstore.open(url).load("kept")
    w = modelstore.open(url, mode="a")
    dry = w.collect_garbage("10m", dry_run=True)
    assert all(os.path.exists(os.path.join(url, r)) for r in old)
    r = w.collect_garbage("10m")
    expect = sorted(old[:3] + ["tasks/empty/", "tasks/dead/fedcba9876543210.lease", "tasks/dead/"] + old[5:])
    assert dry.leftovers == [x for x in expect if x != "tasks/dead/"]  # the folder empties only on deleting
    assert r.leftovers == expect, r.leftovers
    assert not any(os.path.exists(os.path.join(url, x)) for x in old + ["tasks/empty", "tasks/dead"])
    assert all(os.path.exists(os.path.join(url, x)) for x in young + foreign)
    # a forced gc at grace 0 takes a fresh temporary manifest (only a dead writer leaves one outside
    # the commit lock it holds) but not zarr's fresh temporary metadata: a live writer renames it
    assert w.collect_garbage(0, force=True).leftovers == [young[0]]
    assert os.path.exists(os.path.join(url, young[1]))
    os.utime(os.path.join(url, young[1]), (time.time() - 61, time.time() - 61))
    assert w.collect_garbage(0, force=True).leftovers == [young[1]]
    s = modelstore.open(url)
    assert s.tasks() == ["kept"] and _same(s.load("kept"), before) and s.check().ok


@pytest.mark.parametrize("argv", [["add-task", "{url}", "t", "{ck}"], ["rm", "{url}", "t"], ["gc", "{url}"],
                                  ["gc", "{url}", "--grace", "0s", "--force"]])
def test_a_store_path_that_does_not_exist_is_an_error_and_stays_absent(tmp_path, bert_models, argv):
    url = str(tmp_path / "nowhere" / "store")
    args = [a.format(url=url, ck=bert_models["tasks"]["alpha"]) for a in argv]
    p = subprocess.run([sys.executable, "-m", "modelstore", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "not a modelstore store" in p.stderr and url in p.stderr
    assert not os.path.exists(tmp_path / "nowhere")
