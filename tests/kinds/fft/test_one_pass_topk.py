"""The one-pass global top-k (a sample, then one pass keeping every entry that may be kept)
against the numpy brute force, and against the two counting passes it replaces: the same entries,
ties broken by the lowest global index, whether the picked entries stay in memory or spill to a
temporary file, and when the sample's bracket misses on either side."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import np_f32, ref_topk_global
from safetensors.torch import save_file

import modelstore
from modelstore.kinds.fft import candidates, sparse_delta
from modelstore.kinds.fft.topk import Bracket, magnitude_bits

#: The selection these tests are about: the top-m magnitudes (not the default, DARE), values exact.
TOP_M = {"sparsify": "magnitude", "value_dtype": "float32"}


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.fixture()
def ties_model(tmp_path):
    """θ0 and a task whose deltas are small integers (many equal magnitudes, many zeros), in 16-entry
    rows, so 37-entry blocks make hundreds of blocks as an LLM's tensors do."""
    g = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(3000, 16, generator=g), "b": torch.randn(1200, 16, generator=g),
            "n": torch.randn(16, generator=g)}
    task = {k: v + torch.randint(-4, 5, v.shape, generator=g).float() for k, v in base.items()}
    return _save(tmp_path / "pre.safetensors", base), _save(tmp_path / "t.safetensors", task), base, task


def _small_blocks(monkeypatch, cache_bytes):
    monkeypatch.setattr(sparse_delta, "BLOCK_ELEMENTS", 37)
    monkeypatch.setattr(sparse_delta, "CACHE_BYTES", cache_bytes)


def _spy(monkeypatch, result_of):
    """Record what _global_cut returned (its picked entries None: the counting passes ran)."""
    seen, real = [], sparse_delta._global_cut

    def spy(*a, **kw):
        r = real(*a, **kw)
        seen.append(result_of(r))
        return r

    monkeypatch.setattr(sparse_delta, "_global_cut", spy)
    return seen


def _assert_global_top10(s, base, task):
    """Task "t" of store `s` is its base plus the global top-10% of its delta (numpy reference)."""
    names = list(base)
    us = [np_f32(task[n]) - np_f32(base[n]) for n in names]
    got = s.load("t")
    for n, u, m in zip(names, us, ref_topk_global(us, 0.1)):
        np.testing.assert_array_equal(np_f32(got[n]), np_f32(base[n]) + np.where(m, u, 0), err_msg=n)


def _two_pass(tmp_path, pre, t, keep):
    mp = pytest.MonkeyPatch()
    mp.setattr(candidates.Candidates, "room_for", lambda self, count: False)
    try:
        return modelstore.build(str(tmp_path / "two"), pre, {"t": t}, merge="none", keep=keep, kind_options=TOP_M)
    finally:
        mp.undo()


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("keep", [0.05, 0.3])
def test_one_pass_keeps_the_brute_force_entries(ties_model, tmp_path, monkeypatch, cache_bytes, keep):
    pre, t, base, task = ties_model
    _small_blocks(monkeypatch, cache_bytes)
    seen = _spy(monkeypatch, lambda r: None if r[1] is None else (r[1].count, r[1]._file is not None))
    s = modelstore.build(str(tmp_path / "one"), pre, {"t": t}, merge="none", keep=keep, kind_options=TOP_M)
    assert seen and seen[0] is not None, "the one-pass selection did not run"
    count, spilled = seen[0]
    assert spilled == (cache_bytes == 0)
    names = list(base)
    us = [np_f32(task[n]) - np_f32(base[n]) for n in names]
    masks = ref_topk_global(us, keep)
    assert count >= sum(int(m.sum()) for m in masks)
    got = s.load("t")
    for n, u, m in zip(names, us, masks):
        np.testing.assert_array_equal(np_f32(got[n]), np_f32(base[n]) + np.where(m, u, 0), err_msg=n)
    two = _two_pass(tmp_path, pre, t, keep)
    assert s.info("t")["kept"] == two.info("t")["kept"] == sum(int(m.sum()) for m in masks)
    assert all(torch.equal(got[n], two.load("t")[n]) for n in names)


@pytest.mark.parametrize("miss", ["bracket-too-low", "bracket-too-high"])
def test_a_missed_bracket_still_gives_the_exact_cut(ties_model, tmp_path, monkeypatch, miss):
    """Too low a bracket (it holds more than k entries above it): the cut is found among the picked
    entries. Too high (fewer than k picked): the two counting passes run instead."""
    pre, t, base, task = ties_model
    _small_blocks(monkeypatch, 0)
    k_th = 3 if miss == "bracket-too-low" else 4  # |u| of the k-th largest at keep 0.1 is 4 (integers -4..4)
    lo = int(magnitude_bits(torch.tensor([float(k_th - 1 if miss == "bracket-too-low" else k_th) + 0.5]))[0])
    wrong = Bracket(lo, lo + (1 << 16), 0)
    monkeypatch.setattr(sparse_delta, "bracket", lambda *a, **kw: wrong)
    seen = _spy(monkeypatch, lambda r: r[1] is not None)
    s = modelstore.build(str(tmp_path / "one"), pre, {"t": t}, merge="none", keep=0.1, kind_options=TOP_M)
    assert seen == [miss == "bracket-too-low"]
    _assert_global_top10(s, base, task)


def test_picked_entries_leave_no_file_behind(ties_model, tmp_path, monkeypatch):
    """Spilled candidates live in an unnamed temporary file: nothing is left in TMPDIR after a
    task is stored, nor after one is refused halfway (a NaN in a later tensor)."""
    pre, t, base, task = ties_model
    _small_blocks(monkeypatch, 0)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    seen = _spy(monkeypatch, lambda r: None if r[1] is None else r[1]._file is not None)
    s = modelstore.build(str(tmp_path / "s"), pre, {"t": t}, merge="none", keep=0.1, kind_options=TOP_M)
    bad = dict(task)
    bad["b"] = task["b"].clone()
    bad["b"][1000, 3] = float("nan")
    with pytest.raises(modelstore.InputError, match="NaN"):
        s.add_task("bad", _save(tmp_path / "bad.safetensors", bad), keep=0.1, **TOP_M)
    assert seen == [True, True]
    assert os.listdir(tmp) == []
    assert s.tasks() == ["t"]


@pytest.mark.parametrize("trouble", ["disk-full-while-writing", "too-little-room"])
def test_a_temporary_directory_that_cannot_hold_them_falls_back_to_two_passes(ties_model, tmp_path, monkeypatch,
                                                                               trouble):
    """A full disk mid-pass (ENOSPC from the spill's writes) or too little free space up front: the
    task is still stored, exactly, by the two counting passes."""
    import errno
    import shutil

    pre, t, base, task = ties_model
    _small_blocks(monkeypatch, 0)
    if trouble == "disk-full-while-writing":
        def full(self, *arrays):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(candidates.Candidates, "_write", full)
    else:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(candidates.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    seen = _spy(monkeypatch, lambda r: r[1] is not None)
    if trouble == "disk-full-while-writing":
        with pytest.warns(UserWarning, match="No space left on device; counting the top-k in two passes"):
            s = modelstore.build(str(tmp_path / "s"), pre, {"t": t}, merge="none", keep=0.1, kind_options=TOP_M)
    else:
        s = modelstore.build(str(tmp_path / "s"), pre, {"t": t}, merge="none", keep=0.1, kind_options=TOP_M)
    assert seen == [False]
    _assert_global_top10(s, base, task)


def test_a_base_of_long_chunks_is_sampled_chunk_by_chunk(ties_model, tmp_path, monkeypatch):
    """Where the base's chunks are longer than a sample's run (a 70B base's case, made small: 66
    chunks of 1024 entries, runs of 4 blocks of 37), the sample decodes only every 8th chunk of the
    base, not most of them, and the one-pass selection still keeps the brute-force entries."""
    from modelstore.format import chunks as chunk_io
    from modelstore.format import codecs
    pre, t, base, task = ties_model
    _small_blocks(monkeypatch, 1 << 30)
    monkeypatch.setattr(codecs, "CHUNK_ELEMENTS", 16)
    monkeypatch.setattr(codecs, "MAX_CHUNKS", 128)
    decoded: set[int] = set()
    sampling = [False]
    real_decode, real_bracket = chunk_io.Chunks._decode_file, sparse_delta.bracket

    def decode_file(self, index, dest):  # every local compressed chunk decoded, for any reader
        if sampling[0]:
            assert self.chunk == 1024
            decoded.add(index)
        return real_decode(self, index, dest)

    def bracket(k, sample, total):
        def watched():
            sampling[0] = True
            try:
                yield from sample()
            finally:
                sampling[0] = False
        return real_bracket(k, watched, total)

    monkeypatch.setattr(chunk_io.Chunks, "_decode_file", decode_file)
    monkeypatch.setattr(sparse_delta, "bracket", bracket)
    seen = _spy(monkeypatch, lambda r: r[1] is not None)
    s = modelstore.build(str(tmp_path / "one"), pre, {"t": t}, merge="none", keep=0.1, kind_options=TOP_M)
    assert seen == [True]
    assert decoded and all(c % 8 == 0 for c in decoded) and len(decoded) >= 6, sorted(decoded)
    _assert_global_top10(s, base, task)
