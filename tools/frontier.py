"""Accuracy against bytes per parameter of every way modelstore keeps a task."""

from __future__ import annotations

import math

import modelstore


def bits_per_param(store: modelstore.Store, task: str) -> float:
    """The task's stored bytes × 8 per parameter of its model (the shared bases not counted)."""
    n = sum(math.prod(t["shape"]) for t in store.table(task))
    return store.entry(task)["bytes"] * 8 / n
