"""The list of merge methods. Add a method: one module with a MergeMethod subclass, one entry here."""

from __future__ import annotations

from typing import Any

from modelstore.errors import InputError
from modelstore.merging.average import Average
from modelstore.merging.base import MergeMethod
from modelstore.merging.emr import EMRElect
from modelstore.merging.fisher import Fisher
from modelstore.merging.none import NoMerge
from modelstore.merging.regmean import RegMean
from modelstore.merging.task_arithmetic import TaskArithmetic
from modelstore.merging.ties import Ties

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
