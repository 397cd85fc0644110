"""`modelstore build --config`: YAML settings equal to the flags, unknown keys refused; merge flags
generated from the methods' declared options."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import modelstore
from modelstore.cli import main
from modelstore.config import load_config
from modelstore.merging import METHODS


def run(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


def _write(path, text):
    path.write_text(text)
    return path


def test_config_builds_the_same_store_as_the_flags(bert_models, tmp_path):
    t = bert_models["tasks"]
    cfg = _write(tmp_path / "store.yaml", f"""
pretrained: {bert_models['pre']}
tasks: {{alpha: {t['alpha']}, beta: {t['beta']}}}
merge: {{method: ties, lambda: 0.8, density: 0.3, granularity: global}}
keep: 0.2
granularity: per-tensor
value_dtype: float32
exclude: embeddings
""")
    run("build", tmp_path / "a", "--config", cfg)
    run("build", tmp_path / "b", "--pretrained", bert_models["pre"], "--task", f"alpha={t['alpha']}",
        "--task", f"beta={t['beta']}", "--merge", "ties", "--lambda", "0.8", "--density", "0.3",
        "--ties-granularity", "global", "--keep", "0.2", "--granularity", "per-tensor",
        "--value-dtype", "float32", "--exclude", "embeddings")
    a, b = modelstore.open(str(tmp_path / "a")), modelstore.open(str(tmp_path / "b"))
    ma, mb = a.manifest["bases"]["merged"], b.manifest["bases"]["merged"]
    assert ma["merge"] == mb["merge"] == {"method": "ties", "lam": 0.8, "density": 0.3, "majority_sign": "total",
                                          "granularity": "global"}
    assert ma["selection"] == mb["selection"] == {"include": None, "exclude": "embeddings"}
    assert ma["table_sha256"] == mb["table_sha256"] and ma["arrays"] == mb["arrays"]
    for task in ("alpha", "beta"):
        assert a.entry(task)["params"] == b.entry(task)["params"]
        assert a.entry(task)["params"]["granularity"] == "per-tensor"
        assert all(torch.equal(v, b.load(task)[k]) for k, v in a.load(task).items())


def test_flags_override_the_config_and_tasks_add_up(bert_models, tmp_path):
    t = bert_models["tasks"]
    cfg = _write(tmp_path / "c.yaml", f"pretrained: {bert_models['pre']}\ntasks: {{alpha: {t['alpha']}}}\n"
                                      "merge: {method: task-arithmetic, lambda: 0.5}\nkeep: 0.3\n")
    run("build", tmp_path / "s", "--config", cfg, "--keep", "0.05", "--task", f"gamma={t['gamma']}")
    s = modelstore.open(str(tmp_path / "s"))
    assert s.tasks() == ["alpha", "gamma"]
    assert s.manifest["bases"]["merged"]["merge"] == {"method": "task-arithmetic", "lam": 0.5}
    assert s.entry("alpha")["params"]["keep"] == 0.05
    run("build", tmp_path / "s2", "--config", cfg, "--merge", "average")
    assert modelstore.open(str(tmp_path / "s2")).manifest["bases"]["merged"]["merge"] == {"method": "average"}


@pytest.mark.parametrize("text, msg", [
    ("pretrained: x\ntasks: {a: b}\nkepp: 0.1\n", "unknown key 'kepp'"),
    ("pretrained: x\ntasks: {a: b}\nmerge: {method: ties, lamda: 1}\n", "merge method 'ties' has no option 'lamda'"),
    ("pretrained: x\ntasks: {a: b}\nmerge: {method: magic}\n", "unknown merge method 'magic'"),
    ("pretrained: x\ntasks: {a: b}\nmerge: {lambda: 1}\n", "needs a `method:`"),
    ("pretrained: x\ntasks: [a, b]\n", "tasks must map names to paths"),
    ("pretrained: x\ntasks: {a: b\n", "not valid YAML at line"),
    ("- just\n- a list\n", "a build config is a mapping"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, msg):
    cfg = _write(tmp_path / "bad.yaml", text)
    r = run("build", tmp_path / "s", "--config", cfg, code=1)
    assert msg in r.output and r.output.strip().count("\n") == 0 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_missing_config_file_and_missing_pretrained(tmp_path, bert_models):
    r = run("build", tmp_path / "s", "--config", tmp_path / "nope.yaml", code=1)
    assert "cannot read config" in r.output
    cfg = _write(tmp_path / "c.yaml", f"tasks: {{alpha: {bert_models['tasks']['alpha']}}}\n")
    assert "no pre-trained model" in run("build", tmp_path / "s", "--config", cfg, code=1).output


def test_load_config_maps_declared_keys_to_keywords(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", "pretrained: p\ntasks: {a: x}\n"
                                                  "merge: {method: ties, lambda: 1.5, majority_sign: frequency}\n"))
    assert cfg.merge == "ties" and cfg.merge_options == {"lam": 1.5, "majority_sign": "frequency"}
    assert cfg.build_kwargs()["tasks"] == {"a": "x"}


def test_merge_flags_come_from_the_declared_options():
    """Every declared option has its flag on `build`, its default in the help, and methods sharing a
    flag agree on what it means."""
    help_text = " ".join(run("build", "--help").output.split())
    seen: dict[str, tuple] = {}
    for m in METHODS:
        for o in m.declared:
            assert o.flag in help_text, o.flag
            assert f"{m.name}: {o.default}" in help_text, (m.name, o.flag)
            meaning = (o.name, o.key, o.choices, type(o.default))
            assert seen.setdefault(o.flag, meaning) == meaning, f"{o.flag} means two things"
    assert seen["--lambda"][0] == "lam" and seen["--ties-granularity"][0] == "granularity"


def test_a_declared_option_reaches_the_merge(bert_models, tmp_path):
    t = bert_models["tasks"]
    run("build", tmp_path / "s", "--pretrained", bert_models["pre"], "--task", f"alpha={t['alpha']}",
        "--merge", "ties", "--majority-sign", "frequency")
    info = json.loads(run("info", tmp_path / "s", "alpha", "--json").output)
    assert info["params"]["merge"]["majority_sign"] == "frequency"


def test_a_config_without_fft_options_builds_the_default_and_magnitude_options_choose_magnitude(bert_models,
                                                                                                 tmp_path):
    t = bert_models["tasks"]
    head = f"pretrained: {bert_models['pre']}\ntasks: {{alpha: {t['alpha']}}}\n"
    run("build", tmp_path / "d", "--config", _write(tmp_path / "d.yaml", head))
    p = modelstore.open(str(tmp_path / "d")).entry("alpha")["params"]
    assert (p["sparsify"], p["keep"], p["value_dtype"]) == ("dare", 0.05, "int4")
    run("build", tmp_path / "m", "--config", _write(tmp_path / "m.yaml", head + "granularity: per-tensor\n"))
    p = modelstore.open(str(tmp_path / "m")).entry("alpha")["params"]
    assert "sparsify" not in p and (p["granularity"], p["keep"], p["value_dtype"]) == ("per-tensor", 0.1, "int4")
