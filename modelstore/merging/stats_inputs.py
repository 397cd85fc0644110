"""Shared handling of the per-task statistics that `fisher` and `regmean` weight by.

The statistics of a method come in one data option (`fishers`, `grams`): a list with one
entry per task, in task order, each a path to a safetensors file written by
`modelstore.merging.statistics`, an in-memory dict of tensors, or any TensorSource. Everything is
checked in `prepare` (count, presence in every task or none, shapes) so a bad file fails
before any tensor is merged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import ClassVar, cast

from safetensors import safe_open

from modelstore.errors import InputError
from modelstore.inputs.sources import DictSource, TensorSource, open_checkpoint
from modelstore.merging.base import MergeMethod
from modelstore.merging.statistics import KIND_KEY


class StatsMethod(MergeMethod):
    """A merge method that needs one statistics source per task, given in `data_options[0]`."""

    #: What the statistics are ("fisher", "gram"): the `modelstore.merging.statistics` function that makes them.
    stats_kind: ClassVar[str]

    @property
    def stats_option(self) -> str:
        return self.data_options[0]

    def validate(self) -> None:
        value = self.data[self.stats_option]
        if value is not None and (isinstance(value, (str, os.PathLike, Mapping)) or not isinstance(value, Sequence)):
            raise InputError(f"{self.stats_option} must be a list with one {self.stats_kind} statistics entry per "
                             f"task (path, dict or TensorSource), got a {type(value).__name__}")

    def open_stats(self, n_tasks: int) -> None:
        """Open the statistics of every task (self.stats, self.labels); InputError if missing or miscounted."""
        value = self.data[self.stats_option]
        if value is None:
            raise InputError(f"merge method {self.name!r} needs {self.stats_kind} statistics of every task: "
                             f"pass --stats TASK=FILE for each task (or {self.stats_option}=[...]); "
                             f"make them with modelstore.merging.statistics.{self.stats_kind}()")
        if len(value) != n_tasks:
            raise InputError(f"merge method {self.name!r} got {self.stats_kind} statistics for {len(value)} "
                             f"task(s) but there are {n_tasks} tasks; give exactly one per task")
        self.stats: list[TensorSource] = []
        self.labels: list[str] = []
        self._names: list[set[str]] = []
        for i, v in enumerate(value):
            src, label = self._open(v, i)
            self.stats.append(src)
            self.labels.append(label)
            self._names.append(set(src.names()))

    def _open(self, value: object, i: int) -> tuple[TensorSource, str]:
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            src = open_checkpoint(path)
            if path.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    kind = (f.metadata() or {}).get(KIND_KEY)
                if kind is not None and kind != self.stats_kind:
                    raise InputError(f"{path} holds {kind} statistics but merge method {self.name!r} needs "
                                     f"{self.stats_kind} statistics "
                                     f"(modelstore.merging.statistics.{self.stats_kind}())")
            return src, path
        label = f"{self.stats_kind} statistics of task #{i + 1}"
        if isinstance(value, Mapping):
            return DictSource(value), label
        if all(hasattr(value, a) for a in ("names", "shape", "dtype", "get")):
            return cast(TensorSource, value), label  # has the methods merging reads (checked just above)
        raise InputError(f"{label}: expected a path, a dict of tensors or a TensorSource, got {type(value).__name__}")

    def has_stat(self, key: str, shape: tuple[int, ...], name: str) -> bool:
        """True if every task has statistic `key` of `shape` (for tensor `name`), False if none has it."""
        present = [key in names for names in self._names]
        if not any(present):
            return False
        if not all(present):
            missing = self.labels[present.index(False)]
            raise InputError(f"{missing} has no entry {key!r} that other tasks' statistics have; "
                             "compute every task's statistics for the same tensors")
        for src, label in zip(self.stats, self.labels):
            got = tuple(src.shape(key))
            if got != shape:
                raise InputError(f"{label}: entry {key!r} has shape {list(got)}, expected {list(shape)} for tensor "
                                 f"{name!r}; compute the statistics on a model of the same architecture")
        return True

    def require_some(self, used: set[str]) -> None:
        """InputError if no merged tensor has statistics (the files are keyed by other names)."""
        if not used:
            example = next(iter(sorted(self._names[0])), None) if self._names else None
            raise InputError(f"no tensor of the models has an entry in the {self.stats_kind} statistics"
                             + (f" (they have e.g. {example!r})" if example else " (they are empty)")
                             + "; key them by the checkpoint's tensor names, as model.state_dict() does")
