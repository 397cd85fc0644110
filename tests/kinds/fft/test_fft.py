"""PERU-FFT / Post-Pruning against an independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MAGNITUDE, np_f32, ref_reconstruct, ref_topk_global
from safetensors.torch import save_file

import modelstore


def _ref_task_arithmetic(sd0, sds, lam):
    out = {}
    for k, v in sd0.items():
        if v.dtype.is_floating_point:
            out[k] = np_f32(v) + lam * sum(np_f32(sd[k]) - np_f32(v) for sd in sds)
        else:
            out[k] = v.numpy()
    return out


@pytest.mark.parametrize("block", [None, 37], ids=["whole-tensors", "blocks-of-37"])
@pytest.mark.parametrize("granularity", ["global", "per-tensor"])
@pytest.mark.parametrize("merge", ["task-arithmetic", "none"])
def test_roundtrip_matches_numpy_reference(bert_models, tmp_path, granularity, merge, block, monkeypatch):
    """`block` splits every tensor's delta into row blocks of about that many entries (as an LLM's
    large tensors are), with no delta cache, and a load applies kept entries that many at a time,
    in two threads from that many on: the same entries must be kept, in the same order, and read
    back the same."""
    if block is not None:
        from modelstore.kinds import base as kind_base
        from modelstore.kinds.fft import sparse_delta
        monkeypatch.setattr(sparse_delta, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr(sparse_delta, "CACHE_BYTES", 0)
        monkeypatch.setattr(kind_base, "APPLY_ENTRIES", block)
        monkeypatch.setattr(kind_base, "SPLIT_ENTRIES", block)
    sd0, sds = bert_models["sd0"], bert_models["sds"]
    keep = 0.05
    store = modelstore.build(str(tmp_path / "s"), bert_models["pre"], bert_models["tasks"], merge=merge,
                             keep=keep, granularity=granularity, kind_options=MAGNITUDE)
    assert store.tasks() == sorted(bert_models["tasks"])
    base_id = "pretrained" if merge == "none" else "merged"
    stored_base = {k: np_f32(v) for k, v in store.base(base_id).items()}
    ref_base = (_ref_task_arithmetic(sd0, list(sds.values()), 0.3) if merge != "none"
                else {k: np_f32(v) for k, v in sd0.items()})
    for k in sd0:
        np.testing.assert_allclose(stored_base[k], ref_base[k], rtol=1e-6, atol=1e-7)
    names = [k for k in sd0 if sd0[k].dtype.is_floating_point]
    for task, sd in sds.items():
        us = [np_f32(sd[k]) - stored_base[k] for k in names]
        if granularity == "global":
            masks = ref_topk_global(us, keep)
        else:
            masks = [ref_topk_global([u], keep)[0] for u in us]
        got = store.load(task)
        assert set(got) == set(sd)
        kept = 0
        for k, u, mask in zip(names, us, masks):
            want = ref_reconstruct(stored_base[k], u, mask)
            np.testing.assert_array_equal(np_f32(got[k]), want, err_msg=f"{task}/{k}")
            assert got[k].dtype == sd[k].dtype
            kept += int(mask.sum())
        for k in sd:
            if k not in names:
                assert torch.equal(got[k], sd[k])
        info = store.info(task)
        assert info["kept"] == kept
        assert info["total"] == sum(u.size for u in us)
        if granularity == "global":
            assert kept == int(np.floor(keep * info["total"] + 0.5))
        assert info["method"] == ("post-pruning" if merge == "none" else "peru-fft")


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return str(path)


def test_ties_broken_by_lowest_index_and_zeros_never_stored(tmp_path):
    base = {"a": torch.zeros(10), "b": torch.zeros(2, 5)}
    # integer deltas with many equal magnitudes; 8 zeros in total
    task = {"a": torch.tensor([1., -3, 3, 0, 2, -2, 0, 3, 1, 0]),
            "b": torch.tensor([[3., 0, 0, -3, 2], [0, 0, 0, 1, 1]])}
    pre, t = _save(tmp_path / "pre.safetensors", base), _save(tmp_path / "t.safetensors", task)
    # k = 6 of 20: the five 3s (a[1], a[2], a[7], b[0,0], b[0,3]), then the first 2 in global order: a[4]
    s = modelstore.build(str(tmp_path / "s"), pre, {"t": t}, merge="none", keep=0.3, value_dtype="float32",
                         kind_options={"sparsify": "magnitude"})
    got = s.load("t")
    assert torch.equal(got["a"], torch.tensor([0., -3, 3, 0, 2, 0, 0, 3, 0, 0]))
    assert torch.equal(got["b"], torch.tensor([[3., 0, 0, -3, 0], [0, 0, 0, 0, 0]]))
    assert s.info("t")["kept"] == 6
    # keep everything: only the 12 non-zero entries are stored
    s2 = modelstore.build(str(tmp_path / "s2"), pre, {"t": t}, merge="none", keep=1.0, value_dtype="float32")
    assert s2.info("t")["kept"] == 12
    assert all(torch.equal(s2.load("t")[k], task[k]) for k in task)


def test_bf16_checkpoint_roundtrip_dtype_and_exact_at_keep_1(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 32, generator=g).bfloat16(), "n": torch.randn(32, generator=g).bfloat16()}
    task = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
    pre, t = _save(tmp_path / "pre.safetensors", base), _save(tmp_path / "t.safetensors", task)
    s = modelstore.build(str(tmp_path / "s"), pre, {"t": t}, merge="none", keep=1.0,
                         kind_options={**MAGNITUDE, "value_dtype": "bfloat16"})
    assert s.info("t")["params"]["value_dtype"] == "bfloat16"
    assert s.base("pretrained")["w"].dtype == torch.bfloat16
    got = s.load("t")
    for k in task:
        assert got[k].dtype == torch.bfloat16
    # deltas of bf16 numbers held in bf16 may round: compare with the numpy reference of that rounding
    for k in task:
        u = np_f32(task[k]) - np_f32(base[k])
        want = (np_f32(base[k]) + np_f32(torch.from_numpy(u).bfloat16()))
        assert torch.equal(got[k], torch.from_numpy(want).bfloat16())
    s32 = modelstore.build(str(tmp_path / "s32"), pre, {"t": t}, merge="none", keep=1.0, value_dtype="float32")
    assert all(torch.equal(s32.load("t")[k], task[k]) for k in task)
    assert s.load("t", dtype=torch.float32)["w"].dtype == torch.float32


def test_shape_mismatch_and_task_only_tensors_are_dense(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"enc": torch.randn(16, 8, generator=g), "head": torch.randn(3, 8, generator=g)}
    t1 = {"enc": base["enc"] + 0.1 * torch.randn(16, 8, generator=g), "head": torch.randn(5, 8, generator=g),
          "extra.bias": torch.randn(5, generator=g)}
    t2 = {"enc": base["enc"].clone(), "head": base["head"].clone()}
    pre = _save(tmp_path / "pre.safetensors", base)
    s = modelstore.build(str(tmp_path / "s"), pre, {"t1": _save(tmp_path / "t1.safetensors", t1),
                                                     "t2": _save(tmp_path / "t2.safetensors", t2)}, keep=0.5)
    got = s.load("t1")
    assert torch.equal(got["head"], t1["head"]) and torch.equal(got["extra.bias"], t1["extra.bias"])
    assert s.info("t1")["dense_tensors"] == 2
    # head is not merged (t1's shape differs): the base keeps θ0's head, and t2 equal to it costs nothing
    assert torch.equal(s.base("merged")["head"], base["head"])
    g2 = s.load("t2")
    assert torch.equal(g2["head"], base["head"]) and s.info("t2")["dense_tensors"] == 0


def test_include_exclude_choose_sparsified_tensors(bert_models, tmp_path):
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], bert_models["tasks"], keep=0.01,
                         exclude=r"LayerNorm|embeddings")
    sd = bert_models["sds"]["alpha"]
    got = s.load("alpha")
    dense = [k for k in sd if "LayerNorm" in k or "embeddings" in k]
    assert dense and all(torch.equal(got[k], sd[k]) for k in dense)
    assert all(torch.equal(s.base("merged")[k], bert_models["sd0"][k]) for k in dense)
    info = s.info("alpha")
    assert info["total"] == sum(sd[k].numel() for k in sd if k not in dense and sd[k].dtype.is_floating_point)


def test_unchanged_task_costs_nothing(bert_models, tmp_path):
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], {"same": bert_models["pre"]}, merge="none")
    assert s.info("same")["kept"] == 0
    assert all(torch.equal(v, bert_models["sd0"][k]) for k, v in s.load("same").items())


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "two-threads"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_sparse_edit_is_float32_sum_rounded_once(base_dtype, value_dtype, out_dtype, split, monkeypatch):
    """Every load path (one index_add_ where it is the same arithmetic, gather-add-scatter else,
    applied in parts, by one thread or two on halves of the positions) gives
    round(float32(B[p]) + float32(v)) at the kept positions, B elsewhere."""
    from modelstore.kinds import base as kinds_base
    from modelstore.kinds.fft import sparse_delta
    monkeypatch.setattr(kinds_base, "APPLY_ENTRIES", 7)  # several parts
    if split:
        monkeypatch.setattr(kinds_base, "SPLIT_ENTRIES", 8)
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(40, 5, generator=g) * 3).to(base_dtype)
    pos = torch.sort(torch.randperm(200, generator=g)[:31]).values.to(torch.int32)
    delta = (torch.randn(31, generator=g) * 1e-2).to(value_dtype)
    edit = sparse_delta.AddAt("w", (40, 5), base_dtype, pos, delta)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # side_by_side runs halves in one thread where torch has one
    try:
        got = edit.applied(base.clone(), out_dtype)
    finally:
        torch.set_num_threads(threads)
    want = np_f32(base).reshape(-1).copy()
    want[pos.numpy()] += np_f32(delta)  # float32 sum, exact inputs
    want_t = torch.from_numpy(want).to(out_dtype or base_dtype)
    rest = np.setdiff1d(np.arange(200), pos.numpy())
    want_t.view(-1)[rest] = base.reshape(-1)[rest].to(out_dtype or base_dtype)  # untouched entries: the base's own
    assert got.dtype == (out_dtype or base_dtype) and got.shape == (40, 5)
    assert torch.equal(got.reshape(-1).view(torch.uint8), want_t.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("gaps", [[3, 2, 4], [1, 0x7FFFFFFF, 2], [2, 0xFFFFFFF0]],
                         ids=["past-the-end", "wraps-at-2**31", "wraps-negative"])
def test_positions_outside_the_tensor_are_refused(gaps):
    """Gaps whose sum leaves a 3x3 tensor (damage that passed its checksums, or a foreign writer):
    summed in place as int32, a sum past 2**31 wraps negative; both ends are caught."""
    from modelstore.errors import CorruptStoreError
    from modelstore.kinds.fft.sparse_delta import SparseDelta

    class Segments:  # what a payload's reader hands the kind: fresh tensors of each array's slice
        def get(self, array, start, count, dtype):
            return torch.tensor(gaps, dtype=torch.int64).to(torch.uint32) if array == "indices" else torch.ones(count)

    table = [{"name": "w", "kind": "sparse", "shape": [3, 3], "dtype": "float32", "start": 0, "count": 3}]
    entry = {"params": {"index_dtype": "uint32", "value_dtype": "float32"}}
    with pytest.raises(CorruptStoreError, match="outside the tensor"):
        list(SparseDelta().edits(Segments(), table, entry, torch.device("cpu")))
