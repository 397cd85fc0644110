"""The list of merge methods. Add a method: one module with a MergeMethod subclass, one entry here."""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .average import Average
from .base import MergeMethod
from .emr import EMRElect
from .fisher import Fisher
from .none import NoMerge
from .regmean import RegMean
from .task_arithmetic import TaskArithmetic
from .ties import Ties

METHODS: list[type[MergeMethod]] = [TaskArithmetic, Average, NoMerge, Ties, Fisher, RegMean, EMRElect]


def method_names() -> list[str]:
    return [m.name for m in METHODS]


def method_class(name: str) -> type[MergeMethod]:
    """The class of merge method `name`: its `option_defaults` and `data_options` (e.g. where --stats go)."""
    for m in METHODS:
        if m.name == name:
            return m
    raise InputError(f"unknown merge method {name!r}; choose one of {', '.join(method_names())}")


def get_method(name: str, **options: Any) -> MergeMethod:
    """Instantiate merge method `name` with its options (unknown ones are an error)."""
    return method_class(name)(**options)
