"""Read PEFT LoRA adapters into plain tensors, with the scale and layout of every update resolved.

A PEFT LoRA adapter changes a base weight W (named `<module>.weight` in the base checkpoint) to
W + s*(B@A) for nn.Linear, W + (s*(B@A))^T for GPT-2 Conv1D (fan_in_fan_out) and nn.Embedding,
and replaces the `modules_to_save` tensors outright. Options that break this form are refused
with a LoraError, because storing them as a low-rank update would silently give a wrong model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from safetensors.torch import load_file

from modelstore.errors import InputError
from modelstore.inputs.hub import resolve_input
from modelstore.inputs.naming import NameMatcher

Layout = Literal["linear", "fan_in_fan_out", "embedding"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# init_lora_weights values after which the adapter is relative to a base PEFT modified in place.
_MUTATED_BASE_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "astra")
# Config fields that make the merged weight differ from W + s*B@A (or make merging impossible).
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA rescales the merged weight by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "layer_replication": "layer_replication duplicates base layers",
    "target_parameters": "LoRA on raw nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "trainable_token_indices stores sparse embedding rows",
    "megatron_config": "Megatron parallel layers store sharded LoRA weights",
    "use_qalora": "QALoRA applies lora_A to pooled inputs",
    "alora_invocation_tokens": "Activated LoRA (aLoRA) cannot be merged into the weights",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant samples its LoRA weights",
    "use_bdlora": "BD-LoRA stores block-diagonal factors",
    "arrow_config": "Arrow routes between several LoRA experts",
    "kasa_config": "KaSA inserts a learned diagonal between lora_A and lora_B and truncates the base",
    "ensure_weight_tying": "it ties saved copies across tied weights, which the stored copies do not follow",
}
# Fields read to rebuild the weights, and fields that carry no weight information (training,
# provenance, initialisation schemes that init_lora_weights names). Together with the unsupported
# ones above they are every field of PEFT 0.22's LoraConfig; a field outside all three is refused
# when set, since a newer PEFT may have added it to change the adapter's weights.
_USED_FIELDS = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern",
                          "alpha_pattern", "modules_to_save", "target_modules", "init_lora_weights", "bias"})
_INERT_FIELDS = frozenset({"auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
                           "lora_dropout", "peft_version", "exclude_modules", "layers_pattern", "layers_to_transform",
                           "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
                           "lora_ga_config", "astra_config"})
_LORA_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


class LoraError(InputError):
    """A LoRA adapter modelstore cannot represent exactly; the message names the problem and the fix."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: update = scale * B @ A in PEFT's [out, in] convention, shown in `layout`.

    `name` is PEFT's module path (what target_modules/rank_pattern match), `target` the base
    checkpoint tensor the update is added to (`name + ".weight"` until resolve_names maps it).
    For "fan_in_fan_out" and "embedding" the base weight holds the transpose of the update.
    """

    name: str
    target: str
    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scale: float
    layout: Layout

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this update is added to."""
        d_out, d_in = self.B.shape[0], self.A.shape[1]
        return (d_out, d_in) if self.layout == "linear" else (d_in, d_out)

    def update(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """scale * B @ A in float64 on `device`, in the base weight's layout (what PEFT adds to it)."""
        u = self.scale * (self.B.to(device, torch.float64) @ self.A.to(device, torch.float64))
        return u if self.layout == "linear" else u.T


@dataclass(frozen=True)
class SavedTensor:
    """A full tensor from `modules_to_save`: it replaces (or adds) `target` in the task model."""

    name: str  # PEFT tensor path, e.g. "classifier.weight"
    module: str  # the module PEFT wrapped, e.g. "classifier"
    target: str
    tensor: torch.Tensor


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed adapter: its config, LoRA modules keyed by PEFT module path, saved tensors keyed by PEFT name."""

    config: dict
    modules: dict[str, LoraModule]
    saved: dict[str, SavedTensor]


def pattern_value(patterns: Mapping[str, float], key: str, default: float) -> float:
    """Value of the first pattern matching module path `key`, as PEFT's get_pattern_key matches it."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def read_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Parse the PEFT LoRA adapter directory `path` (or Hub id `org/name[@revision]`); raise
    LoraError for anything not exactly W + s*B@A."""
    path = resolve_input(path)
    config = _read_config(path)
    _check_config(config, path)
    tensors = _read_tensors(path)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    saved: dict[str, SavedTensor] = {}
    save_names = config.get("modules_to_save") or []
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise LoraError(f"{path}: tensor {key!r} does not start with {PEFT_PREFIX!r}; is this a PEFT LoRA adapter?")
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoraError(f"{path}: tensor {key!r} has NaN or Inf values; fix the adapter (or its training) "
                            "before storing it")
        name = key[len(PEFT_PREFIX) :]
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            which, is_embedding = _LORA_SUFFIXES[suffix]
            module = name[: -len(suffix)]
            factors.setdefault(module, {})[which] = tensor
            embedding[module] = is_embedding
            continue
        owner = modules_to_save_owner(name, save_names)
        if owner is None:
            raise LoraError(
                f"{path}: tensor {key!r} is neither a LoRA factor nor in modules_to_save {save_names}; "
                "only plain LoRA adapters are supported"
            )
        saved[name] = SavedTensor(name=name, module=owner, target=name, tensor=tensor)

    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules = {
        name: _module(config, name, pair, embedding[name], fan_in_fan_out, path) for name, pair in factors.items()
    }
    if not modules:
        raise LoraError(f"{path}: the adapter has no lora_A/lora_B tensors; nothing to store")
    return LoraAdapter(config=config, modules=modules, saved=saved)


def resolve_names(
    adapter: LoraAdapter,
    base_names: Iterable[str],
    shapes: Mapping[str, Sequence[int]] | None = None,
    renamed: Callable[[str], str] | None = None,
) -> LoraAdapter:
    """Point every target at a base-checkpoint tensor name, so an adapter trained on a task model
    (`bert.encoder...`) applies to a base saved from the bare model (`encoder...`) and vice versa.

    Tries the exact name, then the name with its first component stripped or with one component
    added; zero or several candidates raise LoraError. A target that matches none is tried against
    the base's names as `renamed` (transformers' renaming of the base's checkpoint names into its
    modules': PEFT names modules, `layers.0.attention.q_proj` where a transformers 5 ViT checkpoint
    says `encoder.layer.0.attention.attention.query`). Saved tensors the base lacks (a new
    classifier head) keep their PEFT name. With `shapes`, each update must match its base weight.
    """
    base_names = list(base_names)
    by_name = NameMatcher(base_names).candidates
    module_names = {renamed(n): n for n in base_names} if renamed is not None else {}
    by_module = NameMatcher([m for m, n in module_names.items() if m != n]).candidates

    def candidates(target: str) -> list[str]:
        return by_name(target) or [module_names[m] for m in by_module(target)]

    modules = {}
    for key, module in adapter.modules.items():
        found = candidates(module.target)
        if len(found) != 1:
            problem = "matches no base tensor" if not found else f"is ambiguous between {found}"
            raise LoraError(
                f"LoRA target {module.target!r} {problem}; the adapter must be made for this base model"
            )
        target = found[0]
        if shapes is not None and tuple(shapes[target]) != module.weight_shape:
            raise LoraError(
                f"LoRA update for {target!r} has shape {list(module.weight_shape)} (layout {module.layout}) but the "
                f"base tensor is {list(shapes[target])}; check fan_in_fan_out and that the adapter fits this base model"
            )
        modules[key] = replace(module, target=target)

    saved = {}
    for key, tensor in adapter.saved.items():
        found = candidates(tensor.target)
        if len(found) > 1:
            raise LoraError(f"modules_to_save tensor {tensor.target!r} is ambiguous between base tensors {found}")
        saved[key] = replace(tensor, target=found[0] if found else tensor.target)
    return replace(adapter, modules=modules, saved=saved)


#: The head each PEFT task_type puts on a model (transformers' class-name suffix).
_HEADS = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification",
          "QUESTION_ANS": "ForQuestionAnswering", "CAUSAL_LM": "ForCausalLM"}


def adapted_config(config_json: str | None, adapter: LoraAdapter) -> str | None:
    """θ0's config.json as the model a PEFT adapter makes of it: a bare model's architecture
    (`BertModel`) with the head the adapter's task_type names (`BertForSequenceClassification`),
    a classifier's labels counted as the rows of the smallest matrix the adapter saves whole (its
    last layer, in modules_to_save); θ0's own config where it names a head already."""
    head = _HEADS.get(str(adapter.config.get("task_type")))
    if not config_json or head is None:
        return config_json
    config = json.loads(config_json)
    arch = (config.get("architectures") or [""])[0]
    if not arch.endswith("Model") or arch.endswith("LMHeadModel"):
        return config_json
    config["architectures"] = [arch.removesuffix("Model") + head]
    rows = [s.tensor.shape[0] for s in adapter.saved.values() if s.tensor.dim() == 2]
    if head in ("ForSequenceClassification", "ForTokenClassification") and rows:
        config.pop("num_labels", None)
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(min(rows))}
        config["label2id"] = {f"LABEL_{i}": i for i in range(min(rows))}
    return json.dumps(config)


def _read_config(path: str | os.PathLike[str]) -> dict:
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise LoraError(f"{path} is not a directory; pass the PEFT adapter folder (with {CONFIG_NAME})")
    if not os.path.isfile(config_path):
        raise LoraError(f"{path} has no {CONFIG_NAME}; pass a folder written by PeftModel.save_pretrained")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise LoraError(f"{config_path} is not a JSON object")
    return config


def _check_config(config: dict, path: str | os.PathLike[str]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise LoraError(f"{path}: peft_type is {peft_type!r}; only LORA adapters can be stored as low-rank updates")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise LoraError(
                f"{path}: {field}={config[field]!r} is not supported ({what}); "
                "merge the adapter and add the task as a full checkpoint"
            )
    known = _USED_FIELDS | _INERT_FIELDS | set(_UNSUPPORTED_FIELDS)
    unknown = sorted(f for f in config if f not in known and config[f])
    if unknown:
        raise LoraError(
            f"{path}: adapter_config.json sets {unknown[0]}={config[unknown[0]]!r}, a field this modelstore does not "
            "know (a newer PEFT's?) and that may change the weights; upgrade modelstore, or merge the adapter and "
            "add the task as a full checkpoint"
        )
    if config.get("bias", "none") != "none":
        raise LoraError(
            f"{path}: bias={config['bias']!r} is not supported (trained biases are not low-rank); "
            "merge the adapter and add the task as a full checkpoint"
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_MUTATED_BASE_INITS):
        raise LoraError(
            f"{path}: init_lora_weights={config['init_lora_weights']!r} means the adapter is relative to a modified "
            "base; re-save it with save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )


def _read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    st_path, bin_path = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st_path):
        try:
            return load_file(st_path)
        except Exception as exc:  # corrupt files surface as many exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise LoraError(f"cannot read the weights of {path}: {SAFETENSORS_NAME} is damaged ({first}); "
                            "save the adapter again") from None
    if os.path.isfile(bin_path):
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception:  # a pickle with code in it, or a damaged file
            raise LoraError(f"cannot read the weights of {path}: {BIN_NAME} is not a plain tensor file, and "
                            "modelstore never unpickles code; save the adapter as safetensors "
                            "(save_pretrained(..., safe_serialization=True))") from None
    raise LoraError(
        f"{path} has neither {SAFETENSORS_NAME} nor {BIN_NAME}; copy the adapter weights next to {CONFIG_NAME}"
    )


def modules_to_save_owner(name: str, save_names: Sequence[str]) -> str | None:
    """The module path owning tensor `name` that PEFT's modules_to_save suffix rule selected, if any."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        if any(module.endswith(s) for s in save_names):
            return module
    return None


def _module(
    config: dict,
    name: str,
    pair: dict[str, torch.Tensor],
    is_embedding: bool,
    fan_in_fan_out: bool,
    path: str | os.PathLike[str],
) -> LoraModule:
    if set(pair) != {"A", "B"}:
        missing = "lora_A" if "A" not in pair else "lora_B"
        raise LoraError(f"{path}: module {name!r} has no {missing} tensor; the adapter file is incomplete")
    A, B = pair["A"], pair["B"]
    if A.ndim != 2 or B.ndim != 2:
        raise LoraError(
            f"{path}: module {name!r} has LoRA factors of shapes {list(A.shape)} and {list(B.shape)}; "
            "only Linear, Conv1D and Embedding LoRA are supported (not convolutions)"
        )
    if A.shape[0] != B.shape[1]:
        raise LoraError(
            f"{path}: module {name!r} has lora_A {list(A.shape)} and lora_B {list(B.shape)} of different ranks; "
            "the file is inconsistent"
        )
    r = int(pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8)))
    if r != A.shape[0]:
        raise LoraError(f"{path}: module {name!r} has rank {A.shape[0]} but the config (r/rank_pattern) says {r}")
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    layout: Layout = "embedding" if is_embedding else ("fan_in_fan_out" if fan_in_fan_out else "linear")
    return LoraModule(name=name, target=f"{name}.weight", A=A, B=B, scale=float(scale), layout=layout)
