"""Seeded positions (`--positions seeded`): DARE tasks that store no positions. The draw rule of
spec section 5 is checked against torch bit for bit with numpy's MT19937, and loads against an
independent numpy reconstruction of DARE (and against the same task with its positions stored)."""

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
from modelstore.kinds.fft import sparse_delta
from modelstore.kinds.fft.dare import seeded_positions


def _words(seed: int, n: int) -> np.ndarray:
    """The first n raw 32-bit outputs of MT19937 seeded with seed mod 2**32 (numpy's legacy seeding)."""
    return np.random.RandomState(seed % 2**32).randint(0, 2**32, size=n, dtype=np.uint64)


def _kept(seed: int, keep: float, n: int) -> np.ndarray:
    """Spec section 5: the positions j whose word's low 24 bits are below float32(keep)·2**24."""
    return np.flatnonzero((_words(seed, n) & 0xFFFFFF) < float(np.float32(keep)) * 2**24)


SEEDS = [0, 1, 12345, 2**31 + 5, 2**32 - 1, 2**32, 2**32 + 7, 2**62 + 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_rand_is_the_low_24_bits_of_mt19937_words(seed):
    """torch's CPU float32 rand: one MT19937 word per draw, (w mod 2**24)·2**-24, the generator seeded with
    seed mod 2**32; across sizes on both sides of its vectorized width (16) and continued call after call."""
    for n in (1, 15, 16, 17, 1000, 2**20 + 3):
        got = torch.rand(n, generator=torch.Generator().manual_seed(seed)).numpy()
        want = ((_words(seed, n) & 0xFFFFFF).astype(np.float64) * 2.0**-24).astype(np.float32)
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, n {n}")
    g = torch.Generator().manual_seed(seed)
    parts = torch.cat([torch.rand(k, generator=g) for k in (5, 16, 1000, 3)]).numpy()
    np.testing.assert_array_equal(parts, (_words(seed, 1024) & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24))


@pytest.mark.parametrize("keep", [0.01, 0.05, 1 / 3, 0.9, 1.0])
@pytest.mark.parametrize("block", [1, 7, 16, 1 << 20])
def test_seeded_positions_follow_the_rule_in_any_blocks(keep, block):
    size, seed = 100_003, 2**32 + 11
    want = _kept(seed, keep, size)
    got = seeded_positions(keep, seed, size, want.size, block, "t")
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)
    for count in (want.size - 1, want.size + 1, 0):
        if count >= 0 and count != want.size:
            with pytest.raises(modelstore.CorruptStoreError, match="^t: the positions re-drawn from its seed do "
                               "not match its stored count .*incompatible generator$"):
                seeded_positions(keep, seed, size, count, block, "t")


def _table(store: modelstore.Store, task: str) -> list[dict]:
    g = zarr.open_group(os.path.join(store.url, store.entry(task)["path"]), mode="r")
    return list(g.attrs["tensors"])


def _quantized(v: np.ndarray, qmax: int, group: int) -> np.ndarray:
    """Spec section 7 quantization of float32 values, in numpy, nothing dropped: the decoded float32 values."""
    groups = -(-v.size // group)
    padded = np.zeros(groups * group, np.float64)
    padded[:v.size] = np.abs(v)
    scale = (padded.reshape(groups, group).max(1) / qmax).astype(np.float16).astype(np.float64)
    s = np.repeat(scale, group)[:v.size]
    q = np.where(s > 0, np.round(v.astype(np.float64) / np.where(s > 0, s, 1.0)), 0.0).clip(-qmax, qmax)
    return q.astype(np.float32) * s.astype(np.float32)


@pytest.mark.parametrize("block", [None, 37], ids=["whole-tensors", "blocks-of-37"])
@pytest.mark.parametrize("value_dtype,dare_q", [("float16", None), ("int8", None), ("int4", None), ("int4", 0.03)],
                         ids=["float16", "int8", "int4", "int4-dare-q"])
def test_seeded_task_loads_as_the_reference_and_the_stored_task(bert_models, tmp_path, monkeypatch, block,
                                                                value_dtype, dare_q):
    if block is not None:  # writer and reader both cut tensors into blocks of 37 draws
        monkeypatch.setattr(sparse_delta, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr(sparse_delta, "CACHE_BYTES", 0)
    sd0, sd, keep, seed, group = bert_models["sd0"], bert_models["sds"]["alpha"], 0.05, 2**32 - 4, 8
    opts = {"sparsify": "dare", "seed": seed, "group_size": group, "dare_q": dare_q}
    built = {pos: modelstore.build(str(tmp_path / pos), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]},
                                   merge="none", keep=keep, value_dtype=value_dtype,
                                   kind_options={**opts, "positions": pos}) for pos in ("stored", "seeded")}
    s, e, e0 = built["seeded"], built["seeded"].entry("alpha"), built["stored"].entry("alpha")
    assert e["params"] == {**e0["params"], "positions": "seeded"} and "positions" not in e0["params"]
    assert "indices" not in e["arrays"] and "indices" in e0["arrays"] and e["bytes"] < e0["bytes"]
    table = _table(s, "alpha")
    sparse = [t for t in table if t["kind"] == "sparse"]
    assert sum(t["count"] for t in sparse) == e["kept"] > 0
    assert [t["seed"] for t in sparse] == [seed + i for i in range(len(sparse))]
    assert [t["name"] for t in sparse] == [t["name"] for t in _table(built["stored"], "alpha") if t["kind"] == "sparse"]
    rescale = np.float32(1 / (dare_q or keep))
    want = {k: np_f32(v) for k, v in sd.items()}
    for t in sparse:
        k = t["name"]
        b = np_f32(sd0[k]).reshape(-1)
        kept = _kept(t["seed"], keep, b.size)
        assert t["count"] == kept.size  # every drawn entry is stored, quantized zeros included
        v = (np_f32(sd[k]).reshape(-1) - b)[kept] * rescale
        v = _quantized(v, {"int8": 127, "int4": 7}[value_dtype], group) if value_dtype != "float16" \
            else v.astype(np.float16).astype(np.float32)
        ref = b.copy()
        ref[kept] += v
        want[k] = ref.reshape(sd[k].shape)
    got = modelstore.open(s.url).load("alpha")
    stored = modelstore.open(built["stored"].url).load("alpha")
    assert set(got) == set(want) == set(stored)
    for k, w in want.items():
        np.testing.assert_array_equal(np_f32(got[k]), w, err_msg=k)
        assert got[k].dtype == sd[k].dtype
    if value_dtype == "float16":  # the stored task drops only values that are 0: the same weights, bit for bit
        assert all(torch.equal(got[k], stored[k]) for k in got)
    else:  # the stored task drops quantized zeros and regroups: its positions are a subset of the drawn ones
        assert e["kept"] > e0["kept"]
    assert modelstore.open(s.url).check().ok


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_and_config_positions(store2, bert_models, tmp_path):
    ck = bert_models["tasks"]["gamma"]
    r = _cli("add-task", store2, "sd", ck, "--sparsify", "dare", "--keep", "0.05", "--value-dtype", "int4",
             "--positions", "seeded")
    assert r.exit_code == 0, r.output
    p = modelstore.open(store2).entry("sd")["params"]
    assert p["positions"] == "seeded" and p["sparsify"] == "dare" and p["keep"] == 0.05
    assert "--positions" in _cli("add-task", "--help").output
    r = _cli("add-task", store2, "dflt", ck, "--positions", "seeded")  # DARE is the default sparsifier
    assert r.exit_code == 0, r.output
    assert modelstore.open(store2).entry("dflt")["params"]["positions"] == "seeded"
    r = _cli("add-task", store2, "x", ck, "--sparsify", "magnitude", "--positions", "seeded")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "seeded positions are DARE's: give them with --sparsify dare" in r.output
    r = _cli("add-task", store2, "x", ck, "--sparsify", "dare", "--positions", "gaps")  # click's choice check
    assert r.exit_code == 2 and "'gaps' is not one of 'stored', 'seeded'" in r.output
    assert "x" not in modelstore.open(store2).tasks()
    with pytest.raises(modelstore.InputError, match="seeded positions are DARE's"):
        modelstore.open(store2).add_task("y", ck, sparsify="magnitude", positions="seeded")
    with pytest.raises(modelstore.InputError, match="--positions must be one of stored, seeded, got 'gaps'"):
        modelstore.open(store2).add_task("y", ck, sparsify="dare", positions="gaps")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"pretrained": bert_models["pre"], "tasks": {"a": bert_models["tasks"]["alpha"]},
                               "merge": "none", "sparsify": "dare", "positions": "seeded", "keep": 0.1}))
    r = _cli("build", tmp_path / "built", "--config", cfg)
    assert r.exit_code == 0, r.output
    assert modelstore.open(str(tmp_path / "built")).entry("a")["params"]["positions"] == "seeded"


def _reseal(url: str, task: str, change) -> None:
    """Apply `change` to the task's table (or its manifest entry) and write both with valid digests (what a
    faulty writer could publish)."""
    from modelstore.format.manifest import seal, table_digest
    m = json.load(open(os.path.join(url, "manifest.json")))
    entry = m["tasks"][task]
    meta = os.path.join(url, entry["path"], "zarr.json")
    group = json.load(open(meta))
    change(group["attributes"]["tensors"], entry)
    json.dump(group, open(meta, "w"))
    entry["table_sha256"] = table_digest(group["attributes"]["tensors"])
    open(os.path.join(url, "manifest.json"), "wb").write(seal(m))


@pytest.fixture(scope="module")
def seeded_store(bert_models, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("seeded") / "s")
    modelstore.build(url, bert_models["pre"], {"a": bert_models["tasks"]["alpha"]}, merge="none", keep=0.1,
                     value_dtype="int4", kind_options={"sparsify": "dare", "seed": 3, "positions": "seeded"})
    return url


def _largest(table: list[dict]) -> int:
    return max((i for i, t in enumerate(table) if t["kind"] == "sparse"), key=lambda i: np.prod(table[i]["shape"]))


def _seed_plus_one(table, entry):
    i = _largest(table)
    t = table[i]
    # the premise: the next seed draws another count (else the count check cannot see the change)
    assert _kept(t["seed"] + 1, entry["params"]["keep"], int(np.prod(t["shape"]))).size != t["count"]
    t["seed"] += 1


@pytest.mark.parametrize("change,what", [
    (_seed_plus_one, "positions re-drawn from its seed do not match its stored count"),
    (lambda table, entry: table[_largest(table)].update(count=table[_largest(table)]["count"] + 1), "inconsistent"),
    (lambda table, entry: entry["params"].update(keep=0.2), "positions re-drawn from its seed do not match"),
    (lambda table, entry: entry["params"].update(seed=4), None),  # informative: each entry's own seed is read
    (lambda table, entry: table[_largest(table)].update(seed=-1), "has seed -1"),
    (lambda table, entry: table[_largest(table)].update(seed=2.5), "has seed 2.5"),
    (lambda table, entry: table[_largest(table)].pop("seed"), "points past its array 'indices'"),
    (lambda table, entry: entry["params"].update(positions="stored"), "has seed"),
    (lambda table, entry: entry["params"].pop("positions"), "has seed"),
    (lambda table, entry: entry["params"].update(positions="drawn"), "positions 'drawn' are not one of"),
    (lambda table, entry: entry["params"].update(sparsify="magnitude"), "of a DARE task"),
], ids=["seed", "count", "keep", "params-seed", "negative-seed", "fractional-seed", "no-seed", "stored",
        "positions-absent", "unknown-positions", "magnitude"])
def test_altered_seeds_counts_and_params_are_refused_in_one_line(seeded_store, tmp_path, change, what):
    import shutil
    url = str(tmp_path / "case")
    shutil.copytree(seeded_store, url)
    _reseal(url, "a", change)
    if what is None:
        want = modelstore.open(seeded_store).load("a")
        got = modelstore.open(url).load("a")
        assert all(torch.equal(got[k], want[k]) for k in want)
        return
    with pytest.raises(modelstore.CorruptStoreError) as err:
        modelstore.open(url).load("a")
    assert what in str(err.value) and "\n" not in str(err.value) and url in str(err.value), str(err.value)
    assert "task 'a'" in modelstore.open(url).check().damaged
