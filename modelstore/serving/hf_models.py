"""A ready transformers model of a stored task: the architecture from the config.json the task keeps
(its base's for tasks that keep none), the weights from the store, placed as every write of a task
into a model places them (modules.ModuleTensors.fit). transformers is an optional dependency,
imported here only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from modelstore.errors import InputError
from modelstore.format import dtypes
from modelstore.inputs.architectures import (
    built_from,
    config_from_json,
    model_class,
    no_loading_bars,
    quiet_load_report,
    transformers_module,
)
from modelstore.serving.modules import ModuleTensors, Placement
from modelstore.store import Store, serving_store


def task_architecture(store: Store, task: str, model_cls: type | str | None = None) -> tuple[type[Any], Any]:
    """(model class, transformers config) of `task`, from the config.json it keeps (see the module).

    Raises:
        InputError: transformers is missing, neither the task nor its base keeps a config.json, or
            its model type or `model_cls` is unknown.
    """
    transformers = transformers_module()
    config_json = store.task_config(task)
    if not config_json:
        raise InputError(f"neither task {task!r} nor its base keeps a config.json (the store was built from bare "
                         f"state dicts); build the model yourself and call store.load_into(model, {task!r})")
    config = config_from_json(transformers, config_json, f"task {task!r}")
    return model_class(transformers, model_cls, config), config


def placement(task: str, names: list[str], cls: type, config: Any) -> Placement | None:
    """Where `task`'s tensors `names` go in a `cls` model of `config`, from one made on the meta
    device (no memory: only its names are read); None for a class whose checkpoints transformers
    converts as it loads them (a MoE's experts fused into one tensor): its `from_pretrained` then
    places them, and reports what did not fit.

    Raises:
        InputError: the task does not fit the class (ModuleTensors.fit).
    """
    try:
        with torch.device("meta"):
            probe = cls(config)
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{cls.__name__} cannot be built from task {task!r}'s config ({config.model_type}): {why}; "
                         "pass the model class it was fine-tuned as") from None
    tensors = ModuleTensors(probe)
    if tensors.fuses:
        return None
    return tensors.fit(task, names, strict=True, model=cls.__name__, hint="pass the model class it was fine-tuned as")


def load_model(task: str, store: Store | str | os.PathLike[str] | None = None, model_cls: type | str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | str | None = "auto", *,
               storage_options: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """`task` as a transformers model in eval mode, built from the config.json it keeps (the fine-tune's:
    its architecture and labels), or its base's for tasks that keep none.

    transformers' `from_pretrained` makes the model on the meta device and takes the task's
    tensors, loaded on `device` and placed as `load_into` places them, as its weights: they are
    allocated once. Buffers the store does not hold are made as transformers makes them, and
    tied weights (lm_head and the input embeddings) are tied.

    >>> model = modelstore.load_model("sst2", "store", dtype="float16")

    Args:
        task: the task's name.
        store: an open Store, or its URL (opened with `storage_options` over
            $MODELSTORE_STORAGE_OPTIONS); by default $MODELSTORE_URL, as `modelstore.load`.
        model_cls: a transformers model class or its name; by default the class the config's
            `architectures` names (the one the task was fine-tuned as), else AutoModel's class.
        device: where the weights are made.
        dtype: "auto" (or None) keeps the stored dtypes; a float dtype or its name casts them.

    Raises:
        InputError: transformers is missing, neither the task nor its base keeps a config.json, the
            class does not match the task's tensors, or no store is given and $MODELSTORE_URL is unset.
    """
    store = serving_store(store, storage_options)
    cls, config = task_architecture(store, task, model_cls)
    want = dtypes.requested_dtype(dtype)
    sd = store.load(task, device=device, dtype=want)
    placed = placement(task, list(sd), cls, config)
    if placed is not None:
        sd = {placed.model[n]: t for n, t in sd.items() if n in placed.model}
    floats = {t.dtype for t in sd.values() if t.dtype.is_floating_point}
    init_dtype = want or (floats.pop() if len(floats) == 1 else torch.float32)
    return built_from(cls, config, sd, f"task {task!r}", dtype=init_dtype, device=device)


__all__ = ["load_model", "task_architecture", "placement", "no_loading_bars", "quiet_load_report"]
