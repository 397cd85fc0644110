"""Making the items of an iterator in a worker thread, ahead of their consumer; and mapping a
function over items in a pool of threads, ahead of their consumer.

A load decodes a task tensor by tensor (read, check, decompress, sum the gaps) and applies each
one; both halves spend their time in code that releases the GIL (blosc, numpy, torch), so on two
cores the next tensor's decoding can run while this one is applied.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar, cast

A = TypeVar("A")
T = TypeVar("T")

_END = object()


def read_ahead(items: Iterator[T], depth: int = 1) -> Generator[T, None, None]:
    """The items of `items`, made in a worker thread at most `depth` ahead of the consumer.

    `items` runs in the worker only, so whatever it reads must not be touched by the consumer
    meanwhile. Its exception is raised to the consumer in order; a consumer that stops early (or
    is closed) stops the worker before this generator ends.
    """
    q: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object, error: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                q.put((item, error), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
            put(_END, e)

    worker = threading.Thread(target=work, name="modelstore-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield cast(T, item)  # every item but _END is one of `items`
    finally:
        stop.set()
        worker.join()


_POOL: list[ThreadPoolExecutor] = []


def map_ahead(fn: Callable[[A], T], items: Iterable[A], ahead: int | None = None) -> Iterator[T]:
    """`fn(x)` for each of `items`, in order, made in a pool of threads (one per core, at most 8)
    up to `ahead` items ahead of the consumer (default: the pool's size). For independent pieces
    of work that each run single-threaded in code that releases the GIL (a seeded tensor's
    re-drawn positions: one MT19937 stream each), so a many-core host makes them side by side.
    An item's exception is raised when the consumer reaches it; a consumer that stops early
    leaves at most `ahead` items running, whose results are dropped."""
    workers = min(8, os.cpu_count() or 1)
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(workers, thread_name_prefix="modelstore-map"))
    pool, ahead = _POOL[0], ahead or workers
    pending: collections.deque[Future[T]] = collections.deque()
    try:
        for x in items:
            pending.append(pool.submit(fn, x))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


__all__ = ["map_ahead", "read_ahead"]
