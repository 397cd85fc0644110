"""The interface every merge method implements.

A method turns the pre-trained tensor and the T task tensors of one name into the
merged tensor θ*, in float32, one name at a time, so memory stays about
(T + 2) x the largest tensor. Methods that need a whole-model view (e.g. TIES with
global trimming) do it in `prepare`, which may stream over all tensors first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from modelstore.errors import InputError
from modelstore.inputs.sources import TensorSource
from modelstore.options import Option


class MergeMethod:
    """Base class: subclasses set `name`, `declared` and implement `merge`."""

    name: ClassVar[str]
    #: The method's options with their defaults and help (modelstore.merging.base.Option).
    declared: ClassVar[tuple[Option, ...]] = ()
    #: {option name: default}, derived from `declared`.
    option_defaults: ClassVar[dict[str, Any]] = {}
    #: Options holding per-task statistics (not recorded in the store, only their presence).
    data_options: ClassVar[tuple[str, ...]] = ()
    #: Whether merging a block of rows gives those rows of the merge (an element-wise method), so a
    #: build can merge a large tensor block by block instead of holding every task's whole copy.
    rowwise: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.option_defaults = {o.name: o.default for o in cls.declared}

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.option_defaults) - set(self.data_options)
        if unknown:
            known = ", ".join(sorted([*self.option_defaults, *self.data_options])) or "none"
            raise InputError(f"merge method {self.name!r} has no option {', '.join(sorted(unknown))}; "
                             f"its options: {known}")
        self.options = {**self.option_defaults, **{k: v for k, v in options.items() if k in self.option_defaults}}
        self.data = {k: options.get(k) for k in self.data_options}
        self.validate()

    def validate(self) -> None:
        """Check options; raise InputError with a one-line message."""

    def check_number(self, key: str, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False) -> None:
        """Option `key` must be a finite number in [low, high] (or (low, high] with `low_open`)."""
        v = self.options[key]
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (v > low if low_open else v >= low) and v <= high)
        if not ok:
            where = "a finite number" if math.isinf(low) and math.isinf(high) else \
                f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if math.isinf(high) else ']'}"
            raise InputError(f"merge option {key} of {self.name!r} must be {where}, got {v!r}")

    def check_choices(self) -> None:
        """Every option declared with choices must hold one of them."""
        for o in self.declared:
            if o.choices and self.options[o.name] not in o.choices:
                raise InputError(f"merge option {o.name} of {self.name!r} must be one of {', '.join(o.choices)}, "
                                 f"got {self.options[o.name]!r}")

    def parameters(self) -> dict[str, Any]:
        """The options that define the merge, recorded in the store."""
        return {"method": self.name, **self.options}

    def prepare(self, pretrained: TensorSource, tasks: Sequence[TensorSource], names: Sequence[str]) -> None:
        """Optional whole-model pass before `merge` is called for each of `names`."""

    def merge(self, name: str, base: torch.Tensor, tasks: Sequence[torch.Tensor]) -> torch.Tensor:
        """θ* for tensor `name` from θ0 (`base`) and the task tensors, all float32, same shape."""
        raise NotImplementedError
