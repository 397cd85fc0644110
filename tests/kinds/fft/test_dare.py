"""DARE, the default representation, and DAREx-q (`dare_q`: kept entries rescaled by 1/q instead of
1/m), checked against the documented draws computed here with torch/numpy, and their options."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import np_f32, ref_quantize

import modelstore
from modelstore.cli import main


def _sparse_names(store: modelstore.Store, task: str) -> list[str]:
    """The task's sparse tensors in table order (tensor i draws from seed + i), read with zarr alone."""
    g = zarr.open_group(os.path.join(store.url, store.entry(task)["path"]), mode="r")
    return [t["name"] for t in g.attrs["tensors"] if t["kind"] == "sparse"]


def _dare_reference(base: dict[str, np.ndarray], sd: dict[str, torch.Tensor], names: list[str], keep: float,
                    seed: int, rescale: float) -> dict[str, np.ndarray]:
    """base + u·float32(rescale) at the entries whose seeded draw is < float32(keep) (float32 values)."""
    want = {k: np_f32(v) for k, v in sd.items()}
    for i, k in enumerate(names):
        u = (np_f32(sd[k]) - base[k]).reshape(-1)
        draws = torch.rand(u.size, generator=torch.Generator().manual_seed(seed + i)).numpy()
        kept = draws < np.float32(keep)
        ref = base[k].reshape(-1).copy()
        ref[kept] += u[kept] * np.float32(rescale)
        want[k] = ref.reshape(sd[k].shape)
    return want


@pytest.mark.parametrize("block", [None, 37], ids=["whole-tensors", "blocks-of-37"])
def test_dare_q_rescales_the_same_draws_by_one_over_q(bert_models, tmp_path, monkeypatch, block):
    if block is not None:
        from modelstore.kinds.fft import sparse_delta
        monkeypatch.setattr(sparse_delta, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr(sparse_delta, "CACHE_BYTES", 0)
    sd0, sd, keep, seed, q = bert_models["sd0"], bert_models["sds"]["alpha"], 0.05, 7, 0.03
    opts = {"sparsify": "dare", "seed": seed, "value_dtype": "float32"}
    plain = modelstore.build(str(tmp_path / "plain"), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]},
                             merge="none", keep=keep, kind_options=opts)
    s = modelstore.build(str(tmp_path / "q"), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]},
                         merge="none", keep=keep, kind_options={**opts, "dare_q": q})
    e, e0 = s.entry("alpha"), plain.entry("alpha")
    assert e["params"] == {**e0["params"], "dare_q": q}
    assert "dare_q" not in e0["params"]  # tasks written without it record exactly what they did before
    # the same entries are kept: the same gap-encoded indices, byte for byte; only the values differ
    assert e["kept"] == e0["kept"] and e["arrays"]["indices"] == e0["arrays"]["indices"]
    assert e["arrays"]["values"] != e0["arrays"]["values"]
    names = _sparse_names(s, "alpha")
    assert names and names == _sparse_names(plain, "alpha")
    base = {k: np_f32(v) for k, v in sd0.items()}
    for store, rescale in ((s, 1 / q), (plain, 1 / keep)):
        want = _dare_reference(base, sd, names, keep, seed, rescale)
        got = modelstore.open(store.url).load("alpha")
        assert set(got) == set(want)
        for k, w in want.items():
            np.testing.assert_array_equal(np_f32(got[k]), w, err_msg=f"{store.url}/{k}")
    # the rescale is visible: every kept entry of the q task is keep/q times the plain one's (up to rounding)
    moved, moved0 = (np.concatenate([(np_f32(x.load("alpha")[k]) - base[k]).reshape(-1) for k in names])
                     for x in (s, plain))
    nz = moved0 != 0
    assert nz.any() and np.allclose(moved[nz], moved0[nz] * keep / q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_dare_q_out_of_range_is_refused(store2, bert_models, q):
    s = modelstore.open(store2, mode="a")
    with pytest.raises(modelstore.InputError, match=r"--dare-q must be a number in \(0, 1\]"):
        s.add_task("x", bert_models["tasks"]["gamma"], sparsify="dare", dare_q=q)
    assert "x" not in modelstore.open(store2).tasks()


def test_dare_q_needs_dare(store2, bert_models):
    s = modelstore.open(store2, mode="a")
    with pytest.raises(modelstore.InputError, match="give it with --sparsify dare"):
        s.add_task("x", bert_models["tasks"]["gamma"], sparsify="magnitude", dare_q=0.05)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_dare_q(store2, bert_models):
    ck = bert_models["tasks"]["gamma"]
    r = _cli("add-task", store2, "dq", ck, "--sparsify", "dare", "--keep", "0.02", "--dare-q", "0.05")
    assert r.exit_code == 0, r.output
    s = modelstore.open(store2)
    p = s.entry("dq")["params"]
    assert p["sparsify"] == "dare" and p["keep"] == 0.02 and p["dare_q"] == 0.05
    assert "dare_q: 0.05" in _cli("info", store2, "dq").output
    assert json.loads(_cli("info", store2, "dq", "--json").output)["params"]["dare_q"] == 0.05
    assert "--dare-q" in _cli("add-task", "--help").output
    for args, what in [(("--granularity", "per-tensor", "--dare-q", "0.05"), "give it with --sparsify dare"),
                       (("--sparsify", "magnitude", "--dare-q", "0.05"), "give it with --sparsify dare"),
                       (("--sparsify", "dare", "--dare-q", "2"), "--dare-q must be a number in (0, 1]")]:
        r = _cli("add-task", store2, "x", ck, *args)
        assert r.exit_code == 1 and what in r.output and r.output.count("\n") == 1, (args, r.output)
    assert "x" not in modelstore.open(store2).tasks()


# ---- DARE as the default representation (DARE_KEEP, int4 values) ---------------------------------------

def _default_reference(base: dict[str, np.ndarray], sd: dict[str, torch.Tensor], names: list[str], keep: float,
                       group: int) -> tuple[dict[str, np.ndarray], int]:
    """base + the spec's DARE draws (seed 0 + i), rescaled by float32(1/keep), int4-quantized per group of
    `group` with the values that quantize to 0 dropped and the rest regrouped; and the entries kept."""
    want, kept = {k: np_f32(v) for k, v in sd.items()}, 0
    for i, k in enumerate(names):
        u = (np_f32(sd[k]) - base[k]).reshape(-1)
        draws = torch.rand(u.size, generator=torch.Generator().manual_seed(i)).numpy()
        pos = np.flatnonzero(draws < np.float32(keep))
        v = u[pos] * np.float32(1 / keep)
        pos, v = pos[v != 0], v[v != 0]
        q, scales = ref_quantize(v, 7, group)
        while not (q != 0).all():
            pos, v = pos[q != 0], v[q != 0]
            q, scales = ref_quantize(v, 7, group)
        ref = base[k].reshape(-1).copy()
        ref[pos] += q.astype(np.float32) * np.repeat(scales.astype(np.float32), group)[:q.size]
        want[k], kept = ref.reshape(sd[k].shape), kept + pos.size
    return want, kept


def test_a_task_added_with_no_options_is_dare_at_the_default_keep_with_int4_values(bert_models, tmp_path):
    """A transformers fine-tune added with no options: DARE at m = DARE_KEEP, int4 values in groups of
    128, recorded as such, and loaded as the base plus the spec's draws, rescale and quantization."""
    from modelstore.kinds.fft.sparse_delta import DARE_KEEP
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    e = modelstore.add_task(url, "alpha", bert_models["tasks"]["alpha"]).entry("alpha")
    assert DARE_KEEP == 0.05
    assert e["method"] == "post-pruning" and {k: e["params"].get(k) for k in
                                              ("sparsify", "keep", "value_dtype", "group_size", "seed")} == \
        {"sparsify": "dare", "keep": 0.05, "value_dtype": "int4", "group_size": 128, "seed": 0}
    s = modelstore.open(url)
    names = _sparse_names(s, "alpha")
    assert sorted(names) == sorted(k for k, v in bert_models["sd0"].items() if v.dtype.is_floating_point)
    base = {k: np_f32(v) for k, v in bert_models["sd0"].items()}
    want, kept = _default_reference(base, bert_models["sds"]["alpha"], names, 0.05, 128)
    assert e["kept"] == kept > 0  # of about 5% drawn; int4 drops the values that quantize to 0
    got = s.load("alpha")
    assert set(got) == set(want)
    for k, w in want.items():
        np.testing.assert_array_equal(np_f32(got[k]), w, err_msg=k)


@pytest.mark.parametrize("given, sparsify, keep, value_dtype", [
    ({}, "dare", 0.05, "int4"),
    ({"granularity": "per-tensor"}, "magnitude", 0.1, "int4"),
    ({"budget": 2.0}, "magnitude", 0.1, None),  # the budget chooses keep and the value dtype
    ({"max_rel_error": 0.01}, "magnitude", 0.1, None),
    ({"sparsify": "magnitude"}, "magnitude", 0.1, "int4"),
    ({"sparsify": "dare"}, "dare", 0.05, "int4"),
    ({"keep": 0.2}, "dare", 0.2, "int4"),
    ({"value_dtype": "float16"}, "dare", 0.05, "float16"),
    ({"granularity": "global"}, "dare", 0.05, "int4"),
    ({"dare_q": 0.02}, "dare", 0.05, "int4"),
])
def test_options_left_out_take_the_defaults_of_the_options_given(given, sparsify, keep, value_dtype):
    from modelstore.kinds import checkpoint_kind
    opts = checkpoint_kind("fft").parse_options(given)
    assert (opts.sparsify, opts.keep, opts.value_dtype) == (sparsify, keep, value_dtype)


def test_magnitude_only_options_alone_store_magnitude_as_before(store2, bert_models):
    """--granularity per-tensor and --budget alone keep the top-m magnitudes (no new error); --sparsify
    magnitude alone keeps the top 10%; every resolved option is what the manifest records."""
    s, ck = modelstore.open(store2, mode="a"), bert_models["tasks"]["gamma"]
    per = s.add_task("per", ck, granularity="per-tensor")["params"]
    assert "sparsify" not in per and per["granularity"] == "per-tensor" and per["keep"] == 0.1
    assert per["value_dtype"] == "int4"
    top = s.add_task("top", ck, sparsify="magnitude")
    assert "sparsify" not in top["params"] and top["params"]["keep"] == 0.1 and top["params"]["value_dtype"] == "int4"
    assert top["kept"] <= round(0.1 * top["total"])  # the top 10% (less the values that quantize to 0)
    budget = s.add_task("budget", ck, budget=2.0)["params"]
    assert "sparsify" not in budget and budget["budget"]["bits_per_param"] == 2.0
    f16 = s.add_task("f16", ck, value_dtype="float16")["params"]
    assert (f16["sparsify"], f16["keep"], f16["value_dtype"]) == ("dare", 0.05, "float16")
    rows = {r["task"]: r for r in json.loads(_cli("ls", store2, "--json").output)}
    assert [rows[t]["sparsify"] for t in ("per", "top", "budget", "f16")] == ["magnitude"] * 3 + ["dare"]
