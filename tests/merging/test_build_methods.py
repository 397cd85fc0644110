"""Every merge method through `build`: the stored base equals modelstore.merge on the same inputs,
and each task round-trips."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import modelstore
from modelstore.cli import main


@pytest.fixture(scope="module")
def stats_files(bert_models, tmp_path_factory):
    """Per-task Fisher and Gram statistics (random, positive / PSD), saved as safetensors."""
    root = tmp_path_factory.mktemp("stats")
    g = torch.Generator().manual_seed(5)
    sd0 = bert_models["sd0"]
    fishers, grams = {}, {}
    for t in bert_models["tasks"]:
        f = {k: torch.rand(v.shape, generator=g) + 0.01 for k, v in sd0.items() if v.dtype.is_floating_point}
        fishers[t] = str(root / f"{t}-fisher.safetensors")
        save_file(f, fishers[t])
        gr = {}
        for k, v in sd0.items():
            if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k:
                x = torch.randn(3 * v.shape[1], v.shape[1], generator=g)
                gr[k] = x.T @ x / x.shape[0]
        grams[t] = str(root / f"{t}-gram.safetensors")
        save_file(gr, grams[t])
    return {"fisher": fishers, "regmean": grams}


CASES = [
    ("task-arithmetic", {"lam": 0.5}),
    ("average", {}),
    ("none", {}),
    ("ties", {"density": 0.3, "lam": 1.0, "majority_sign": "frequency"}),
    ("ties", {"density": 0.3, "granularity": "global"}),
    ("fisher", {"eps": 1e-6}),
    ("regmean", {"alpha": 0.9}),
]


@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_method_through_build(bert_models, stats_files, tmp_path, method, options):
    tasks = bert_models["tasks"]
    stats = stats_files.get(method)
    data = {"fisher": "fishers", "regmean": "grams"}.get(method)
    in_memory = dict(options)
    if data:
        in_memory[data] = [stats[t] for t in tasks]
    want = modelstore.merge(method, bert_models["sd0"], [bert_models["sds"][t] for t in tasks], **in_memory)
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], tasks, merge=method, merge_options=options,
                         stats=stats, keep=1.0, value_dtype="float32")
    base = s.base("pretrained" if method == "none" else "merged")
    for k, v in want.items():
        torch.testing.assert_close(base[k], v, rtol=1e-5, atol=1e-6, msg=f"{method} {k}")
    assert s.manifest["bases"]["pretrained" if method == "none" else "merged"]["merge"]["method"] == method
    for t in tasks:
        got = s.load(t)
        for k, v in bert_models["sds"][t].items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_cli_merge_flags(bert_models, stats_files, tmp_path):
    t = bert_models["tasks"]
    args = ["build", str(tmp_path / "s"), "--pretrained", bert_models["pre"], "--merge", "regmean", "--alpha", "0.5"]
    for name, path in t.items():
        args += ["--task", f"{name}={path}", "--stats", f"{name}={stats_files['regmean'][name]}"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    merged = modelstore.open(str(tmp_path / "s")).manifest["bases"]["merged"]
    assert merged["merge"] == {"method": "regmean", "alpha": 0.5}
    for bad, msg in [(["--merge", "fisher", "--density", "0.2"], "--density does not apply"),
                     (["--merge", "fisher"], "--stats"),
                     (["--merge", "ties", "--stats", "alpha=x"], "uses no statistics")]:
        r = CliRunner().invoke(main, ["build", str(tmp_path / "x"), "--pretrained", bert_models["pre"],
                                      "--task", f"alpha={t['alpha']}", *bad])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("method, lam", [("task-arithmetic", 0.4), ("average", None)])
def test_rowwise_merge_in_small_blocks(bert_models, tmp_path, monkeypatch, method, lam):
    """Element-wise methods merge large tensors block by block (37 entries here, cutting rows
    mid-tensor): the base is the formula's, computed independently in float64."""
    import importlib
    build_module = importlib.import_module("modelstore.build")
    monkeypatch.setattr(build_module, "MERGE_BLOCK_ELEMENTS", 37)
    tasks = bert_models["tasks"]
    sd0, sds = bert_models["sd0"], [bert_models["sds"][t] for t in tasks]
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], tasks, merge=method,
                         merge_options={"lam": lam} if lam is not None else {}, keep=0.1)
    base = s.base("merged")
    for k, v0 in sd0.items():
        if not v0.dtype.is_floating_point:
            continue
        x0 = v0.double()
        deltas = sum(sd[k].double() - x0 for sd in sds)
        want = x0 + (lam * deltas if lam is not None else deltas / len(sds))
        torch.testing.assert_close(base[k].double(), want, rtol=1e-6, atol=1e-6, msg=k)
