"""While a sparse delta is written, torch's intra-op threads are set aside for modelstore's own
(reader, selector, chunk writer), and given back afterwards, also when the write fails; ops torch
runs in one thread are run side by side in two."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

import modelstore
from modelstore._runtime import shard_reads
from modelstore._runtime.threads import one_torch_thread, side_by_side
from modelstore.errors import InputError


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_torch_thread_inside_and_restored_after(two_threads):
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), one_torch_thread():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_the_thread_setting_can_be_left_alone(two_threads, monkeypatch):
    monkeypatch.setenv("MODELSTORE_KEEP_TORCH_THREADS", "1")
    with one_torch_thread():
        assert torch.get_num_threads() == 2


def test_add_task_reads_with_one_torch_thread_and_gives_threads_back(tmp_path, monkeypatch, two_threads):
    g = torch.Generator().manual_seed(0)
    pre = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(4)}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()},
              str(tmp_path / "t.safetensors"))
    store = modelstore.init(str(tmp_path / "s"), str(tmp_path / "pre.safetensors"))
    seen: list[int] = []
    real = shard_reads.ShardReader.rows
    monkeypatch.setattr(shard_reads.ShardReader, "rows",
                        lambda self, *a: (seen.append(torch.get_num_threads()), real(self, *a))[1])
    store.add_task("t", str(tmp_path / "t.safetensors"), keep=0.1)
    assert seen and set(seen) == {1}  # rows are read in the stream's worker thread
    assert torch.get_num_threads() == 2
    save_file({k: v * float("nan") for k, v in pre.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(InputError, match="NaN"):
        store.add_task("nan", str(tmp_path / "nan.safetensors"), keep=0.1)
    assert torch.get_num_threads() == 2


def test_side_by_side_uses_a_second_thread_and_raises_the_first_error(two_threads):
    ran = {}

    def mark(key, error=None):
        def run():
            ran[key] = threading.current_thread().name
            if error:
                raise error
        return run

    side_by_side(mark("a"), mark("b"))
    assert ran["a"] == threading.current_thread().name and ran["b"].startswith("modelstore-helper")
    with pytest.raises(KeyError):  # the first one's error first; the second has ended too
        side_by_side(mark("c", KeyError("c")), mark("d", ValueError("d")))
    assert "d" in ran
    with pytest.raises(ValueError):
        side_by_side(mark("e"), mark("f", ValueError("f")))
    torch.set_num_threads(1)
    side_by_side(mark("g"), mark("h"))  # torch at one thread: one after the other, here
    assert ran["g"] == ran["h"] == threading.current_thread().name
