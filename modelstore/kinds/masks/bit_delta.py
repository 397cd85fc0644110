"""Task kind `bitdelta`: BitDelta (Liu et al., 2024) before its distillation step. Each weight
matrix keeps sign(θt − θ_base) as one bit per entry and one scale, the mean |θt − θ_base|:
θt ≈ θ_base + scale·sign. Works on either base (θ0, or a merged θ*); tensors that are not
matrices (biases, norms) are stored whole, as they are a tiny share of the bytes (spec section 10).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from modelstore.format.manifest import TableEntry, TaskEntry
from modelstore.kinds.base import BaseTensors
from modelstore.kinds.masks.bit_masks import BitMaskKind, base_name


class BitDelta(BitMaskKind):
    """Per matrix: sign bits of the delta (1 where θt − θ_base ≥ 0) and the mean |delta| as scale."""

    name = "bitdelta"
    title = "a BitDelta task"

    def base_id(self, bases: Collection[str], requested: str | None) -> str:
        """The merged base if the store has one, else θ0; `requested` picks one explicitly."""
        return requested or ("merged" if "merged" in bases else "pretrained")

    def make_options(self, given: dict[str, Any]) -> None:
        return None

    def masked(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2

    def start(self, options: None) -> dict[str, Any]:
        return {"l1": 0.0, "n": 0}

    def bits(self, rows: list[torch.Tensor], options: None, state: dict[str, Any]) -> torch.Tensor:
        d = rows[0] - rows[1]
        state["l1"] += float(d.abs().sum(dtype=torch.float64))
        state["n"] += d.numel()
        return d >= 0

    def end_tensor(self, state: dict[str, Any]) -> dict[str, Any]:
        """The tensor's scale: mean |θt − θ_base| (sum in float64) rounded to float32."""
        scale = float(np.float32(state["l1"] / state["n"])) if state["n"] else 0.0
        state.update(l1=0.0, n=0)
        return {"scale": scale}

    def check_entry(self, entry: TaskEntry) -> str | None:
        return None if entry.get("bases", [entry.get("base")]) == [entry.get("base")] else \
            "a bitdelta task reads its own base only"

    def check_table(self, table: list[TableEntry], entry: TaskEntry) -> str | None:
        bad = next((t["name"] for t in table if t["kind"] == "bits" and not (
            isinstance(t.get("scale"), (int, float)) and math.isfinite(t["scale"]))), None)
        return super().check_table(table, entry) if bad is None else f"entry {bad!r} has no finite scale"

    def rebuild(self, bits: torch.Tensor, base: BaseTensors, t: TableEntry, params: dict[str, Any]) -> torch.Tensor:
        """float32(θ_base) + (scale where the bit is set, else −scale), in float32."""
        s = torch.tensor(float(t.get("scale", 0.0)), dtype=torch.float32)
        b = base.fresh(base_name(t)).reshape(-1).to(torch.float32)
        return b + torch.where(bits, s, -s)


__all__ = ["BitDelta"]
