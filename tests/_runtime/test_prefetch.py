"""read_ahead and map_ahead: the same items in order, errors raised in order, an early stop stops the work."""

from __future__ import annotations

import os
import threading
import time

import pytest

from modelstore._runtime.prefetch import map_ahead, read_ahead


def test_items_in_order_made_in_another_thread():
    made_in = []

    def items():
        for i in range(50):
            made_in.append(threading.current_thread().name)
            yield i

    assert list(read_ahead(items())) == list(range(50))
    assert set(made_in) == {"modelstore-ahead"}


def test_error_is_raised_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("damaged at 3")

    got = []
    with pytest.raises(ValueError, match="damaged at 3"):
        for x in read_ahead(items()):
            got.append(x)
    assert got == [1, 2]


def test_worker_stays_at_most_depth_ahead_and_stops_with_its_consumer():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    before = set(threading.enumerate())  # an earlier test's abandoned generator may still hold one
    it = read_ahead(items(), depth=1)
    assert next(it) == 0
    mine = [t for t in threading.enumerate() if t.name == "modelstore-ahead" and t not in before]
    time.sleep(0.2)
    assert len(made) <= 3  # the one consumed, one queued, one waiting to be queued
    it.close()
    assert len(mine) == 1 and not mine[0].is_alive()


def test_an_abandoned_streamed_load_leaves_no_worker(tmp_path):
    """A load iterator dropped part way (base streamed, task decoded ahead) stops its workers."""
    import gc

    import torch
    from safetensors.torch import save_file

    import modelstore
    g = torch.Generator().manual_seed(0)
    pre = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(6)}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()},
              str(tmp_path / "t.safetensors"))
    modelstore.build(str(tmp_path / "s"), str(tmp_path / "pre.safetensors"), {"t": str(tmp_path / "t.safetensors")},
                     keep=0.1)
    store = modelstore.open(str(tmp_path / "s"), cache_base=False)
    it = store.tensors("t")
    name, _ = next(it)
    assert name == "w0"
    assert any(t.name == "modelstore-ahead" for t in threading.enumerate())
    del it
    gc.collect()
    deadline = time.monotonic() + 5
    while any(t.name == "modelstore-ahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "modelstore-ahead" for t in threading.enumerate())
    assert list(dict(store.tensors("t"))) == list(pre)  # and the store still loads


def test_map_ahead_maps_in_order_side_by_side_and_at_most_ahead():
    started: list[int] = []
    both = threading.Barrier(2, timeout=5)

    def fn(i: int) -> int:
        started.append(i)
        if i < 2 and (os.cpu_count() or 1) > 1:
            both.wait()  # items 0 and 1 run at the same time, or this times out
        return i * i

    it = map_ahead(fn, range(100), ahead=2)
    assert next(it) == 0
    time.sleep(0.1)
    assert len(started) <= 3  # the one consumed and at most two ahead of it
    assert list(it) == [i * i for i in range(1, 100)]
    assert sorted(started) == list(range(100))


def test_map_ahead_raises_an_error_at_its_item_and_drops_the_rest():
    def fn(i: int) -> int:
        if i == 3:
            raise ValueError("damaged at 3")
        return i

    got = []
    with pytest.raises(ValueError, match="damaged at 3"):
        for x in map_ahead(fn, range(10), ahead=4):
            got.append(x)
    assert got == [0, 1, 2]
