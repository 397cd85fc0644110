"""A write hands the memory it freed back to the kernel (modelstore/_runtime/heap.py)."""

from __future__ import annotations

import numpy as np
import pytest

from modelstore._runtime import heap
from tools.bench_store import rss_anon


@pytest.mark.skipif(heap._malloc_trim() is None, reason="glibc's malloc_trim only")
def test_free_memory_in_the_middle_of_the_heap_goes_back_to_the_kernel():
    """Buffers of 96 KiB (under glibc's mmap threshold: from the heap), every 16th kept: what the
    others held cannot be trimmed from the heap's top, and stays with the process until released."""
    bufs = [np.ones(96 << 10, np.uint8) for _ in range(2048)]
    kept = bufs[15::16]
    del bufs
    before = rss_anon()
    heap.release_free_memory()
    assert before - rss_anon() > 100 << 20
    assert all(int(b[-1]) == 1 for b in kept)


def test_a_write_releases_what_it_freed_whether_it_commits_or_fails(store2, bert_models, monkeypatch):
    import modelstore
    from modelstore.kinds.fft.sparse_delta import SparseDelta
    from modelstore.storage import transaction
    calls = []
    monkeypatch.setattr(transaction, "release_free_memory", lambda: calls.append(1))
    s = modelstore.open(store2, mode="a")
    s.add_task("gamma", bert_models["tasks"]["gamma"], keep=0.1)
    assert len(calls) == 1

    def fail(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(SparseDelta, "write", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        s.add_task("delta", bert_models["tasks"]["gamma"], keep=0.1)
    assert len(calls) == 2 and "delta" not in s.tasks()
