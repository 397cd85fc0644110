"""read_ahead: the same items in order, errors raised in order, an early stop stops the worker."""

from __future__ import annotations

import threading
import time

import pytest

from modelstore.ahead import read_ahead


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

    it = read_ahead(items(), depth=1)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(made) <= 3  # the one consumed, one queued, one waiting to be queued
    it.close()
    assert not any(t.name == "modelstore-ahead" for t in threading.enumerate())
