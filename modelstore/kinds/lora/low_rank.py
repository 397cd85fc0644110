"""Task kind `lora`: a PEFT LoRA adapter as rank-q SVD factors of each update (PERU-LoRA).

A LoRA task sits on the pre-trained base θ0 (merging first would raise the rank of
θt − θ*, PERU paper section 3.2). Per adapted module the store keeps U·diag(S)·Vᵀ as
one segment [U (d_out×q) | S (q) | V (d_in×q)] of a flat float32 array; modules_to_save
tensors are stored whole (spec/FORMAT.md, "LoRA tasks").
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from modelstore._runtime.progress import bar
from modelstore._runtime.units import human_bytes, percent
from modelstore.format import dtypes
from modelstore.format.manifest import BaseEntry, TableEntry, TaskEntry
from modelstore.format.payload import PayloadWriter, Segments
from modelstore.inputs.architectures import checkpoint_renaming_of
from modelstore.inputs.hub import resolve_input
from modelstore.inputs.sources import TensorSource
from modelstore.kinds.base import BaseTensors, Edit, Replace, TaskKind
from modelstore.kinds.lora import (
    LoraAdapter,
    LoraError,
    LowRank,
    compress_adapter,
    read_adapter,
    resolve_names,
    write_peft_adapter,
)
from modelstore.kinds.lora.adapter import Layout, adapted_config

FACTORS = "factors.float32"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class LoraEntry(TableEntry, total=False):
    """The table fields of a LoRA task: a `lowrank` entry's factors, a `dense` entry's PEFT name."""

    module: str  # the PEFT module path
    layout: Layout
    rank: int  # q, the stored rank
    r: int  # the adapter's rank
    d_out: int
    d_in: int
    rel_error: float
    dropped: list[float]
    peft_name: str


@dataclass(frozen=True)
class StoredAdapter:
    """A LoRA task unmerged: low-rank updates keyed by base tensor name, and whole tensors."""

    updates: dict[str, LowRank]
    tensors: dict[str, torch.Tensor]
    peft_names: dict[str, str]  # base tensor name -> PEFT module path or tensor name
    config: dict


@dataclass(frozen=True)
class LoraOptions:
    """How q is chosen per module: a fixed `rank`, or the smallest q keeping `energy` of the norm."""

    rank: int | None = None
    energy: float | None = None

    def resolved(self) -> LoraOptions:
        """These options with the default (rank 16) applied.

        Raises:
            LoraError: both given, or energy outside (0, 1].
        """
        if self.rank is not None and self.energy is not None:
            raise LoraError("give --rank or --energy, not both")
        if self.rank is None and self.energy is None:
            return LoraOptions(rank=16)
        if self.energy is not None and (math.isnan(self.energy) or not 0.0 < self.energy <= 1.0):
            raise LoraError(f"--energy must be a fraction in (0, 1], got {self.energy!r}")
        return self


@dataclass(frozen=True)
class AdapterInput:
    """A PEFT adapter directory, parsed (and so validated) before anything is written."""

    path: str
    adapter: LoraAdapter
    #: the config.json of the model the adapter makes where it is not θ0's (a classifier's head
    #: over a bare θ0: `with_model_config`), kept with the task as a fine-tune's is
    config_json: str | None = None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> AdapterInput:
        path = resolve_input(path)
        return cls(path, read_adapter(path))

    def resolved(self, base: TensorSource, base_config_json: str | None) -> LoraAdapter:
        """The adapter with its targets named as `base`'s tensors (resolve_names, through
        transformers' renaming of the model `base_config_json` describes).

        Raises:
            LoraError: a target matches no base tensor, or an update another shape than its weight.
        """
        return resolve_names(self.adapter, base.names(), {n: base.shape(n) for n in base.names()},
                             checkpoint_renaming_of(base_config_json))

    def with_model_config(self, base_config_json: str | None) -> AdapterInput:
        """This input with the config.json of the model it makes of θ0 (whose config.json is
        `base_config_json`), where that is not θ0's own (adapted_config)."""
        own = adapted_config(base_config_json, self.adapter)
        return self if own == base_config_json else replace(self, config_json=own)

    def source_info(self) -> dict[str, str]:
        """Path and sha256 of the adapter's files, recorded in the task entry."""
        h = hashlib.sha256()
        for f in _ADAPTER_FILES:
            full = os.path.join(self.path, f)
            if os.path.isfile(full):
                with open(full, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
        return {"path": os.path.abspath(self.path), "fingerprint": "sha256:" + h.hexdigest()}

    def nbytes(self) -> int:
        """Bytes of the adapter's weight file: what the stored task is compared with."""
        for f in _ADAPTER_FILES[1:]:
            if os.path.isfile(os.path.join(self.path, f)):
                return os.path.getsize(os.path.join(self.path, f))
        return 0


@dataclass(frozen=True)
class AddLowRank(Edit):
    """An adapted weight: float32(B) + U·diag(S)·Vᵀ (in the weight's layout), formed on `device`."""

    update: LowRank
    device: torch.device

    def new(self, base: torch.Tensor | None) -> torch.Tensor:
        assert base is not None
        return base.to(torch.float32) + self.update.dense(self.device, torch.float32)


class LowRankAdapter(TaskKind):
    """PERU-LoRA: the best rank-q approximation of each LoRA update, on θ0."""

    name = "lora"
    title = "a LoRA task"
    kept_label = "numbers stored (original adapter)"
    original_label = "the adapter"
    has_unmerged = True
    from_checkpoint = False
    export_formats = {"peft": "a rank-q PEFT adapter (adapter_config.json + adapter_model.safetensors)"}
    entry_kinds = ("lowrank", "dense")
    base_in_table_order = False  # the base is walked in its own order, the updates looked up by name

    def check_table(self, table: list[TableEntry], entry: TaskEntry) -> str | None:
        bad = next((t["name"] for t in table if t["kind"] == "lowrank" and t["array"] != FACTORS
                    or t["kind"] == "dense" and not isinstance(t.get("peft_name"), str)), None)
        return None if bad is None else f"entry {bad!r} names no adapter tensor or lies outside {FACTORS}"

    def check_entry(self, entry: TaskEntry) -> str | None:
        if entry["params"].get("factor_dtype") != "float32" or entry.get("base") != "pretrained":
            return "LoRA factors must be float32 on the pretrained base"
        return None

    def base_id(self, bases: Collection[str], requested: str | None) -> str:
        """Always θ0: LoRA updates are relative to the pre-trained model."""
        return "pretrained"

    def write(self, out: PayloadWriter, task: str, source: AdapterInput, base: TensorSource, base_entry: BaseEntry,
              options: LoraOptions, progress: bool) -> dict[str, Any]:
        opts = options.resolved()
        adapter = source.resolved(base, base_entry.get("config_json"))
        lows = compress_adapter(adapter, rank=opts.rank, energy=opts.energy)
        fw = out.declare(FACTORS, "float32", sum(low.rank * (low.U.shape[0] + low.V.shape[0] + 1)
                                                 for low in lows.values()))
        out.declare_dense("dense", ((tuple(s.tensor.shape), s.tensor.dtype) for s in adapter.saved.values()))
        stored, original, worst = 0, 0, 0.0
        lowrank: list[LoraEntry] = []
        for key in bar(sorted(lows), f"task {task}", progress):
            low, mod = lows[key], adapter.modules[key]
            original += mod.r * (mod.B.shape[0] + mod.A.shape[1])
            worst = max(worst, low.rel_error)
            parts = [low.U.float().reshape(-1), low.S.float(), low.V.float().reshape(-1)]
            start = fw.append(torch.cat(parts).numpy())
            count = sum(p.numel() for p in parts)
            stored += count
            lowrank.append(LoraEntry(
                name=mod.target, kind="lowrank", module=key, layout=low.layout, shape=list(base.shape(mod.target)),
                dtype=dtypes.dtype_name(base.dtype(mod.target)), array=FACTORS, start=start, count=count,
                rank=low.rank, r=mod.r, d_out=low.U.shape[0], d_in=low.V.shape[0], rel_error=low.rel_error,
                dropped=[float(x) for x in low.dropped]))
            out.add(lowrank[-1])
        for key in sorted(adapter.saved):
            s = adapter.saved[key]
            out.add_dense(s.target, s.tensor, "dense", peft_name=key)
            stored += s.tensor.numel()
            original += s.tensor.numel()
        ranks = [e["rank"] for e in lowrank]
        return {
            "method": "peru-lora",
            "params": {"rank": opts.rank, "energy": opts.energy, "factor_dtype": "float32",
                       "q_min": min(ranks, default=0), "q_max": max(ranks, default=0),
                       "r_max": max((e["r"] for e in lowrank), default=0), "max_rel_error": worst},
            "adapter_config": adapter.config, "kept": stored, "total": original,
            "dense_tensors": len(adapter.saved), "full_bytes": source.nbytes(),
        }

    def unmerged(self, segments: Segments, table: list[TableEntry], entry: TaskEntry,
                 device: torch.device) -> StoredAdapter:
        """The stored factors on `device` (no dense product is formed)."""
        updates, tensors, peft = {}, {}, {}
        for entry_ in table:
            t = cast(LoraEntry, entry_)  # check_table passed: a LoRA task's table holds LoraEntry fields
            if t["kind"] != "lowrank":
                tensors[t["name"]] = segments.get(t["array"], t["start"], t["count"], t["dtype"]).view(t["shape"])
                peft[t["name"]] = t["peft_name"]
                continue
            q, do, di = t["rank"], t["d_out"], t["d_in"]
            seg = segments.get(t["array"], t["start"], t["count"], "float32")
            U, S, V = seg[:do * q].view(do, q), seg[do * q:do * q + q], seg[do * q + q:].view(di, q)
            updates[t["name"]] = LowRank(U=U, S=S, V=V, dropped=torch.tensor(t["dropped"]), layout=t["layout"])
            peft[t["name"]] = t["module"]
        return StoredAdapter(updates=updates, tensors=tensors, peft_names=peft, config=entry.get("adapter_config", {}))

    def output_names(self, table: list[TableEntry], base_names: list[str]) -> list[str]:
        """Every base tensor, and the saved tensors the base lacks (a new head)."""
        return list(dict.fromkeys([*base_names, *(t["name"] for t in table if t["kind"] != "lowrank")]))

    describes_edits = True

    def edits(self, segments: Segments, table: list[TableEntry], entry: TaskEntry,
              device: torch.device) -> Iterator[Edit]:
        """Each adapted weight whole (θ0 + its low-rank update), and each saved tensor whole."""
        a = self.unmerged(segments, table, entry, device)
        for t in table:
            name, shape, dtype = t["name"], tuple(t["shape"]), dtypes.torch_dtype(t["dtype"])
            if t["kind"] == "lowrank":
                yield AddLowRank(name, shape, dtype, None, a.updates[name], device)
            else:
                yield Replace(name, shape, dtype, None, a.tensors[name])

    def tensors(self, segments: Segments, table: list[TableEntry], base: BaseTensors, entry: TaskEntry,
                device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """θ0 + U·diag(S)·Vᵀ for every adapted weight, saved tensors replacing theirs, on `device`."""
        edits = {e.name: e for e in self.edits(segments, table, entry, device)}
        for n in base.names():
            e = edits.get(n)
            if e is not None and not e.uses_base:
                continue  # a saved tensor replaces it below
            b = base.fresh(n)
            yield n, b.to(dtypes.output_dtype(b.dtype, dtype)) if e is None else e.applied(b, dtype)
        for e in edits.values():
            if not e.uses_base:
                yield e.name, e.applied(None, dtype)

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        p = entry["params"]
        return {"q": p["q_max"] if p["q_min"] == p["q_max"] else f"{p['q_min']}-{p['q_max']}"}

    def describe(self, info: Mapping[str, Any]) -> str:
        p = info["params"]
        return (f"LoRA q {p['q_min']}..{p['q_max']} (adapter r {p['r_max']}), {human_bytes(info['bytes'])} "
                f"({percent(info['ratio'])} of the adapter), max relative error {p['max_rel_error']:.3g}")

    def export(self, fmt: str, unmerged: StoredAdapter, out: str) -> list[str]:
        a = unmerged
        write_peft_adapter(out, {}, {a.peft_names[n]: low for n, low in a.updates.items()},
                           {a.peft_names[n]: t for n, t in a.tensors.items()}, original_config=a.config)
        return ["adapter_config.json", "adapter_model.safetensors"]


__all__ = ["LowRankAdapter", "LoraOptions", "AdapterInput", "StoredAdapter", "FACTORS"]
