"""transformers architectures from a config.json: the class a task was fine-tuned as, how
transformers renames a checkpoint's names as it loads one into it, and transformers' loading
chatter held back. transformers is an optional dependency, imported only when a model is built.

transformers 5 renames some architectures' modules and keeps their checkpoints' names, renaming
as it loads (ViT's `encoder.layer.0.attention.attention.query` is the module
`layers.0.attention.q_proj`); it fuses others' (a MoE's experts stacked into one tensor)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from modelstore.errors import InputError


def transformers_module(purpose: str = "load_model") -> Any:
    """transformers, or a one-line error naming what needs it."""
    try:
        import transformers
    except ImportError:
        raise InputError(f"{purpose} needs transformers; install it with pip install 'peru-modelstore[hf]'") from None
    return transformers


def _not_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' per-model loading bars off for the block, then as they were: its switch turns
    huggingface_hub's bars off process-wide (modelstore's own among them)."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging
    was_on = transformers_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Hold back transformers 5's "LOAD REPORT" table of the keys a `from_pretrained` missed or did
    not expect (a multi-line warning) where the caller checks the keys itself or another load
    already reported them; transformers still raises its errors, and other warnings pass."""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_not_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_not_load_report)


def model_class(transformers: Any, model_cls: type | str | None, config: Any) -> type[Any]:
    """The class to build: `model_cls`, a transformers class name, else the config's first
    `architectures` entry (the class the task was fine-tuned as) when transformers has it, else
    AutoModel's class for `config`."""
    if model_cls is None:
        named = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
        if isinstance(named, type) and issubclass(named, transformers.PreTrainedModel):
            return named
        cls = transformers.MODEL_MAPPING.get(type(config), None)
        if cls is None:
            raise InputError(f"transformers has no AutoModel class for model type {config.model_type!r}; "
                             "pass model_cls=...")
        return cls
    cls = getattr(transformers, model_cls, None) if isinstance(model_cls, str) else model_cls
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise InputError(f"model_cls must be a transformers model class or its name (like 'GPT2LMHeadModel'), "
                         f"not {model_cls!r}")
    return cls


def config_from_json(transformers: Any, text: str, what: str) -> Any:
    """The transformers config of a config.json's text (`what` names whose, in errors).

    Raises:
        InputError: the text is not a JSON object, or transformers does not know its model type.
    """
    try:
        fields = json.loads(text)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise InputError(f"the config.json of {what} is not a JSON object")
    model_type = fields.pop("model_type", None)
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError:
        raise InputError(f"the config.json of {what} has model_type {model_type!r}, which this "
                         "transformers does not know; upgrade transformers") from None


def _same(name: str) -> str:
    return name


def not_fused(name: str) -> str | None:
    return None


def checkpoint_renaming(model: Any) -> tuple[Callable[[str], str], Callable[[str], str | None]]:
    """How transformers renames a checkpoint's names when it loads one into `model` (its
    conversion mapping's renamings), and the tensor it fuses a name into (its converters; None
    for a name it does not fuse); neither for other modules and other transformers."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_converters, apply_renamings
    except ImportError:  # transformers absent, or one without conversion mappings
        return _same, not_fused
    if not isinstance(model, PreTrainedModel):
        return _same, not_fused
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]

    def fused(name: str) -> str | None:
        into, pattern = apply_converters(apply_renamings(name, renamings), converters)
        return into if pattern is not None else None

    return ((lambda name: apply_renamings(name, renamings)) if renamings else _same,
            fused if converters else not_fused)


def _meta_model(config_json: str | None) -> Any:
    """The model transformers builds from a checkpoint's config.json, on the meta device (no
    memory, no weights); None where that cannot be known: no config.json, no transformers, or a
    config it cannot build."""
    if not config_json:
        return None
    try:
        import transformers
        config = config_from_json(transformers, config_json, "the checkpoint")
        with no_loading_bars(), quiet_load_report(), torch.device("meta"):
            return model_class(transformers, None, config)(config)
    except Exception:  # noqa: BLE001 - any config transformers cannot build: unknown, as without one
        return None


@functools.lru_cache(maxsize=8)
def checkpoint_renaming_of(config_json: str | None) -> Callable[[str], str]:
    """checkpoint_renaming's renaming for the model a config.json names (none where unknown);
    cached: it builds the model (on the meta device), and a calibrated LoRA task asks once per
    candidate it writes."""
    return checkpoint_renaming(_meta_model(config_json))[0]


def architecture_names(config_json: str | None) -> set[str] | None:
    """The state-dict names of the model transformers builds from a checkpoint's config.json (on
    the meta device: no memory, no weights), or None where that cannot be known: no config.json,
    no transformers, or a config it cannot build. What tells a fine-tune whose class leaves out a
    tensor of its base (a token classifier, no pooler) from a checkpoint that lost one."""
    model = _meta_model(config_json)
    return None if model is None else set(model.state_dict())


def built_from(cls: type[Any], config: Any, tensors: dict[str, torch.Tensor], what: str, *, dtype: torch.dtype,
               device: str | torch.device) -> Any:
    """A `cls` model of `config` in eval mode whose weights are `tensors` (checkpoint names), made by
    `from_pretrained` on the meta device, so they are allocated once and converted as a checkpoint
    is (a MoE's experts fused); buffers the tensors lack are made as transformers makes them.

    Raises:
        InputError: the model cannot be built, or its tensors are not `tensors` (missing, extra or
            of another shape); `what` names the tensors' task.
    """
    try:
        with quiet_load_report():  # the keys are checked below, into one line
            model, info = cls.from_pretrained(None, config=config, state_dict=tensors, dtype=dtype,
                                              device_map={"": torch.device(device)}, output_loading_info=True)
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{cls.__name__} cannot be built from {what} ({config.model_type}): {why}; "
                         "pass the model class it was fine-tuned as") from None
    wrong = [f"{kind} {sorted(info[key])[:3]}" for key, kind in
             (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "other shape"))
             if info.get(key)]
    if wrong or info.get("error_msgs"):
        raise InputError(f"{cls.__name__} does not match {what}'s tensors ("
                         f"{'; '.join(wrong) or info['error_msgs'][0]}); pass the model class it was fine-tuned as")
    return model.eval()


__all__ = ["architecture_names", "built_from", "checkpoint_renaming", "checkpoint_renaming_of", "config_from_json",
           "model_class", "no_loading_bars", "not_fused", "quiet_load_report", "transformers_module"]
