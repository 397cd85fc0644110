"""Local chunk files are read ahead by the kernel during streaming reads only: a load that reads
chunk after chunk asks for the next ones, a sample that reads a few chunks and skips asks for
nothing it will not read."""

from __future__ import annotations

import numpy as np
import zarr

from modelstore.format import chunks as chunks_module
from modelstore.format.chunks import Chunks
from modelstore.format.codecs import compressors


def _array(tmp_path, n_chunks: int, chunk: int = 16) -> Chunks:
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    a = group.create_array("a", shape=(n_chunks * chunk,), chunks=(chunk,), dtype="int32",
                           compressors=compressors("raw", 4), fill_value=0, config={"write_empty_chunks": True})
    c = Chunks(a)
    for i in range(n_chunks):
        c.write(i, np.arange(i * chunk, (i + 1) * chunk, dtype=np.int32))
    return Chunks(a)


def _advised(c: Chunks, monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    real = Chunks._advise
    monkeypatch.setattr(Chunks, "_advise", lambda self, first, last: (calls.append((first, last)), real(self, first, last)))
    return calls


def test_a_streaming_read_reads_ahead_once_it_is_a_streak(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks_module, "ADVISE_BYTES", 64 * 8)  # 8 chunks of 16 int32
    c = _array(tmp_path, 40)
    calls = _advised(c, monkeypatch)
    out = np.empty(16, np.int32)
    for i in range(40):
        c.read_into(i * 16, (i + 1) * 16, out)
        assert (out == np.arange(i * 16, (i + 1) * 16)).all()
    assert [first for first, _ in calls] == list(range(chunks_module.STREAK, 40))
    assert max(last - first for first, last in calls) == 8


def test_reads_that_skip_ask_for_nothing(tmp_path, monkeypatch):
    c = _array(tmp_path, 64)
    calls = _advised(c, monkeypatch)
    out = np.empty(32, np.int32)
    for run in range(0, 64, 8):  # two chunks of every eight, as a sample reads
        c.read_into(run * 16, (run + 2) * 16, out)
        assert (out == np.arange(run * 16, (run + 2) * 16)).all()
    assert calls == []
