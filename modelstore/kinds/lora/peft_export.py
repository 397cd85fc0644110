"""Write rank-q updates back out as a PEFT LoRA adapter, so stored tasks stay usable with PeftModel.

Each module gets lora_B = U*sqrt(S) and lora_A = sqrt(S)*V^T with lora_alpha = r (scale 1), so
PEFT's merge gives exactly theta0 + U diag(S) V^T. Modules whose q differs from the most common
one get rank_pattern/alpha_pattern entries keyed by their escaped full module path.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file

from modelstore.kinds.lora.adapter import (
    CONFIG_NAME,
    PEFT_PREFIX,
    SAFETENSORS_NAME,
    LoraError,
    modules_to_save_owner,
)
from modelstore.kinds.lora.svd import LowRank

# Fields of the user's original adapter_config.json that stay meaningful after re-factoring.
CARRIED_FIELDS = ("base_model_name_or_path", "revision", "task_type", "auto_mapping", "lora_dropout")


def write_peft_adapter(
    out_dir: str | os.PathLike[str],
    base_config: Mapping[str, object],
    modules: Mapping[str, LowRank],
    modules_to_save: Mapping[str, torch.Tensor],
    *,
    original_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `out_dir`.

    `modules` is keyed by PEFT module path (LoraModule.name), `modules_to_save` by PEFT tensor name
    (SavedTensor.name). `base_config` holds config fields to set, such as base_model_name_or_path;
    they override the fields carried over from `original_config` but may not touch the LoRA math.
    Modules truncated to rank 0 (a zero update) are left out.
    """
    kept = {name: low for name, low in modules.items() if low.rank > 0}
    if not kept:
        raise LoraError("every LoRA update has rank 0; there is no adapter to export")
    computed = _lora_fields(kept, modules_to_save, original_config)
    clash = sorted(k for k in base_config if k in computed and base_config[k] != computed[k])
    if clash:
        raise LoraError(f"base_config may not set {clash}: they are computed from the stored low-rank updates")
    carried = {k: original_config[k] for k in CARRIED_FIELDS if original_config and k in original_config}
    config = {**carried, **base_config, **computed}

    tensors = {}
    for name, low in kept.items():
        root = low.S.sqrt()
        lora_A = (root[:, None] * low.V.T).to(dtype).contiguous()  # [q, d_in]
        lora_B = (low.U * root).to(dtype).contiguous()  # [d_out, q]
        if low.layout == "embedding":
            keys = (f"{name}.lora_embedding_A", f"{name}.lora_embedding_B")
        else:
            keys = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
        tensors[PEFT_PREFIX + keys[0]] = lora_A
        tensors[PEFT_PREFIX + keys[1]] = lora_B
    for name, tensor in modules_to_save.items():
        tensors[PEFT_PREFIX + name] = tensor.contiguous()

    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _lora_fields(
    kept: Mapping[str, LowRank],
    modules_to_save: Mapping[str, torch.Tensor],
    original_config: Mapping[str, Any] | None,
) -> dict[str, object]:
    """Config fields that make PEFT rebuild exactly these ranks with scale 1."""
    ranks = {name: low.rank for name, low in kept.items()}
    r = max(Counter(ranks.values()).items(), key=lambda item: (item[1], item[0]))[0]
    pattern = {re.escape(name): q for name, q in sorted(ranks.items()) if q != r}
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "target_modules": sorted(ranks),
        "fan_in_fan_out": any(low.layout == "fan_in_fan_out" for low in kept.values()),
        "modules_to_save": _save_list(modules_to_save, original_config),
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _save_list(
    modules_to_save: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None
) -> list[str] | None:
    """The original modules_to_save list (PEFT then wraps the same modules), else each tensor's parent module."""
    if not modules_to_save:
        return None
    original = list((original_config or {}).get("modules_to_save") or [])
    if not original:
        return sorted({name.rpartition(".")[0] for name in modules_to_save})
    uncovered = sorted(name for name in modules_to_save if modules_to_save_owner(name, original) is None)
    if uncovered:
        raise LoraError(f"tensors {uncovered} are not covered by the original modules_to_save {original}")
    return original
