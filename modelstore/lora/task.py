"""LoRA tasks in a store: write rank-q factors of a PEFT adapter, read them back.

A LoRA task sits on the pre-trained base θ0 (merging first would raise the rank of
θt − θ*, PERU paper section 3.2). Per adapted module the store keeps U·diag(S)·Vᵀ as
one segment [U (d_out×q) | S (q) | V (d_in×q)] of a flat float32 array; modules_to_save
tensors are stored whole (spec/FORMAT.md, "LoRA tasks").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from .. import dtypes
from ..layout import FlatWriter, array_nbytes, close_all
from ..progress import bar
from ..store import Store, StoredBase, table_digest
from ..writer import StoreWriter
from .adapter import read_adapter, resolve_names
from .svd import LowRank, compress_adapter

FACTORS = "factors.float32"


@dataclass(frozen=True)
class StoredAdapter:
    """A LoRA task unmerged: low-rank updates keyed by base tensor name, and whole tensors."""

    updates: dict[str, LowRank]
    tensors: dict[str, torch.Tensor]
    peft_names: dict[str, str]  # base tensor name -> PEFT module path or tensor name
    config: dict


def _adapter_bytes(path: str) -> int:
    for f in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(path, f)):
            return os.path.getsize(os.path.join(path, f))
    return 0


def write_lora_task(w: StoreWriter, name: str, adapter_dir: str, base: StoredBase, *, rank: int | None,
                    energy: float | None, source_info: dict[str, Any], overwrite: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Truncate every module of the adapter at `adapter_dir` to rank q, write and commit task `name`."""
    w.check_new_task(name, overwrite)
    adapter = read_adapter(adapter_dir)
    adapter = resolve_names(adapter, base.names(), {n: base.shape(n) for n in base.names()})
    lows = compress_adapter(adapter, rank=rank, energy=energy)
    rel, g = w.new_group(f"tasks/{name}")
    capacity = sum(low.rank * (low.U.shape[0] + low.V.shape[0] + 1) for low in lows.values())
    fw = FlatWriter(g, FACTORS, "float32", capacity)
    dense_cap: dict[str, int] = {}
    for s in adapter.saved.values():
        d = dtypes.dtype_name(s.tensor.dtype)
        dense_cap[d] = dense_cap.get(d, 0) + s.tensor.numel()
    dense_w = {d: FlatWriter(g, f"dense.{d}", dtypes.storage_dtype(d), c) for d, c in dense_cap.items()}
    table, stored, original, worst = [], 0, 0, 0.0
    for key in bar(sorted(lows), f"task {name}", progress):
        low, mod = lows[key], adapter.modules[key]
        original += mod.r * (mod.B.shape[0] + mod.A.shape[1])
        worst = max(worst, low.rel_error)
        parts = [low.U.float().reshape(-1), low.S.float(), low.V.float().reshape(-1)]
        start = fw.append(torch.cat(parts).numpy())
        count = sum(p.numel() for p in parts)
        stored += count
        table.append({"name": mod.target, "kind": "lowrank", "module": key, "layout": low.layout,
                      "shape": list(base.shape(mod.target)), "dtype": dtypes.dtype_name(base.dtype(mod.target)),
                      "array": FACTORS, "start": start, "count": count, "rank": low.rank, "r": mod.r,
                      "d_out": low.U.shape[0], "d_in": low.V.shape[0], "rel_error": low.rel_error,
                      "dropped": [float(x) for x in low.dropped]})
    for key in sorted(adapter.saved):
        s = adapter.saved[key]
        d = dtypes.dtype_name(s.tensor.dtype)
        start = dense_w[d].append(dtypes.to_numpy(s.tensor))
        table.append({"name": s.target, "kind": "dense", "peft_name": key, "array": f"dense.{d}",
                      "shape": list(s.tensor.shape), "dtype": d, "start": start, "count": s.tensor.numel()})
        stored += s.tensor.numel()
        original += s.tensor.numel()
    arrays = close_all([fw, *dense_w.values()])
    g.attrs["tensors"] = table
    ranks = [e["rank"] for e in table if e["kind"] == "lowrank"]
    entry = {
        "path": rel, "kind": "lora", "base": "pretrained", "method": "peru-lora",
        "params": {"rank": rank, "energy": energy, "factor_dtype": "float32",
                   "q_min": min(ranks, default=0), "q_max": max(ranks, default=0),
                   "r_max": max((e["r"] for e in table if e["kind"] == "lowrank"), default=0),
                   "max_rel_error": worst},
        "adapter_config": adapter.config, "source": source_info, "kept": stored, "total": original,
        "tensors": len(table), "dense_tensors": len(adapter.saved), "bytes": array_nbytes(g),
        "full_bytes": _adapter_bytes(adapter_dir), "table_sha256": table_digest(table), "arrays": arrays,
    }
    w.commit_task(name, entry)
    return entry


def read_adapter_task(store: Store, task: str, device: torch.device) -> StoredAdapter:
    """The stored factors of LoRA task `task` on `device` (no dense product is formed)."""
    e = store.entry(task)
    flats = store.read_payload(e, f"task {task!r}", device)
    updates, tensors, peft = {}, {}, {}
    for t in flats.table:
        flat = flats.get(t["array"])
        seg = flat[t["start"]:t["start"] + t["count"]] if flat is not None else None
        if t["kind"] == "lowrank":
            q, do, di = t["rank"], t["d_out"], t["d_in"]
            U = seg[:do * q].view(do, q) if q else torch.zeros(do, 0, device=device)
            S = seg[do * q:do * q + q] if q else torch.zeros(0, device=device)
            V = seg[do * q + q:].view(di, q) if q else torch.zeros(di, 0, device=device)
            updates[t["name"]] = LowRank(U=U, S=S, V=V, dropped=torch.tensor(t["dropped"]), layout=t["layout"])
            peft[t["name"]] = t["module"]
        else:
            v = seg.view(torch.bfloat16) if t["dtype"] == "bfloat16" else seg
            tensors[t["name"]] = v.view(t["shape"])
            peft[t["name"]] = t["peft_name"]
    return StoredAdapter(updates=updates, tensors=tensors, peft_names=peft, config=e.get("adapter_config", {}))


def materialize_lora(store: Store, task: str, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """θ0 + U·diag(S)·Vᵀ for every adapted weight, saved tensors replacing theirs, on `device`."""
    a = read_adapter_task(store, task, device)
    base = store.base("pretrained", device)
    out = {}
    for n, b in base.items():
        if n in a.tensors:
            continue  # a saved tensor replaces it below
        low = a.updates.get(n)
        merged = b if low is None else b.to(torch.float32) + low.dense(device, torch.float32)
        out[n] = merged.to(dtypes.output_dtype(b.dtype, dtype), copy=low is None)
    for n, t in a.tensors.items():
        out[n] = t.to(dtypes.output_dtype(t.dtype, dtype), copy=True)
    return out


def check_rank_energy(rank: int | None, energy: float | None) -> tuple[int | None, float | None]:
    """Default to rank 16 when neither is given; both is an error."""
    from .adapter import LoraError
    if rank is not None and energy is not None:
        raise LoraError("give --rank or --energy, not both")
    if rank is None and energy is None:
        return 16, None
    if energy is not None and (math.isnan(energy) or not 0.0 < energy <= 1.0):
        raise LoraError(f"--energy must be a fraction in (0, 1], got {energy!r}")
    return rank, energy


__all__ = ["StoredAdapter", "write_lora_task", "read_adapter_task", "materialize_lora", "check_rank_energy"]
