"""Fewer bytes per task: int8/int4 values and DARE for PERU-FFT, and the tall-mask, emr and bitdelta
kinds, each checked against an independent numpy reference of its paper's formula, with the stored
arrays read by plain zarr as spec/FORMAT.md describes them (not through modelstore's reader)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import flip_byte, np_f32, ref_quantize, ref_topk_global
from safetensors.torch import load_file, save_file

import modelstore
from modelstore.cli import main

# ---- reading a task's arrays with zarr alone (spec sections 3-5, 7) ------------------------------

def _raw(store: modelstore.Store, task: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The task's tensor table and flat arrays, read with zarr alone."""
    g = zarr.open_group(os.path.join(store.url, store.entry(task)["path"]), mode="r")
    return g.attrs["tensors"], {name: a[:] for name, a in g.arrays()}


def _nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    nib = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:n].astype(np.int8)
    return np.where(nib >= 8, nib - 16, nib).astype(np.int8)


def _sparse(table: list[dict], arrays: dict[str, np.ndarray], params: dict) -> dict[str, tuple]:
    """Per sparse tensor: (positions, q or float values, scales or None), decoded per the spec."""
    out = {}
    for t in table:
        if t["kind"] != "sparse" or not t["count"]:
            continue
        s, c = t["start"], t["count"]
        pos = np.cumsum(arrays["indices"][s:s + c].astype(np.int64))
        vd = params["value_dtype"]
        if vd in ("int8", "int4"):
            (vs, vc), (ss, sc) = t["segments"]["values"], t["segments"]["scales"]
            raw = arrays["values"][vs:vs + vc]
            q = _nibbles(raw, c) if vd == "int4" else raw
            out[t["name"]] = (pos, q, arrays["scales"][ss:ss + sc])
        else:
            out[t["name"]] = (pos, arrays["values"][s:s + c], None)
    return out


def _bits(table: list[dict], arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    t = next(t for t in table if t["name"] == name)
    packed = arrays[t["array"]][t["start"]:t["start"] + t["count"]]
    return np.unpackbits(packed, bitorder="little")[:int(np.prod(t["shape"]))].astype(bool).reshape(t["shape"])


def _floats(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.dtype.is_floating_point]


def _same(got: dict[str, torch.Tensor], want: dict[str, np.ndarray], dtypes_of: dict[str, torch.Tensor], what: str):
    assert set(got) == set(want), what
    for k, w in want.items():
        assert got[k].dtype == dtypes_of[k].dtype, f"{what}/{k}"
        np.testing.assert_array_equal(np_f32(got[k]), np.asarray(w).astype(np.float32), err_msg=f"{what}/{k}")


def _as_dtype(a: np.ndarray, like: torch.Tensor) -> np.ndarray:
    """Round a float32 reference to the task tensor's dtype (the reader's last cast)."""
    return np_f32(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(like.dtype))


# ---- int8 / int4 values ----------------------------------------------------------------------------

@pytest.mark.parametrize("block", [None, 37], ids=["whole-tensors", "blocks-of-37"])
@pytest.mark.parametrize("value_dtype, qmax", [("int8", 127), ("int4", 7)])
def test_quantized_values_match_the_numpy_reference(bert_models, tmp_path, monkeypatch, value_dtype, qmax, block):
    if block is not None:
        from modelstore.kinds.fft import sparse_delta
        monkeypatch.setattr(sparse_delta, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr(sparse_delta, "CACHE_BYTES", 0)
    sd0, sds, keep, group = bert_models["sd0"], bert_models["sds"], 0.1, 16
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], bert_models["tasks"], keep=keep,
                         value_dtype=value_dtype, kind_options={"group_size": group, "sparsify": "magnitude"})
    base = {k: np_f32(v) for k, v in modelstore.open(s.url).base("merged").items()}
    names = _floats(sd0)
    for task, sd in sds.items():
        e = s.entry(task)
        assert e["params"]["value_dtype"] == value_dtype and e["params"]["group_size"] == group
        us = [np_f32(sd[k]) - base[k] for k in names]
        topk = dict(zip(names, ref_topk_global(us, keep)))
        table, arrays = _raw(s, task)
        assert arrays["values"].dtype == (np.int8 if value_dtype == "int8" else np.uint8)
        assert arrays["scales"].dtype == np.float16
        stored = _sparse(table, arrays, e["params"])
        got = modelstore.open(s.url).load(task)
        want, kept = {}, 0
        for k, u in zip(names, us):
            ref = base[k].copy().reshape(-1)
            if k in stored:
                pos, q, scales = stored[k]
                assert np.all(np.diff(pos) > 0) and topk[k].reshape(-1)[pos].all()  # a subset of the top-k
                q_ref, s_ref = ref_quantize(u.reshape(-1)[pos], qmax, group)
                np.testing.assert_array_equal(q, q_ref, err_msg=f"{task}/{k} q")
                np.testing.assert_array_equal(scales.view(np.uint16), s_ref.view(np.uint16),
                                              err_msg=f"{task}/{k} scales")
                assert np.all(q != 0)  # values that quantize to 0 waste no index
                ref[pos] = ref[pos] + q.astype(np.float32) * np.repeat(scales.astype(np.float32), group)[:q.size]
                kept += q.size
            want[k] = _as_dtype(ref.reshape(u.shape), sd[k])
        want.update({k: np_f32(sd[k]) for k in sd if k not in names})
        _same(got, want, sd, task)
        k_ref = sum(int(m.sum()) for m in topk.values())
        assert e["kept"] == kept and kept >= (0.9 if value_dtype == "int8" else 0.5) * k_ref


def test_int4_packs_the_low_nibble_first(tmp_path):
    """Hand-made: one tensor, group 4: scale = 7/7 = 1, q = the integer deltas themselves."""
    base, task = {"w": torch.zeros(6)}, {"w": torch.tensor([7., -1, 0, 3, -7, 2])}
    pre, t = str(tmp_path / "p.safetensors"), str(tmp_path / "t.safetensors")
    save_file(base, pre)
    save_file(task, t)
    s = modelstore.build(str(tmp_path / "s"), pre, {"t": t}, merge="none", keep=1.0, value_dtype="int4",
                         kind_options={"group_size": 4})
    table, arrays = _raw(s, "t")
    # kept values 7, -1, 3, -7, 2 (the 0 is never stored); groups [7, -1, 3, -7] (scale 1, q the values)
    # and [2] (scale float16(2/7), q = 7); nibbles low first: (7, -1) (3, -7) (7, pad)
    assert list(arrays["values"]) == [0xF7, 0x93, 0x07]
    last = np.float16(2 / 7)
    np.testing.assert_array_equal(arrays["scales"], np.array([1.0, last], np.float16))
    assert torch.equal(s.load("t")["w"], torch.tensor([7., -1, 0, 3, -7, 7 * np.float32(last)]))


# ---- DARE --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [None, 37], ids=["whole-tensors", "blocks-of-37"])
def test_dare_matches_its_seeded_draws_and_rescale(bert_models, tmp_path, monkeypatch, block):
    if block is not None:
        from modelstore.kinds.fft import sparse_delta
        monkeypatch.setattr(sparse_delta, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr(sparse_delta, "CACHE_BYTES", 0)
    sd0, sd, keep, seed = bert_models["sd0"], bert_models["sds"]["alpha"], 0.2, 7
    opts = {"sparsify": "dare", "seed": seed, "value_dtype": "float16"}
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]},
                         merge="none", keep=keep, kind_options=opts)
    e = s.entry("alpha")
    assert e["params"]["sparsify"] == "dare" and e["params"]["seed"] == seed
    table, arrays = _raw(s, "alpha")
    stored = _sparse(table, arrays, e["params"])
    sparse_names = [t["name"] for t in table if t["kind"] == "sparse"]
    want, total = {}, 0
    for i, k in enumerate(sparse_names):
        u = (np_f32(sd[k]) - np_f32(sd0[k])).reshape(-1)
        # the documented draws: torch.rand per entry from a generator seeded seed + tensor index
        draws = torch.rand(u.size, generator=torch.Generator().manual_seed(seed + i)).numpy()
        vals = (u * np.float32(1 / keep)).astype(np.float16)
        mask = (draws < np.float32(keep)) & (vals != 0)
        pos = np.flatnonzero(mask)
        if pos.size:
            np.testing.assert_array_equal(stored[k][0], pos, err_msg=k)
            np.testing.assert_array_equal(stored[k][1], vals[pos], err_msg=k)
        ref = np_f32(sd0[k]).reshape(-1).copy()
        ref[pos] += vals[pos].astype(np.float32)
        want[k] = _as_dtype(ref.reshape(sd[k].shape), sd[k])
        total += u.size
    want.update({k: np_f32(sd[k]) for k in sd if k not in want})
    _same(modelstore.open(s.url).load("alpha"), want, sd, "dare")
    assert abs(e["kept"] - keep * total) < 5 * np.sqrt(total * keep * (1 - keep))  # about m·N entries
    again = modelstore.build(str(tmp_path / "again"), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]},
                             merge="none", keep=keep, kind_options=opts)
    assert again.entry("alpha")["arrays"] == e["arrays"]  # reproducible, byte for byte
    other = modelstore.build(str(tmp_path / "other"), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]},
                             merge="none", keep=keep, kind_options={**opts, "seed": seed + 1})
    assert other.entry("alpha")["arrays"]["indices"] != e["arrays"]["indices"]


# ---- TALL masks, EMR, BitDelta -----------------------------------------------------------------------

def test_tall_masks_match_the_numpy_reference(bert_models, tmp_path):
    sd0, sds, lam_ta, lam = bert_models["sd0"], bert_models["sds"], 1.0, 0.4
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], bert_models["tasks"], kind="tall-mask",
                         lam=lam_ta, kind_options={"tall_lambda": lam})
    assert set(s.manifest["bases"]) == {"merged", "pretrained"}
    r = modelstore.open(s.url)
    merged = {k: np_f32(v) for k, v in r.base("merged").items()}
    names = _floats(sd0)
    for k in names:  # θ* is Task-Arithmetic with λ = 1: the paper's τ_MTL = Σ τ_t
        ta = np_f32(sd0[k]) + lam_ta * sum(np_f32(sd[k]) - np_f32(sd0[k]) for sd in sds.values())
        np.testing.assert_allclose(merged[k], ta, rtol=1e-6, atol=1e-7)
    for task, sd in sds.items():
        e = r.entry(task)
        assert e["kind"] == "tall-mask" and e["bases"] == ["merged", "pretrained"]
        assert e["params"]["tall_lambda"] == lam
        table, arrays = _raw(r, task)
        want, ones = {}, 0
        for k in names:
            b0 = np_f32(sd0[k])
            tau_t, tau = np_f32(sd[k]) - b0, merged[k] - b0
            m = np.abs(tau_t) >= np.float32(lam) * np.abs(tau - tau_t)  # m_t = 1{|τ_t| ≥ λ·|τ_MTL − τ_t|}
            np.testing.assert_array_equal(_bits(table, arrays, k), m, err_msg=f"{task}/{k}")
            want[k] = _as_dtype(np.where(m, merged[k], b0), sd[k])  # θ0 + m ⊙ τ_MTL
            ones += int(m.sum())
        want.update({k: np_f32(sd[k]) for k in sd if k not in names})
        _same(r.load(task), want, sd, task)
        assert e["kept"] == ones and e["total"] == sum(sd0[k].numel() for k in names)


def _ref_emr(sd0: dict, sds: list[dict], k: str) -> np.ndarray:
    """EMR's election: τ_uni = sign(Σ τ_t) ⊙ max{|τ_t| : sign(τ_t) = sign(Σ τ_t)}; θ* = θ0 + τ_uni."""
    b0 = np_f32(sd0[k])
    taus = [np_f32(sd[k]) - b0 for sd in sds]
    total = np.zeros_like(b0)
    for tau in taus:
        total = total + tau
    sign = np.sign(total).astype(np.float32)
    mag = np.zeros_like(b0)
    for tau in taus:
        mag = np.maximum(mag, np.where(tau * sign > 0, np.abs(tau), np.float32(0)))
    return b0 + sign * mag


def test_emr_matches_the_numpy_reference(bert_models, tmp_path):
    sd0, sds = bert_models["sd0"], bert_models["sds"]
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], bert_models["tasks"], kind="emr")
    r = modelstore.open(s.url)
    assert r.manifest["bases"]["merged"]["merge"] == {"method": "emr"}
    names = _floats(sd0)
    merged = {k: np_f32(v) for k, v in r.base("merged").items()}
    for k in names:
        np.testing.assert_array_equal(merged[k], _ref_emr(sd0, list(sds.values()), k), err_msg=k)
    for task, sd in sds.items():
        table, arrays = _raw(r, task)
        b0 = {k: np_f32(sd0[k]) for k in names}
        tau_t = {k: np_f32(sd[k]) - b0[k] for k in names}
        tau_uni = {k: merged[k] - b0[k] for k in names}
        masks = {k: tau_t[k] * tau_uni[k] > 0 for k in names}  # M_t = 1{τ_t ⊙ τ_uni > 0}
        scale = np.float32(sum(np.abs(tau_t[k]).astype(np.float64).sum() for k in names)
                           / sum(np.abs(np.where(masks[k], tau_uni[k], 0)).astype(np.float64).sum() for k in names))
        assert r.entry(task)["params"]["scale"] == float(scale)  # λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|
        want = {}
        for k in names:
            np.testing.assert_array_equal(_bits(table, arrays, k), masks[k], err_msg=f"{task}/{k}")
            want[k] = _as_dtype(np.where(masks[k], b0[k] + scale * tau_uni[k], b0[k]), sd[k])
        want.update({k: np_f32(sd[k]) for k in sd if k not in names})
        _same(r.load(task), want, sd, task)


@pytest.mark.parametrize("merge", ["task-arithmetic", "none"])
def test_bitdelta_matches_the_numpy_reference(bert_models, tmp_path, merge):
    sd0, sds = bert_models["sd0"], bert_models["sds"]
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], bert_models["tasks"], kind="bitdelta", merge=merge)
    r = modelstore.open(s.url)
    base_id = "pretrained" if merge == "none" else "merged"
    base = {k: np_f32(v) for k, v in r.base(base_id).items()}
    for task, sd in sds.items():
        assert r.entry(task)["base"] == base_id
        table, arrays = _raw(r, task)
        by_name = {t["name"]: t for t in table}
        want = {}
        for k in _floats(sd0):
            if sd0[k].dim() != 2:
                assert by_name[k]["kind"] in ("dense", "sparse")  # biases and norms: whole (or the base's)
                continue
            d = np_f32(sd[k]) - base[k]
            sign = d >= 0
            scale = np.float32(np.abs(d).astype(np.float64).sum() / d.size)  # mean |θt − θ_base|
            assert by_name[k]["scale"] == float(scale)
            np.testing.assert_array_equal(_bits(table, arrays, k), sign, err_msg=f"{task}/{k}")
            want[k] = _as_dtype(base[k] + np.where(sign, scale, -scale), sd[k])
        want.update({k: np_f32(sd[k]) for k in sd if k not in want})
        _same(r.load(task), want, sd, task)


# ---- CLI, export, errors, damage -----------------------------------------------------------------------

def run(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def test_cli_kinds_flags_ls_info_and_export(bert_models, tmp_path):
    t = bert_models["tasks"]
    url = tmp_path / "s"
    run("build", url, "--pretrained", bert_models["pre"], "--task", f"alpha={t['alpha']}", "--task",
        f"beta={t['beta']}", "--kind", "emr")
    assert modelstore.open(str(url)).manifest["bases"]["merged"]["merge"]["method"] == "emr"
    run("add-task", url, "q8", t["gamma"], "--value-dtype", "int8", "--group-size", "64", "--keep", "0.05")
    run("add-task", url, "dare", t["gamma"], "--sparsify", "dare", "--seed", "3")
    run("add-task", url, "tall", t["gamma"], "--kind", "tall-mask", "--tall-lambda", "0.5")
    run("add-task", url, "bits", t["gamma"], "--kind", "bitdelta", "--base", "pretrained")
    rows = {r["task"]: r for r in json.loads(run("ls", url, "--json").output)}
    assert rows["q8"]["setting"] == "0.05/int8/dare" and rows["dare"]["sparsify"] == "dare"
    assert rows["tall"]["lambda"] == 0.5 and rows["bits"]["kind"] == "bitdelta" and "scale" in rows["alpha"]
    assert "tall-mask" in run("ls", url).output
    assert "group_size: 64" in run("info", url, "q8").output
    s = modelstore.open(str(url))
    for task in s.tasks():
        out = tmp_path / f"hf-{task}"
        run("export", url, task, out)
        got = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(got[k], v) for k, v in s.load(task).items())


@pytest.mark.parametrize("args, msg", [
    (("--group-size", "0", "--value-dtype", "int8"), "--group-size must be a whole number"),
    (("--value-dtype", "int3"), "'int3' is not one of"),
    (("--kind", "tall-mask", "--tall-lambda", "-1"), "--tall-lambda must be a finite number >= 0"),
    (("--tall-lambda", "0.5"), "--tall-lambda does not apply to --kind fft"),
    (("--kind", "bitdelta", "--keep", "0.2"), "--keep does not apply to --kind bitdelta"),
    (("--sparsify", "dare", "--granularity", "per-tensor"), "--granularity applies to --sparsify magnitude"),
])
def test_bad_options_are_one_line_errors(store2, bert_models, args, msg):
    r = run("add-task", store2, "x", bert_models["tasks"]["gamma"], *args, code=1 if "int3" not in args else 2)
    assert msg in r.output and "Traceback" not in r.output, r.output
    assert "x" not in modelstore.open(store2).tasks()


def test_python_option_errors(bert_models, tmp_path, store2):
    s, ck = modelstore.open(store2, mode="a"), bert_models["tasks"]["gamma"]
    with pytest.raises(modelstore.InputError, match="--sparsify must be one of magnitude, dare"):
        s.add_task("x", ck, sparsify="random")
    with pytest.raises(modelstore.InputError, match="--kind must be one of"):
        s.add_task("x", ck, kind="hologram")
    with pytest.raises(modelstore.InputError, match="no pretrained base.*--pretrained PATH"):
        s.add_task("x", ck, kind="tall-mask")  # store2 keeps no θ0 ...
    s.add_task("x", ck, kind="tall-mask", pretrained=bert_models["pre"])  # ... until it is given once
    with pytest.raises(modelstore.InputError, match="merged base"):
        modelstore.build(str(tmp_path / "pp"), bert_models["pre"], {"a": ck}, kind="tall-mask", merge="none")
    assert not os.path.exists(tmp_path / "pp" / "manifest.json")


@pytest.mark.parametrize("kind, options, array", [
    ("fft", {"value_dtype": "int4"}, "scales"), ("fft", {"value_dtype": "int8"}, "values"),
    ("tall-mask", {}, "bits.uint8"), ("bitdelta", {}, "bits.uint8")])
def test_damaged_payloads_are_detected(bert_models, tmp_path, kind, options, array):
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]}, kind=kind,
                     kind_options=options)
    flip_byte(os.path.join(url, modelstore.open(url).entry("alpha")["path"], array, "c", "0"))
    with pytest.raises(modelstore.CorruptStoreError, match=f"array '{array}'") as e:
        modelstore.open(url).load("alpha")
    assert "\n" not in str(e.value)
    report = modelstore.open(url).check()
    assert list(report.damaged) == ["task 'alpha'"]


def test_sync_copies_both_bases_of_a_mask_task(bert_models, tmp_path):
    src = str(tmp_path / "src")
    modelstore.build(src, bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]}, kind="tall-mask")
    report = modelstore.sync(src, str(tmp_path / "dst"), tasks=["alpha"])
    assert sorted(report.bases_copied) == ["merged", "pretrained"]
    got, want = modelstore.open(str(tmp_path / "dst")).load("alpha"), modelstore.open(src).load("alpha")
    assert all(torch.equal(got[k], v) for k, v in want.items())


# ---- a smoke frontier: bytes per parameter of each variant ------------------------------------------------

def test_frontier_smoke_bits_per_param(tmp_path):
    """Two synthetic tasks of a 4-matrix model (262k parameters): every variant stored, loaded back,
    and its bits per parameter (task bytes × 8 / parameters) reported and ordered as expected."""
    from tools.frontier import bits_per_param
    g = torch.Generator().manual_seed(0)
    sd0 = {f"l{i}.weight": torch.randn(256, 256, generator=g) * 0.05 for i in range(4)}
    sd0.update({f"l{i}.bias": torch.zeros(256) for i in range(4)})
    paths = {"pre": str(tmp_path / "pre.safetensors")}
    save_file(sd0, paths["pre"])
    for t in ("t1", "t2"):
        save_file({k: v + 0.002 * torch.randn(v.shape, generator=g)
                   * (1 + 9 * (torch.rand(v.shape, generator=g) < 0.05))
                   for k, v in sd0.items()}, paths.setdefault(t, str(tmp_path / f"{t}.safetensors")))
    tasks = {t: paths[t] for t in ("t1", "t2")}
    rows = {}
    magnitude = {"sparsify": "magnitude"}
    variants = {"fft float16": dict(keep=0.1, value_dtype="float16", kind_options=magnitude),
                "fft int8": dict(keep=0.1, value_dtype="int8", kind_options=magnitude),
                "fft int4": dict(keep=0.1, value_dtype="int4", kind_options=magnitude),
                "dare": dict(keep=0.1, value_dtype="float16", kind_options={"sparsify": "dare"}),
                "tall-mask": dict(kind="tall-mask", lam=1.0),
                "emr": dict(kind="emr"), "bitdelta": dict(kind="bitdelta")}
    for name, kw in variants.items():
        s = modelstore.build(str(tmp_path / name.replace(" ", "-")), paths["pre"], tasks, **kw)
        r = modelstore.open(s.url)
        for t in tasks:
            assert set(r.load(t)) == set(sd0)
        rows[name] = np.mean([bits_per_param(r, t) for t in tasks])
    print("\nbits per parameter:", {k: round(v, 3) for k, v in rows.items()})
    assert rows["fft int4"] < rows["fft int8"] < rows["fft float16"]
    assert abs(rows["dare"] - rows["fft float16"]) < 0.25 * rows["fft float16"]  # equal byte budgets
    for one_bit in ("tall-mask", "emr", "bitdelta"):
        assert 0.3 < rows[one_bit] < 1.2


def test_frontier_table_lists_every_row_in_percent():
    from tools.frontier import table
    rows = [{"method": "DARE int4", "setting": "m1", "bits_per_param": 0.0571, "average": 0.7265,
             "accuracy": {"rt": 0.8, "trump": 0.653}},
            {"method": "Single-Task", "setting": "", "bits_per_param": 32.0, "average": 0.742,
             "accuracy": {"rt": 0.805, "trump": 0.679}}]
    lines = table(rows, ("rt", "trump")).splitlines()
    assert lines[0] == "| method | setting | bits / param | avg | rt | trump |"
    assert lines[2] == "| DARE int4 | m1 | 0.057 | **72.7** | 80.0 | 65.3 |"
    assert lines[3] == "| Single-Task |  | 32.000 | **74.2** | 80.5 | 67.9 |" and len(lines) == 4


def test_a_tall_mask_build_merges_with_lambda_1_unless_told(bert_models, tmp_path):
    """TALL masks τ_MTL = Σt τt: a tall-mask build's task arithmetic defaults to λ = 1 (fft keeps 0.3)."""
    from click.testing import CliRunner

    from modelstore.cli import main
    sd0, sds = bert_models["sd0"], bert_models["sds"]
    tasks = [f"{n}={p}" for n, p in bert_models["tasks"].items()]
    for args, lam in [(("--kind", "tall-mask"), 1.0), (("--kind", "tall-mask", "--lambda", "0.3"), 0.3), ((), 0.3)]:
        url = str(tmp_path / f"s{len(args)}")
        r = CliRunner().invoke(main, ["build", url, "--pretrained", bert_models["pre"],
                                      *sum((("--task", t) for t in tasks), ()), *args])  # fmt: skip
        assert r.exit_code == 0, r.output
        merged = modelstore.open(url).base("merged")
        for k in _floats(sd0):
            want = np_f32(sd0[k]) + lam * sum(np_f32(sd[k]) - np_f32(sd0[k]) for sd in sds.values())
            np.testing.assert_allclose(np_f32(merged[k]), want, rtol=1e-6, atol=1e-7, err_msg=f"{args} {k}")
    s = modelstore.build(str(tmp_path / "api"), bert_models["pre"], bert_models["tasks"], kind="tall-mask")
    assert s.manifest["bases"]["merged"]["merge"] == {"method": "task-arithmetic", "lam": 1.0}


def test_nibbles_of_every_byte_and_length():
    """int4 values two to a byte, low nibble first, as two's complement (spec section 5): every byte
    value unpacks as numpy reads it, and packing then unpacking keeps any count, odd ones included."""
    from modelstore.kinds.masks.packing import pack_nibbles, unpack_nibbles
    b = np.arange(256, dtype=np.uint8)
    want = np.stack([b & 0xF, b >> 4], axis=1).astype(np.int16)
    want = np.where(want >= 8, want - 16, want).astype(np.int8).reshape(-1)
    np.testing.assert_array_equal(unpack_nibbles(torch.from_numpy(b), 512).numpy(), want)
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 2, 3, 1001):
        q = torch.randint(-8, 8, (n,), generator=g, dtype=torch.int8)
        assert torch.equal(unpack_nibbles(torch.from_numpy(pack_nibbles(q)), n), q)
