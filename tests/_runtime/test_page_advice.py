"""Local files are read ahead by the kernel during streaming reads only: a reader that takes range
after range asks for the next ones, a sample that reads a few megabytes and skips asks for nothing
it will not read. Chunk files of a store and safetensors shards both go through `readahead.Streak`."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
import zarr
from safetensors import safe_open
from safetensors.torch import save_file

from modelstore._runtime import page_advice as readahead
from modelstore._runtime import shard_reads
from modelstore.errors import InputError
from modelstore.format.chunks import Chunks
from modelstore.format.codecs import compressors
from modelstore.inputs.sources import open_checkpoint


@pytest.fixture
def small_streaks(monkeypatch):
    """A streak of 64 bytes starts reading ahead, up to 512 bytes."""
    monkeypatch.setattr(readahead, "STREAK_BYTES", 64)
    monkeypatch.setattr(readahead, "ADVISE_BYTES", 512)


class _Recorded:
    """A Streak whose advice is recorded, non-empty ranges only."""

    def __init__(self, end: int):
        self.streak, self.calls = readahead.Streak(end), []

    def read(self, start: int, stop: int) -> None:
        got = self.streak.read(start, stop)
        if got is not None and got[0] < got[1]:
            self.calls.append(got)


def _streak(end: int) -> tuple[_Recorded, list[tuple[int, int]]]:
    s = _Recorded(end)
    return s, s.calls


def test_a_stream_is_read_ahead_once_it_is_a_streak_each_byte_once(small_streaks):
    s, calls = _streak(10_000)
    for start in range(0, 10_000, 16):
        s.read(start, start + 16)
    assert calls[0] == (64, 96)  # from the read that makes the streak longer than 64 bytes, as far ahead as it is over
    assert max(b - a for a, b in calls) <= 512 + 16
    covered = [x for a, b in calls for x in range(a, b)]
    assert covered == list(range(64, 10_000))  # every byte from there on once, none past the end


def test_a_second_pass_from_the_start_is_read_ahead_again(small_streaks):
    """A rewind starts a new streak: what the first pass advised may have left the page cache since
    (a build reads a task's checkpoint to merge it, then again to store it)."""
    s, calls = _streak(10_000)
    for _ in range(2):
        calls.clear()
        for start in range(0, 10_000, 16):
            s.read(start, start + 16)
        assert [x for a, b in calls for x in range(a, b)] == list(range(64, 10_000))


def test_reads_that_skip_ask_for_nothing(small_streaks):
    s, calls = _streak(100_000)
    for run in range(0, 100_000, 1024):  # 48 bytes of every 1024, as a sample reads
        s.read(run, run + 48)
    assert calls == []


def _array(tmp_path, n_chunks: int, chunk: int = 16) -> Chunks:
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    a = group.create_array("a", shape=(n_chunks * chunk,), chunks=(chunk,), dtype="int32",
                           compressors=compressors("raw", 4), fill_value=0, config={"write_empty_chunks": True})
    c = Chunks(a)
    for i in range(n_chunks):
        c.write(i, np.arange(i * chunk, (i + 1) * chunk, dtype=np.int32))
    return Chunks(a)


def _advised_chunks(monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    real = Chunks._advise
    monkeypatch.setattr(Chunks, "_advise", lambda self, a, b: (calls.append((a, b)), real(self, a, b)))
    return calls


def test_streaming_chunk_reads_read_the_next_chunk_files_ahead(tmp_path, monkeypatch, small_streaks):
    calls = _advised_chunks(monkeypatch)
    c = _array(tmp_path, 40)  # chunks of 64 bytes
    out = np.empty(16, np.int32)
    for i in range(40):
        c.read_into(i * 16, (i + 1) * 16, out)
        assert (out == np.arange(i * 16, (i + 1) * 16)).all()
    assert calls and calls[0] == (64, 192)  # the second chunk makes the streak longer than 64 bytes
    assert calls[-1][1] == 40 * 64
    advised: list[int] = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *a: (advised.append(os.fstat(fd).st_ino), real(fd, *a)))
    for _ in range(2):  # a second pass from the start: every chunk file from the second on, once more
        advised.clear()
        for i in range(40):
            c.read_into(i * 16, (i + 1) * 16, out)
        assert len(advised) == len(set(advised)) == 39


def test_chunk_reads_that_skip_ask_for_nothing(tmp_path, monkeypatch, small_streaks):
    calls = _advised_chunks(monkeypatch)
    c = _array(tmp_path, 64)
    out = np.empty(16, np.int32)
    for run in range(0, 64, 8):  # one chunk of every eight, as a sample reads
        c.read_into(run * 16, (run + 1) * 16, out)
        assert (out == np.arange(run * 16, (run + 1) * 16)).all()
    assert calls == []


def _shard(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(37, 11, generator=g).to(torch.bfloat16),
        "f32": torch.randn(5, 3, 2, generator=g),
        "vec": torch.randn(9, generator=g).half(),
        "mask": torch.rand(6, 4, generator=g) > 0.5,
        "none": torch.zeros(0, 8),
        "i64": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    }
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    return path, tensors


def test_shard_rows_are_safetensors_own_slices(tmp_path):
    path, tensors = _shard(tmp_path)
    ck = open_checkpoint(path)
    with safe_open(path, framework="pt") as f:
        for name, t in tensors.items():
            for start, stop in ((0, t.shape[0]), (1, 3), (2, 2), (t.shape[0] - 1, t.shape[0] + 5)):
                got = ck.rows(name, start, stop)
                want = f.get_slice(name)[start:stop]
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got, want), (name, start, stop)


def test_streaming_shard_reads_read_ahead_and_samples_do_not(tmp_path, monkeypatch, small_streaks):
    path = str(tmp_path / "big.safetensors")
    t = torch.arange(4096, dtype=torch.float32).reshape(256, 16)  # rows of 64 bytes
    save_file({"w": t}, path)
    calls: list[tuple[int, int]] = []
    real = shard_reads.ShardReader._advise
    monkeypatch.setattr(shard_reads.ShardReader, "_advise", lambda self, a, b: (calls.append((a, b)), real(self, a, b)))
    ck = open_checkpoint(path)
    data = os.path.getsize(path) - t.numel() * 4  # where the tensor's bytes begin
    for r in range(0, 256, 16):  # one row of every sixteen, as a sample reads: each row's own bytes
        assert torch.equal(ck.rows("w", r, r + 1), t[r:r + 1])
    assert calls == [(data + 64 * r, data + 64 * (r + 1)) for r in range(0, 256, 16)]
    calls.clear()
    for _ in range(2):  # the second pass, from the start, is advised again
        calls.clear()
        for r in range(256):
            assert torch.equal(ck.rows("w", r, r + 1), t[r:r + 1])
        covered = [x for a, b in calls for x in range(a, b)]
        assert covered == list(range(data, os.path.getsize(path)))  # streaming: every byte once, ahead of its read
        assert max(b - a for a, b in calls) > 64


@pytest.mark.parametrize("offsets", [[0, "64"], [0, 64.0], [True, 64], [0, 65], [-64, 0]])
def test_bad_data_offsets_are_refused_when_opened(tmp_path, offsets):
    path = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": offsets}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(InputError, match="bad.safetensors"):
        open_checkpoint(str(path))
