"""Making the items of an iterator in a worker thread, ahead of their consumer.

A load decodes a task tensor by tensor (read, check, decompress, sum the gaps) and applies each
one; both halves spend their time in code that releases the GIL (blosc, numpy, torch), so on two
cores the next tensor's decoding can run while this one is applied.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import TypeVar, cast

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


__all__ = ["read_ahead"]
