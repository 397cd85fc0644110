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
        "--task", f"beta={t['beta']}", "--keep", "0.2", "--lambda", "0.4")
    return url


def test_build_ls_info_json(built, bert_models):
    rows = json.loads(run("ls", built, "--json").output)
    assert [r["task"] for r in rows] == ["alpha", "beta"]
    assert all(r["method"] == "peru-fft" and r["keep"] == 0.2 and 0 < r["ratio"] < 0.5 for r in rows)
    info = json.loads(run("info", built, "alpha", "--json").output)
    assert info["params"]["merge"] == {"method": "task-arithmetic", "lam": 0.4}
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
    r = run("verify", built, "alpha", "--original", t["alpha"], "--max-rel-error", "1e-9", code=1)
    assert "FAILED" in r.output


def test_every_command_has_help():
    from modelstore.cli import main
    assert set(main.commands) == {"build", "init", "add-task", "ls", "info", "rm", "export", "verify", "sync", "check", "gc", "eval"}
    for cmd in [[], *([c] for c in main.commands)]:
        assert "Usage:" in run(*cmd, "--help").output


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
