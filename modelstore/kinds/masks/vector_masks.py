"""Task kinds `tall-mask` and `emr`: a task as a 1-bit mask over the merged vector τ = θ* − θ0, so
each task costs one bit per merged entry on top of the shared θ* and θ0 (spec/FORMAT.md, section 10).

- TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging and
  Compression"): m_t = 1{|τ_t| ≥ λ_t·|τ − τ_t|}, θ_t = θ0 + m_t ⊙ τ, τ_t = θt − θ0.
- EMR-Merging (Huang et al., NeurIPS 2024): θ* is the EMR election θ0 + τ_uni (merge method `emr`),
  M_t = 1{τ_t ⊙ τ_uni > 0}, one rescaler per task λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|, and
  θ_t = θ0 + λ_t·M_t ⊙ τ_uni.

τ is taken from the bases as stored, float32(θ*) − float32(θ0), by the writer and the reader alike.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelstore.errors import InputError
from modelstore.format.manifest import TableEntry, TaskEntry
from modelstore.inputs.sources import TensorSource
from modelstore.kinds.base import BaseTensors
from modelstore.kinds.masks.bit_masks import BitMaskKind, base_name
from modelstore.options import Option


class _MergedVectorMask(BitMaskKind):
    """A mask over τ = θ* − θ0: reads the merged base θ* and the pretrained θ0."""

    extra_bases = ("pretrained",)

    def base_id(self, bases: Collection[str], requested: str | None) -> str:
        """Always the merged base θ* (the mask selects entries of θ* − θ0)."""
        if requested not in (None, "merged") or "merged" not in bases:
            raise InputError(f"{self.title} sits on a merged base θ* (it masks θ* − θ0); build the store with a "
                             "merge method, not --merge none, and leave --base out")
        return "merged"

    def check_entry(self, entry: TaskEntry) -> str | None:
        if entry.get("base") != "merged" or entry.get("bases") != ["merged", "pretrained"]:
            return f"a {self.name} task must read the merged and the pretrained bases"
        return None

    def check_param(self, entry: TaskEntry, key: str, what: str) -> str | None:
        """What is wrong with the entry: its bases, or params[`key`] not a finite number >= 0."""
        v = entry["params"].get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return f"{what} {v!r} is not a finite number >= 0"
        return _MergedVectorMask.check_entry(self, entry)

    def sources(self, base: Any) -> list[TensorSource]:
        return [base.other("pretrained"), base]

    def taus(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(τ_t, τ) of a row block: θt − θ0 and θ* − θ0 in float32."""
        task, b0, merged = rows
        return task - b0, merged - b0


@dataclass(frozen=True)
class TallOptions:
    """λ_t of the TALL mask m_t = 1{|τ_t| ≥ λ_t·|τ − τ_t|}."""

    tall_lambda: float = 0.6

    def validate(self) -> None:
        """Raise InputError when λ_t is not a finite number ≥ 0."""
        v = self.tall_lambda
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise InputError(f"--tall-lambda must be a finite number >= 0, got {v!r} (the paper uses 0.2-0.6)")


class TallMask(_MergedVectorMask):
    """TALL masks: the entries of τ = θ* − θ0 where task t's own vector dominates."""

    name = "tall-mask"
    title = "a TALL-masked task"
    # TALL masks τ_MTL = Σt τt (λ = 1); task arithmetic's λ = 0.3 scored 5-6 points lower on the
    # MiniLM tasks of tools/ (docs/results/frontier measures λ = 1).
    merge_defaults = {"task-arithmetic": {"lam": 1.0}}
    declared = (Option("tall_lambda", 0.6, "tall-mask: λ_t of m_t = 1{|τ_t| >= λ_t·|τ_MTL − τ_t|} "
                       "(FusionBench's default 0.6; larger keeps fewer entries of τ_MTL)"),)

    def make_options(self, given: dict[str, Any]) -> TallOptions:
        opts = TallOptions(**given)
        opts.validate()
        return opts

    def check_entry(self, entry: TaskEntry) -> str | None:
        return self.check_param(entry, "tall_lambda", "TALL λ")

    def bits(self, rows: list[torch.Tensor], options: TallOptions, state: dict[str, Any]) -> torch.Tensor:
        tau_t, tau = self.taus(rows)
        return tau_t.abs() >= torch.tensor(options.tall_lambda, dtype=torch.float32) * (tau - tau_t).abs()

    def params(self, options: TallOptions, state: dict[str, Any]) -> dict[str, Any]:
        return {"tall_lambda": options.tall_lambda}

    def rebuild(self, bits: torch.Tensor, base: BaseTensors, t: TableEntry, params: dict[str, Any]) -> torch.Tensor:
        """θ* where the bit is set, θ0 elsewhere: θ0 + m ⊙ (θ* − θ0) without a rounding."""
        merged = base.fresh(base_name(t)).reshape(-1)
        return torch.where(bits, merged, base.other("pretrained").fresh(base_name(t)).reshape(-1))

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        return {"bits": 1, "lambda": entry["params"]["tall_lambda"]}


class EMRMask(_MergedVectorMask):
    """EMR-Merging's per-task modulator: a sign-agreement mask and one rescaler over τ_uni."""

    name = "emr"
    title = "an EMR-masked task"
    default_merge = "emr"

    def make_options(self, given: dict[str, Any]) -> None:
        return None

    def check_entry(self, entry: TaskEntry) -> str | None:
        return self.check_param(entry, "scale", "EMR rescaler")

    def start(self, options: None) -> dict[str, Any]:
        return {"task_l1": 0.0, "masked_l1": 0.0}

    def bits(self, rows: list[torch.Tensor], options: None, state: dict[str, Any]) -> torch.Tensor:
        tau_t, tau = self.taus(rows)
        m = tau_t * tau > 0
        state["task_l1"] += float(tau_t.abs().sum(dtype=torch.float64))
        state["masked_l1"] += float(torch.where(m, tau, 0).abs().sum(dtype=torch.float64))
        return m

    def params(self, options: None, state: dict[str, Any]) -> dict[str, Any]:
        """λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni| over every masked entry (sums in float64), rounded to float32;
        1 when the mask is empty."""
        ratio = state["task_l1"] / state["masked_l1"] if state["masked_l1"] else 1.0
        return {"scale": float(np.float32(ratio))}

    def rebuild(self, bits: torch.Tensor, base: BaseTensors, t: TableEntry, params: dict[str, Any]) -> torch.Tensor:
        """float32(θ0) + float32(λ_t)·(float32(θ*) − float32(θ0)) where the bit is set, θ0 elsewhere."""
        b0 = base.other("pretrained").fresh(base_name(t)).reshape(-1).to(torch.float32)
        tau = base.fresh(base_name(t)).reshape(-1).to(torch.float32) - b0
        return torch.where(bits, b0 + tau * torch.tensor(params["scale"], dtype=torch.float32), b0)

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        return {"bits": 1, "scale": round(entry["params"]["scale"], 4)}


__all__ = ["TallMask", "TallOptions", "EMRMask"]
