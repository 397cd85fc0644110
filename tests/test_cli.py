"""The command line, driven through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from modelstore.cli import main


def run(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


@pytest.fixture()
def built(bert_models, tmp_path):
    url = tmp_path / "s"
    t = bert_models["tasks"]
    run("build", url, "--pretrained", bert_models["pre"], "--task", f"alpha={t['alpha']}",
        "--task", f"beta={t['beta']}", "--keep", "0.2", "--lambda", "0.4", "--sparsify", "magnitude",
        "--value-dtype", "float16")
    return url


def test_build_ls_info_json(built, bert_models):
    rows = json.loads(run("ls", built, "--json").output)
    assert [r["task"] for r in rows] == ["alpha", "beta"]
    assert all(r["method"] == "peru-fft" and r["keep"] == 0.2 and 0 < r["ratio"] < 0.5 for r in rows)
    info = json.loads(run("info", built, "alpha", "--json").output)
    assert info["params"]["merge"] == {"method": "task-arithmetic", "lam": 0.4}
    assert info["fidelity"] is None and rows[0]["fidelity"] is None  # not calibrated: null in both
    assert info["kept"] == int(0.2 * info["total"] + 0.5)
    store_info = json.loads(run("info", built, "--json").output)
    assert store_info["tasks"] == ["alpha", "beta"] and store_info["bytes"] > 0
    assert store_info["writers"].startswith("many writers") and store_info["generation"] == 3
    assert "alpha" in run("ls", built).output and "peru-fft" in run("info", built, "alpha").output


def test_add_task_rm_and_errors(built, bert_models):
    t = bert_models["tasks"]
    run("add-task", built, "gamma", t["gamma"], "--keep", "0.05", "--granularity", "per-tensor")
    r = run("add-task", built, "gamma", t["gamma"], code=1)
    assert r.output.strip().count("\n") == 0 and "--overwrite" in r.output and "Traceback" not in r.output
    run("add-task", built, "gamma", t["gamma"], "--overwrite")
    run("rm", built, "gamma")
    assert "gamma" not in run("ls", built).output
    for args, msg in [
        (("add-task", built, "bad/name", t["gamma"]), "invalid task name"),
        (("add-task", built, "x", t["gamma"], "--keep", "0"), "--keep"),
        (("add-task", built, "x", "/no/such/model"), "no such file"),
        (("info", built, "nope"), "no task 'nope'"),
        (("ls", built.parent / "empty"), "not a modelstore store"),
    ]:
        r = run(*args, code=1)
        assert msg in r.output and "Traceback" not in r.output, r.output


def test_export_loads_with_transformers(built, bert_models, tmp_path):
    from transformers import BertModel
    out = tmp_path / "exported"
    run("export", built, "alpha", out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    m = BertModel.from_pretrained(str(out))
    import modelstore
    sd = modelstore.open(str(built)).load("alpha")
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items() if k in sd)


def test_verify_json_and_threshold(built, bert_models):
    t = bert_models["tasks"]
    r = json.loads(run("verify", built, "alpha", "--original", t["alpha"], "--json").output)
    assert r["ok"] and 0 < r["rel_error"] < 0.05 and abs(r["kept_fraction"] - 0.2) < 1e-3
    # independent check of the overall error
    import modelstore
    got = modelstore.open(str(built)).load("alpha")
    want = bert_models["sds"]["alpha"]
    num = sum(float((got[k].double() - want[k].double()).square().sum()) for k in want)
    den = sum(float(want[k].double().square().sum()) for k in want)
    assert abs(r["rel_error"] - (num / den) ** 0.5) < 1e-9
    r = run("verify", built, "alpha", "--original", t["alpha"], "--max-rel-error", "1e-9", code=3)
    assert "FAILED" in r.output and "modelstore eval" in r.output


def test_every_command_has_help_and_json():
    from modelstore.cli import main
    assert set(main.commands) == {"build", "init", "add-task", "ls", "info", "rm", "export", "verify", "sync", "check",
                                  "gc", "eval"}
    for cmd in [[], *([c] for c in main.commands)]:
        assert "Usage:" in run(*cmd, "--help").output
    for name, cmd in main.commands.items():
        assert any("--json" in p.opts for p in cmd.params), f"{name} has no --json"


def test_writes_report_what_they_wrote_as_json(bert_models, tmp_path):
    import math

    import modelstore
    t = bert_models["tasks"]
    url = tmp_path / "s"
    built = json.loads(run("build", url, "--pretrained", bert_models["pre"], "--task", f"alpha={t['alpha']}",
                           "--keep", "0.1", "--value-dtype", "float16", "--json").output)
    s = modelstore.open(str(url))
    assert built["generation"] == s.info()["generation"] and built["bytes"] == s.info()["bytes"]
    [alpha] = built["tasks"]
    params = sum(math.prod(v.shape) for v in bert_models["sds"]["alpha"].values())
    assert alpha["task"] == "alpha" and alpha["kind"] == "fft" and alpha["params"] == params
    assert alpha["bits_per_param"] == s.entry("alpha")["bytes"] * 8 / params
    added = json.loads(run("add-task", url, "beta", t["beta"], "--value-dtype", "int4", "--json").output)
    assert added["task"] == "beta" and added["generation"] == built["generation"] + 1
    assert added["bytes"] == modelstore.open(str(url)).entry("beta")["bytes"]
    assert added["bits_per_param"] < alpha["bits_per_param"]
    out = json.loads(run("export", url, "beta", tmp_path / "x", "--json").output)
    assert out["files"] == sorted(os.listdir(tmp_path / "x")) or set(out["files"]) <= set(os.listdir(tmp_path / "x"))
    removed = json.loads(run("rm", url, "beta", "--json").output)
    assert removed == {"task": "beta", "removed": True, "generation": added["generation"] + 1}
    made = json.loads(run("init", tmp_path / "i", "--pretrained", bert_models["pre"], "--json").output)
    assert made["bases"] == ["pretrained"] and made["generation"] == 1


def test_exit_statuses_tell_errors_usage_and_findings_apart(built, bert_models, tmp_path):
    run("ls", tmp_path / "nowhere", code=1)  # an error
    run("ls", code=2)  # a malformed command line
    run("add-task", built, "x", "--keep", "nope", code=2)
    run("check", built, code=0)
    chunk = next(p for p in (built / "tasks" / "alpha").rglob("c/*") if p.is_file())
    chunk.write_bytes(b"\0" + chunk.read_bytes()[1:])
    r = run("check", built, code=3)  # it ran and found damage
    assert "DAMAGED" in r.output


def test_quiet_prints_nothing_on_success(built, bert_models):
    r = run("-q", "add-task", built, "gamma", bert_models["tasks"]["gamma"])
    assert r.output == ""
    r = run("-q", "rm", built, "nope", code=1)
    assert r.output.startswith("Error:") and r.output.count("\n") == 1


def test_quiet_after_the_command_and_zero_targets_refused(built, bert_models, tmp_path):
    """`-q` goes where users put it, after the command; a target or count of 0 is refused as
    -1 is, not taken for "not given" (0 is falsy)."""
    assert run("add-task", built, "gamma", bert_models["tasks"]["gamma"], "-q").output == ""
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(4)))
    for flag, value, says in [("--max-kl", "0", "--max-kl must be a positive number"),
                              ("--min-agreement", "0", "--min-agreement must be"),
                              ("--max-examples", "0", "--max-examples must be an integer of at least 1"),
                              ("--max-length", "0", "--max-length")]:
        r = run("add-task", built, "cal", bert_models["tasks"]["gamma"], "--calibration", cal, flag, value, code=1)
        assert r.output.startswith("Error: ") and says in r.output and r.output.count("\n") == 1, r.output
    r = run("build", tmp_path / "b", "--pretrained", bert_models["pre"], "--task", f"g={bert_models['tasks']['gamma']}",
            "--calibration", f"g={cal}", "--max-kl", "0", code=1)
    assert "--max-kl must be a positive number" in r.output
    assert [r["task"] for r in json.loads(run("ls", built, "--json").output)] == ["alpha", "beta", "gamma"]


def test_sigterm_mid_write_commits_nothing(built, bert_models):
    """`kill` (SIGTERM) during add-task cleans up as Ctrl-C does: no task, no payload left behind,
    one line, status 143. The signal arrives after the write has begun (its third tensor)."""
    code = (
        "import os, signal, sys\n"
        "from modelstore.format.payload import PayloadWriter\n"
        "add, n = PayloadWriter.add, []\n"
        "def add_then_term(self, *a, **k):\n"
        "    n.append(1)\n"
        "    if len(n) == 3: os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return add(self, *a, **k)\n"
        "PayloadWriter.add = add_then_term\n"
        "from modelstore.cli import run\n"
        f"sys.argv = ['modelstore', 'add-task', {str(built)!r}, 'gamma', {str(bert_models['tasks']['gamma'])!r}]\n"
        "run()\n")
    before = sorted(os.listdir(built / "tasks"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 143, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("Terminated: nothing partial was committed"), p.stderr
    assert sorted(os.listdir(built / "tasks")) == before and not (built / "tasks" / "gamma").exists()
    assert [r["task"] for r in json.loads(run("ls", built, "--json").output)] == ["alpha", "beta"]


def test_console_script_piped_is_quiet(built):
    exe = os.path.join(os.path.dirname(sys.executable), "modelstore")
    p = subprocess.run([exe, "ls", str(built), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(p.stdout) and p.stderr == ""


def test_version_is_the_package_version():
    from click.testing import CliRunner

    import modelstore
    from modelstore.cli import main
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"modelstore, version {modelstore.__version__}"


def test_add_task_states_and_reports_the_default_representation(built, bert_models):
    """No fft option given: DARE at m = 5% with int4 values, said by --help, the one-line report and
    --json; options given are reported as resolved."""
    helps = CliRunner().invoke(main, ["add-task", "--help"], terminal_width=400, max_content_width=400).output
    assert "[default: dare; magnitude with --granularity per-tensor, --budget or --max-rel-error]" in helps
    assert "[default: 0.05 with dare, 0.1 with magnitude]" in helps and "[default: int4;" in helps
    t = bert_models["tasks"]
    added = json.loads(run("add-task", built, "gamma", t["gamma"], "--json").output)
    assert added["setting"] == {"keep": 0.05, "values": "int4", "sparsify": "dare"}
    per = json.loads(run("add-task", built, "top", t["gamma"], "--granularity", "per-tensor", "--json").output)
    assert per["setting"] == {"keep": 0.1, "values": "int4", "sparsify": "magnitude"}
    line = run("add-task", built, "f16", t["gamma"], "--value-dtype", "float16").output
    assert "(dare, m = 0.05, float16 values)" in line and line.count("\n") == 1
