"""Per-task statistics for the data-dependent merge methods (`fisher`, `regmean`).

Run each fine-tuned model on a few hundred to a few thousand examples of its own task and
keep the result next to the checkpoint; `modelstore build --stats TASK=FILE` (or the
`fishers=` / `grams=` options of `modelstore.merge`) reads it back.

Batches are what a Hugging Face user already has: the items of a DataLoader. A dict is
called as ``model(**batch)``, a tuple or list as ``model(*batch)``, anything else as
``model(batch)``. Tensors must be on the model's device. The model is run in eval mode
(no dropout); its mode is restored afterwards.

Files are safetensors, float32, keyed by `model.state_dict()` names, with metadata
``{"modelstore.merging.statistics": "fisher" | "gram"}`` plus the number of examples (Fisher) or of
input rows of the first layer (Gram).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from modelstore.errors import InputError

#: safetensors metadata key naming what a statistics file holds ("fisher" or "gram").
KIND_KEY = "modelstore.merging.statistics"
#: Suffix of the key of a Gram matrix for a weight stored [in, out] (transformers' Conv1D).
IN_OUT_SUFFIX = ":in_out"

LossFn = Callable[[nn.Module, Any], torch.Tensor]

__all__ = ["fisher", "gram", "KIND_KEY", "IN_OUT_SUFFIX"]


def fisher(model: nn.Module, batches: Iterable[Any], *, loss_fn: LossFn | None = None,
           out: str | os.PathLike | None = None, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: F = mean over examples of (∂ log p(y|x) / ∂θ)².

    Each batch is split into single examples along dim 0 of its tensors (every tensor of
    a batch must have the same first dimension), and each example gets its own backward
    pass: the square of a batch-mean gradient is not the mean of per-example squares.

    The example's negative log-likelihood is `loss_fn(model, example)` if given, else
    ``model(**example).loss`` (a Hugging Face model with `labels` in the batch; for a
    token-level loss that is the per-token mean, so examples of different lengths weigh
    alike). Parameters are keyed by their `model.state_dict()` names, tied ones under each
    of their names; `names` restricts the result to those parameters (default: all that
    require grad).
    """
    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)
             if p.requires_grad and (names is None or n in names)]
    _check_names(names, {n for n, _ in named}, "trainable parameter")
    params = list({id(p): p for _, p in named}.values())
    if not params:
        raise InputError("the model has no trainable parameters to compute a Fisher for")
    sq = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    count = 0
    with _eval(model), torch.enable_grad():
        for batch in batches:
            for example in _examples(batch):
                grads = torch.autograd.grad(_loss(model, example, loss_fn), params, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        sq[id(p)].addcmul_(g, g)
                count += 1
    if not count:
        raise InputError("no examples: `batches` was empty")
    result = {n: (sq[id(p)] / count).cpu() for n, p in named}
    _save(result, out, "fisher", examples=count)
    return result


def gram(model: nn.Module, batches: Iterable[Any], *, out: str | os.PathLike | None = None,
         names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Gram matrices XᵀX / rows of the inputs of every linear layer, for RegMean.

    X stacks the layer's input vectors over all tokens of all batches (padding tokens
    included; feed unpadded batches to leave them out), so each Gram is [in, in] and is
    divided by the number of rows, as in the RegMean reference code: tasks weigh alike
    whatever their data size. `nn.Linear` weights (torch layout [out, in]) are keyed by
    the weight's state-dict name; transformers' `Conv1D` weights are stored [in, out], so
    their Gram is keyed by the weight's name plus ":in_out" (the merge needs to know which
    side the inputs are on, which the shape cannot say for square weights). Layers the
    batches never reach get no entry. `names` restricts the result to those weight names.
    """
    layers = {f"{m}.weight" if m else "weight": (mod, _is_in_out(mod)) for m, mod in model.named_modules()
              if isinstance(mod, nn.Linear) or _is_in_out(mod)}
    layers = {w: v for w, v in layers.items() if names is None or w in names}
    _check_names(names, set(layers), "weight of an nn.Linear or Conv1D layer")
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(key: str) -> Callable[..., None]:
        def accumulate(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            xtx = x.T @ x
            if key in sums:
                sums[key] += xtx
            else:
                sums[key] = xtx
            rows[key] = rows.get(key, 0) + x.shape[0]
        return accumulate

    handles = [mod.register_forward_hook(hook(w + IN_OUT_SUFFIX if in_out else w))
               for w, (mod, in_out) in layers.items()]
    try:
        with _eval(model), torch.no_grad():
            for batch in batches:
                _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise InputError("no linear layer was run: `batches` was empty or reaches none of the selected layers")
    result = {k: (s / rows[k]).cpu() for k, s in sums.items()}
    _save(result, out, "gram", rows=max(rows.values()))
    return result


def _is_in_out(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return False
    return isinstance(module, Conv1D)


def _check_names(names: Sequence[str] | None, known: set[str], what: str) -> None:
    if names is None:
        return
    if isinstance(names, str):
        raise InputError("names must be a list of tensor names, not one string")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"{unknown[0]!r} is not a {what} of the model"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                         + "; use model.state_dict() names")


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss(model: nn.Module, example: Any, loss_fn: LossFn | None) -> torch.Tensor:
    loss: object  # whatever the model or loss_fn gives, checked below
    if loss_fn is not None:
        loss = loss_fn(model, example)
    elif isinstance(example, Mapping):
        output = model(**example)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise InputError("the model returned no loss: put `labels` in each batch, or pass loss_fn")
    else:
        raise InputError("batches that are not dicts need loss_fn(model, example) -> negative log-likelihood")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InputError("the loss of one example must be a scalar tensor (the example's negative log-likelihood)")
    return loss.reshape(())


def _examples(batch: Any) -> Iterator[Any]:
    """Split a batch into batches of one example (slices i:i+1 of every tensor)."""
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        values = [batch]
    sizes = {v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise InputError("cannot split a batch into examples: its tensors must share the first (batch) dimension, "
                         f"found sizes {sorted(sizes) or 'none'}")

    def pick(v: Any, i: int) -> Any:
        return v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v

    for i in range(sizes.pop()):
        if isinstance(batch, Mapping):
            yield {k: pick(v, i) for k, v in batch.items()}
        elif isinstance(batch, (tuple, list)):
            yield tuple(pick(v, i) for v in batch)
        else:
            yield pick(batch, i)


def _save(tensors: dict[str, torch.Tensor], out: str | os.PathLike | None, kind: str, **counts: int) -> None:
    if out is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(out),
                  metadata={KIND_KEY: kind, **{f"modelstore.{k}": str(v) for k, v in counts.items()}})
