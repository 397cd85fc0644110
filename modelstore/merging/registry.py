"""The list of merge methods. Add a method: one module with a MergeMethod subclass, one entry here."""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .average import Average
from .base import MergeMethod
from .none import NoMerge
from .task_arithmetic import TaskArithmetic

METHODS: list[type[MergeMethod]] = [TaskArithmetic, Average, NoMerge]


def method_names() -> list[str]:
    return [m.name for m in METHODS]


def get_method(name: str, **options: Any) -> MergeMethod:
    """Instantiate merge method `name` with its options (unknown ones are an error)."""
    for m in METHODS:
        if m.name == name:
            return m(**options)
    raise InputError(f"unknown merge method {name!r}; choose one of {', '.join(method_names())}")
