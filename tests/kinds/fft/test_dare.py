"""DAREx-q (`dare_q`): DARE's kept entries rescaled by 1/q instead of 1/m, checked against the
documented draws computed here with torch/numpy, and its option errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import np_f32

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
        s.add_task("x", bert_models["tasks"]["gamma"], dare_q=0.05)


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
    for args, what in [(("--dare-q", "0.05"), "give it with --sparsify dare"),
                       (("--sparsify", "magnitude", "--dare-q", "0.05"), "give it with --sparsify dare"),
                       (("--sparsify", "dare", "--dare-q", "2"), "--dare-q must be a number in (0, 1]")]:
        r = _cli("add-task", store2, "x", ck, *args)
        assert r.exit_code == 1 and what in r.output and r.output.count("\n") == 1, (args, r.output)
    assert "x" not in modelstore.open(store2).tasks()
