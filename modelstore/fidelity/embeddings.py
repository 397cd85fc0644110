"""What an embedding model predicts, so that calibration and `eval` can promise it: a bare encoder
(a sentence-transformers or image embedding model) predicts each example's nearest neighbour among
the original's embeddings of the other examples; a dual encoder (CLIP, SigLIP) given images with
texts predicts, for each image, which of the data's texts it matches, as its zero-shot classifier
and its retrieval do.

An embedding is the one the model's users take: the pooling its sentence-transformers
`1_Pooling/config.json` names; else a dual encoder's image or text features (`get_image_features`);
else a projection model's `image_embeds` / `text_embeds`, a speaker model's x-vector, or a dual
encoder's tower's pooled output (the features before their projection); else the mean of the last
hidden state over the real tokens (a sound's: over the frames of its samples, not of its padding).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

#: The distribution compared of an embedding model's prediction: softmax(cosine / this) over the
#: neighbours (a contrastive loss's usual temperature).
TEMPERATURE = 0.05
#: How a sentence-transformers model pools its tokens into one embedding (its 1_Pooling/config.json).
POOLINGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
            "pooling_mode_lasttoken": "lasttoken"}
#: The model types of dual encoders whose text batches transformers' zero-shot pipeline pads to the
#: tokenizer's whole length (they pool a fixed position: padding to the longest would move it).
PADDED_TO_LENGTH = ("siglip", "siglip2")


def dual(model: Any) -> bool:
    """Whether `model` encodes images and texts apart into one space and scores their match (CLIP,
    SigLIP, ALIGN: `get_image_features`, `get_text_features` and a logit scale or temperature)."""
    return all(hasattr(model, k) for k in ("get_image_features", "get_text_features")) and (
        hasattr(model, "logit_scale") or hasattr(model, "temperature"))


def pooling_of(directory: str | None, model: Any) -> str:
    """How `model` (kept in `directory`) makes one embedding of an example: the mode of its
    sentence-transformers 1_Pooling/config.json (one of POOLINGS' values), else its own:
    "features" for a dual encoder (its image or text features), "own" for a ...WithProjection model
    (its embeds), a ...ForXVector model (its x-vector) or a dual encoder's vision or text tower (its
    pooled output); else "mean"."""
    try:
        with open(os.path.join(directory or "", "1_Pooling", "config.json"), encoding="utf-8") as fh:
            modes = json.load(fh)
    except (OSError, ValueError):
        modes = None
    named = next((p for key, p in POOLINGS.items() if isinstance(modes, dict) and modes.get(key) is True), None)
    if named is not None:
        return named
    if dual(model):
        return "features"
    tower = str(getattr(getattr(model, "config", None), "model_type", "")).endswith(("_vision_model", "_text_model"))
    return "own" if tower or type(model).__name__.endswith(("WithProjection", "ForXVector")) else "mean"


def _tensor(x: Any) -> torch.Tensor:
    """A features call's result: a tensor (transformers 4), or an output whose pooled output it is (5)."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def embedded(model: Any, batch: Mapping[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """The unit-length embeddings [B, H] (float64) `model` makes of `batch`'s examples, pooled as
    `pooling` says (pooling_of; "mean", "max" and "lasttoken" over the real tokens; all of an image's)."""
    if pooling == "features":
        get = model.get_image_features if "pixel_values" in batch else model.get_text_features
        return torch.nn.functional.normalize(_tensor(get(**batch)).double(), dim=-1)
    out = model(**batch)
    if pooling == "own":  # its projection's embeds where it projects, else its pooled output
        own = [getattr(out, k, None) for k in ("image_embeds", "text_embeds", "embeddings", "pooler_output")]
        return torch.nn.functional.normalize(next(e for e in own if e is not None).double(), dim=-1)
    h = out.last_hidden_state.double()
    real = real_positions(model, batch, h.shape[:2])
    if pooling == "cls":
        e = h[:, 0]
    elif pooling == "max":
        e = h.masked_fill(~real[..., None], float("-inf")).amax(1)
    elif pooling == "lasttoken":  # padding after the text: its last real token
        e = h[torch.arange(len(h), device=h.device), real.sum(1) - 1]
    else:
        e = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
    return torch.nn.functional.normalize(e, dim=-1)


def real_positions(model: Any, batch: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """[B, L] (`shape`) of the positions of `model`'s outputs on `batch` that stand for real input:
    the tokens its attention mask keeps; a sound's frames of its samples, not of its padding (the
    mask is then of samples); every position without a mask."""
    mask, device = batch.get("attention_mask"), next(iter(batch.values())).device
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if {"input_values", "input_features"} & set(batch) and hasattr(model, "_get_feat_extract_output_lengths"):
        frames = model._get_feat_extract_output_lengths(mask.sum(-1))
        return torch.arange(shape[1], device=device)[None] < frames[:, None]
    return mask.bool() if mask.shape == shape else torch.ones(shape, dtype=torch.bool, device=device)


def neighbours(embeddings: torch.Tensor, anchors: torch.Tensor, first: int) -> torch.Tensor:
    """Rows of logits cosine / TEMPERATURE of each of `embeddings` (examples first, first + 1 ...)
    against `anchors` (the original's embeddings of every example), an example's own anchor left out."""
    rows = embeddings @ anchors.T / TEMPERATURE
    own = torch.arange(len(rows), device=rows.device)
    rows[own, own + first] = float("-inf")
    return rows


def distinct(texts: list[str]) -> list[str]:
    """The texts a dual encoder matches each image against: the data's, each once, in order of
    first appearance (a classification set's class prompts, a captioned set's captions)."""
    return list(dict.fromkeys(texts))


def text_batch(processor: Any, texts: list[str], max_length: int, model: Any) -> dict[str, torch.Tensor]:
    """`texts` tokenized for dual encoder `model`, as transformers' zero-shot image classification
    pipeline pads them (PADDED_TO_LENGTH)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    fixed = getattr(getattr(model, "config", None), "model_type", None) in PADDED_TO_LENGTH
    padding: str | bool = "max_length" if fixed else True
    return dict(tokenizer(texts, return_tensors="pt", padding=padding, truncation=True, max_length=max_length))


def matches(model: Any, images: Mapping[str, torch.Tensor], texts: torch.Tensor) -> torch.Tensor:
    """Dual encoder `model`'s logits [B, T] of each image of `images` (a batch) against the unit
    text features `texts` [T, H]: cosine times its logit scale, or over its temperature (ALIGN), as
    its forward scores them (SigLIP's bias, the same for every text, moves no softmax over them)."""
    cos = embedded(model, images, "features") @ texts.T
    if hasattr(model, "logit_scale"):
        return cos * model.logit_scale.double().exp()
    return cos / model.temperature.double()


__all__ = ["PADDED_TO_LENGTH", "POOLINGS", "TEMPERATURE", "distinct", "dual", "embedded", "matches",
           "neighbours", "pooling_of", "real_positions", "text_batch"]
