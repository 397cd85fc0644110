"""Torch's intra-op threads, set aside while modelstore's own threads share the cores; and a
second thread for work torch does in one.

Writing a sparse delta streams the model through a worker thread (reading θt and the base,
computing u) while the main thread selects entries and a writer thread encodes chunks. Torch
splitting each of their block-sized ops over its OpenMP team as well puts twice as many busy
threads as cores, and OpenMP's idle threads spin between the many short ops: with one torch
thread, add-task of a 1.07B bf16 model on 2 cores takes 6.3 s instead of 7.9 s (tools/bench_scale).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with torch's intra-op parallelism at 1 thread (process-wide, as torch keeps
    it), restored afterwards. Threads started inside the block take the setting too.
    `$MODELSTORE_KEEP_TORCH_THREADS=1` leaves torch's setting alone, for a process that runs other
    torch work beside a write (slower writes on many cores)."""
    n = torch.get_num_threads()
    if n == 1 or os.environ.get("MODELSTORE_KEEP_TORCH_THREADS", "") not in ("", "0"):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_HELPER: list[ThreadPoolExecutor] = []


def side_by_side(first: Callable[[], None], second: Callable[[], None]) -> None:
    """Run `second` in modelstore's helper thread while `first` runs in this one (one after the
    other where torch is set to one thread), and return when both have ended, raising the first
    one's error first. For ops torch runs single-threaded on CPU (`index_add_` on a 1-D tensor:
    bound by memory latency, so two threads on disjoint halves take half the time)."""
    if torch.get_num_threads() < 2:
        first()
        second()
        return
    if not _HELPER:
        _HELPER.append(ThreadPoolExecutor(1, thread_name_prefix="modelstore-helper"))
    other = _HELPER[0].submit(second)
    try:
        first()
    finally:
        wait([other])
    other.result()


__all__ = ["one_torch_thread", "side_by_side"]
