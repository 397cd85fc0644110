"""Reproduce Table 1 of the PERU paper on the real MiniLM workload, every variant read back from a store.

Rows as in the paper: Pre-Trained, Single-Task (FFT), merges without task-specific parameters
(Task-Arithmetic, TIES, Fisher, RegMean, and plain averaging), Post-Pruning and PERU-FFT at
m = 1/5/10%, PERU-FFT on each merge method, Single-Task LoRA, the same merges of the LoRA task
models, PERU-LoRA at q = 1/2/4/8/16, the appendix ablation Approx(A)·Approx(B)ᵀ against
Approx(A·Bᵀ), and PERU-LoRA at q ≪ r on adapters of a larger rank r (the paper's q = 16 of r = 128).
As in the papers, what a merge learns from data comes from each task's validation split, never
from its test split: Task-Arithmetic's and TIES' λ (a sweep, LAMBDA_GRIDS) and the Fisher and
RegMean statistics.

Each stored variant is built on disk under ``.cache/paper_table/`` with the public modelstore API
and evaluated from ``modelstore.open(path)``, never from the tensors that went in; the originals
(Single-Task rows) are evaluated from their checkpoints. Stores, statistics and finished rows are
cached, so an interrupted run resumes where it stopped.

    python -m tools.paper_table                         # all 8 tasks, 150-step checkpoints
    python -m tools.paper_table --tasks rt,trump --smoke --out /tmp/table
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import modelstore
from tools.finetune import (
    LORA_RANK,
    encoded,
    evaluate,
    finetune,
    head,
    load_state_dict,
    logits,
    model_from_state_dict,
    pretrained_path,
)
from tools.tasks import SPLIT_VERSION, TASKS, parse_tasks

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".cache" / "paper_table"
KEEPS = (0.01, 0.05, 0.1)
RANKS = (1, 2, 4, 8, 16)
MERGES = ("task-arithmetic", "ties", "fisher", "regmean", "average")
"""The papers' four merges, and plain averaging (λ = 1/T): the yardstick of Fisher's weighted average."""
MERGE_NAMES = {"task-arithmetic": "Task-Arithmetic", "ties": "TIES", "fisher": "Fisher", "regmean": "RegMean",
               "average": "Average"}  # fmt: skip
MERGE_OPTIONS: dict[str, dict[str, Any]] = {
    "task-arithmetic": {},  # λ: tuned, see LAMBDA_GRIDS
    "ties": {"density": 0.2},  # the TIES paper's top-20%; λ tuned
    "fisher": {},
    "regmean": {"alpha": 0.9},
    "average": {},
}
LAMBDA_GRIDS: dict[str, tuple[float, ...]] = {
    "task-arithmetic": tuple(round(0.1 * i, 1) for i in range(1, 11)),  # 0.1 … 1.0
    "ties": tuple(round(0.2 * i, 1) for i in range(3, 11)),  # 0.6 … 2.0
}
"""λ values tried for the merges that scale a merged task vector, θ0 + λ·τ: as in the papers, λ is
chosen on validation data (the tasks' validation split), by the best average accuracy."""
STATS_KIND = {"fisher": "fisher", "regmean": "gram"}


@dataclass(frozen=True)
class Config:
    """What one run uses: tasks, checkpoints, statistics sample size, test subset, cache."""

    tasks: tuple[str, ...]
    steps: int = 150
    n_train: int | None = None
    """Cap on fine-tuning examples (None: the tasks' whole train split, as the cached sweep)."""
    n_stats: int = 256
    """Validation examples per task for the Fisher / Gram statistics."""
    n_val: int | None = 250
    """Validation examples per task that choose λ (None: the whole validation split, ~500)."""
    limit: int | None = None
    """Evaluate on the first `limit` test examples of each task (None: the whole test split)."""
    cache: Path = DEFAULT_CACHE
    checkpoint_cache: Path | None = None
    """Where tools.finetune caches checkpoints (None: its default, shared with the demo and sweeps)."""
    keeps: tuple[float, ...] = KEEPS
    ranks: tuple[int, ...] = RANKS
    merges: tuple[str, ...] = MERGES
    wide_rank: int | None = 64
    """A second LoRA rank r, for PERU-LoRA at q ≪ r: the paper keeps q = 16 of r = 128 on ViT-B
    (width 768); 64 is the same r / width on MiniLM (384). None leaves those rows out."""
    wide_ranks: tuple[int, ...] = (1, 4, 16, 32)
    """The q of PERU-LoRA on the rank-`wide_rank` adapters."""

    @property
    def dir(self) -> Path:
        """Cache directory of these checkpoints: stores and statistics of different ones never mix."""
        name = f"split{SPLIT_VERSION}-steps{self.steps}" + ("" if self.n_train is None else f"-n{self.n_train}")
        return self.cache / name


# ---------------------------------------------------------------- inputs: checkpoints and statistics


def checkpoints(cfg: Config, mode: str, rank: int = LORA_RANK) -> dict[str, Path]:
    """The fine-tuned checkpoint of every task (cached by tools.finetune); `rank`: of LoRA adapters."""
    return {t: finetune(t, mode, cfg.steps, n_train=cfg.n_train, rank=rank, cache_dir=cfg.checkpoint_cache)
            for t in cfg.tasks}  # fmt: skip


def lora_full_checkpoints(cfg: Config) -> dict[str, Path]:
    """θ0 + s·B·A of each LoRA task as a full safetensors checkpoint, what the merge methods take."""
    out = {}
    base = load_file(pretrained_path() / "model.safetensors")
    for t, adapter in checkpoints(cfg, "lora").items():
        path = cfg.dir / "lora-full" / f"{t}.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {**base, **load_state_dict(adapter)}  # θ0's buffers (position_ids) kept
            save_file({k: v.contiguous() for k, v in state.items()}, str(path) + ".tmp")
            Path(str(path) + ".tmp").replace(path)
        out[t] = path
    return out


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full weights of a checkpoint dir of tools.finetune or of a lora_full_checkpoints file."""
    return load_file(checkpoint) if checkpoint.is_file() else load_state_dict(checkpoint)


def merge_options(cfg: Config, mode: str, merge: str) -> dict[str, Any]:
    """The options `merge` runs with on the `mode` task models: MERGE_OPTIONS, plus the λ that
    scored best on the validation split for the merges of LAMBDA_GRIDS."""
    options = dict(MERGE_OPTIONS[merge])
    if merge in LAMBDA_GRIDS:
        options["lam"] = lambda_sweep(cfg, mode, merge)["lambda"]
    return options


def lambda_sweep(cfg: Config, mode: str, merge: str) -> dict[str, Any]:
    """Average validation accuracy of θ0 + λ·τ for every λ of LAMBDA_GRIDS[merge], where θ0 + τ is
    `merge` at λ = 1 (both methods are linear in λ, so one merge serves the whole grid); the best
    λ (the smallest on a tie) and the curve, cached as JSON."""
    path = cfg.dir / "lambda" / f"{mode}-{merge}-nval{cfg.n_val}.json"
    if path.is_file():
        return json.loads(path.read_text())
    ckpts = checkpoints(cfg, "full") if mode == "full" else lora_full_checkpoints(cfg)
    theta0 = load_file(pretrained_path() / "model.safetensors")
    unit = modelstore.merge(merge, theta0, [_state(ck) for ck in ckpts.values()],
                            **{**MERGE_OPTIONS[merge], "lam": 1.0})
    curve = {}
    for lam in LAMBDA_GRIDS[merge]:
        state = {k: torch.lerp(v, unit[k], lam) if v.is_floating_point() else v for k, v in theta0.items()}
        curve[lam] = sum(evaluate(state, t, split="val", limit=cfg.n_val) for t in cfg.tasks) / len(cfg.tasks)
        log.info("%s/%s λ=%g: validation accuracy %.3f", mode, merge, lam, curve[lam])
    result = {"lambda": max(curve, key=curve.__getitem__), "curve": [[lam, acc] for lam, acc in curve.items()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _nll(task_head: torch.Tensor) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    def loss(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, mask, label = example
        return F.cross_entropy(logits(model, ids, mask, task_head), label)

    return loss


def _unpadded(task: str, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first n validation examples one at a time, cut to their length so padding never enters a
    statistic (the papers estimate Fisher and RegMean statistics on validation data)."""
    ids, mask, labels = encoded(task, "val")
    for i in range(min(n, len(labels))):
        length = int(mask[i].sum())
        yield ids[i : i + 1, :length], mask[i : i + 1, :length], labels[i : i + 1]


def statistics(cfg: Config, merge: str, mode: str, ckpts: dict[str, Path],
               names: dict[str, str]) -> dict[str, str] | None:
    """Fisher (fisher) or Gram (regmean) file of each `mode` task model, made once and cached, keyed
    by the task's name in the store (`names`)."""
    kind = STATS_KIND.get(merge)
    if kind is None:
        return None
    out = {}
    for t, ck in ckpts.items():
        path = cfg.dir / "stats" / f"{mode}-{t}-n{cfg.n_stats}.{kind}.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            model = model_from_state_dict(_state(ck))  # refuses weights that do not fit the encoder
            start = time.perf_counter()
            if kind == "fisher":
                model.requires_grad_(False)
                model.encoder.requires_grad_(True)  # the fine-tuned (merged) parameters only
                task_head = head(t).clone()  # an inference-mode tensor cannot enter autograd
                modelstore.merging.statistics.fisher(model, _unpadded(t, cfg.n_stats), loss_fn=_nll(task_head),
                                                     out=path)
            else:
                modelstore.merging.statistics.gram(model, (b[:2] for b in _unpadded(t, cfg.n_stats)), out=path)
            log.info("%s statistics of %s/%s: %.0f s", kind, mode, t, time.perf_counter() - start)
        out[names[t]] = str(path)
    return out


# ---------------------------------------------------------------- Approx(A)·Approx(B)ᵀ ablation


def approx(matrix: torch.Tensor, q: int) -> torch.Tensor:
    """Best rank-q approximation of one matrix (truncated SVD), in the matrix's dtype."""
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return ((U[:, :q] * S[:q]) @ Vh[:q]).to(matrix.dtype)


def approx_factors_adapter(adapter: Path, q: int, out: Path) -> Path:
    """A copy of a PEFT adapter whose lora_A and lora_B are each replaced by their own rank-q
    approximation: the papers' Approx(A)·Approx(B)ᵀ, whose product has rank ≤ q like PERU-LoRA's."""
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = load_file(adapter / "adapter_model.safetensors")
        factors = (".lora_A.weight", ".lora_B.weight")
        save_file({k: approx(v, q) if k.endswith(factors) else v for k, v in tensors.items()},
                  tmp / "adapter_model.safetensors")  # fmt: skip
        shutil.copy(adapter / "adapter_config.json", tmp)
        tmp.replace(out)
    return out


# ---------------------------------------------------------------- stores


def _stored_name(task: str, setting: str) -> str:
    """A task's name in a store that keeps it at several settings (e.g. rt-m10, rt-q4, rt-ab4)."""
    return f"{task}-{setting}"


def _open(path: Path) -> modelstore.Store | None:
    try:
        return modelstore.open(str(path))
    except modelstore.ModelStoreError:
        return None


def theta0_store(cfg: Config) -> Path:
    """The store on θ0 that Post-Pruning and LoRA tasks share (one copy of the pre-trained base)."""
    path = cfg.dir / "stores" / "theta0"
    if _open(path) is None:  # never made, or interrupted: a store is readable only when complete
        shutil.rmtree(path, ignore_errors=True)
        modelstore.init(str(path), pretrained=str(pretrained_path()))
    return path


def _add_missing(path: Path, adds: dict[str, Callable[[str], object]]) -> modelstore.Store:
    """Run adds[name](name) for every task name the store at `path` lacks; return the store reopened."""
    have = set(modelstore.open(str(path)).tasks())
    for name, add in adds.items():
        if name not in have:
            add(name)
    return modelstore.open(str(path))


#: PERU-FFT as in the paper: the top-m magnitudes, float16 values (given explicitly: the store's
#: default representation is another).
PERU_FFT = {"sparsify": "magnitude", "value_dtype": "float16"}


def fft_store(cfg: Config, mode: str, merge: str, keeps: tuple[float, ...]) -> modelstore.Store:
    """The `mode` task models on the `merge` base (θ0 for "none": Post-Pruning), each kept at every
    m of `keeps` as task ``<task>-m<percent>``. A merged base is merged and written once."""
    ckpts = checkpoints(cfg, "full") if mode == "full" else lora_full_checkpoints(cfg)
    names = {(t, k): _stored_name(t, f"m{100 * k:g}") for k in keeps for t in ckpts}
    if merge == "none":
        path = theta0_store(cfg)
    else:
        options = merge_options(cfg, mode, merge)
        path = cfg.dir / "stores" / "-".join([mode, merge, *(f"{k}{v:g}" for k, v in sorted(options.items()))])
        if _open(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            modelstore.build(str(path), pretrained=str(pretrained_path()),
                             tasks={names[t, keeps[0]]: str(p) for t, p in ckpts.items()},
                             merge=merge, keep=keeps[0], merge_options=options,
                             value_dtype=PERU_FFT["value_dtype"], kind_options={"sparsify": PERU_FFT["sparsify"]},
                             stats=statistics(cfg, merge, mode, ckpts,
                                              names={t: names[t, keeps[0]] for t in ckpts}))  # fmt: skip
    return _add_missing(path, {name: lambda n, t=t, k=k: modelstore.add_task(str(path), n, str(ckpts[t]), keep=k,
                                                                             **PERU_FFT)
                               for (t, k), name in names.items()})  # fmt: skip


def _lora_setting(rank: int, q: int, ablation: bool) -> str:
    """The name suffix of a rank-`rank` LoRA task kept at q: ``r16q4``, or ``r16ab4`` for the ablation."""
    return f"r{rank}{'ab' if ablation else 'q'}{q}"


def lora_store(cfg: Config, ranks: tuple[int, ...], ablation: bool, rank: int = LORA_RANK) -> modelstore.Store:
    """θ0 and every rank-`rank` LoRA task at each q of `ranks`: PERU-LoRA as ``<task>-r<rank>q<q>``,
    the Approx(A)·Approx(B)ᵀ adapters as ``<task>-r<rank>ab<q>``."""
    path = theta0_store(cfg)
    adapters = checkpoints(cfg, "lora", rank)

    def add(name: str, t: str, q: int) -> None:
        adapter = adapters[t]
        if ablation:
            adapter = approx_factors_adapter(adapter, q, cfg.dir / "approx-factors" / f"r{rank}q{q}" / t)
        modelstore.add_lora_task(str(path), name, str(adapter), rank=q)

    return _add_missing(path, {_stored_name(t, _lora_setting(rank, q, ablation)): lambda n, t=t, q=q: add(n, t, q)
                               for q in ranks for t in adapters})  # fmt: skip


# ---------------------------------------------------------------- rows


def _floats(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values() if v.is_floating_point())


@dataclass(frozen=True)
class Variant:
    """One row: how to get each task's weights, and what all tasks together cost."""

    models: Callable[[str], dict[str, torch.Tensor]]
    params: int
    bytes: int


def _base_variant(store: modelstore.Store, base_id: str) -> Variant:
    """One model for every task: a store's base (θ0, or a merge without task-specific parameters)."""
    base = store.base(base_id)
    return Variant(lambda t: base, _floats(base), store.info()["bases"][base_id]["bytes"])


def _tasks_variant(store: modelstore.Store, tasks: tuple[str, ...], setting: str) -> Variant:
    """Each task read back from the store; cost = the base its tasks sit on plus their own entries."""
    infos = {t: store.info(_stored_name(t, setting)) for t in tasks}
    base_id = next(iter(infos.values()))["base"]
    base = store.base(base_id)
    return Variant(lambda t: store.load(_stored_name(t, setting)),
                   _floats(base) + sum(i["kept"] for i in infos.values()),
                   store.info()["bases"][base_id]["bytes"] + sum(i["bytes"] for i in infos.values()))  # fmt: skip


def _originals(cfg: Config, mode: str, rank: int = LORA_RANK) -> Variant:
    """The fine-tuned models themselves; cost = their checkpoint files (plus θ0 under LoRA adapters)."""
    ckpts = checkpoints(cfg, mode, rank)
    if mode == "full":
        files = [ck / "model.safetensors" for ck in ckpts.values()]
    else:
        files = [pretrained_path() / "model.safetensors"] + [ck / "adapter_model.safetensors" for ck in ckpts.values()]
    params = sum(_floats(load_file(f)) for f in files)
    return Variant(lambda t: load_state_dict(ckpts[t]), params, sum(f.stat().st_size for f in files))


Row = tuple[str, str, str, Callable[[], Variant]]  # group, method, setting, variant maker


def _lambda_setting(cfg: Config, mode: str, merge: str) -> str:
    """A merge row's setting: its tuned λ, if it has one."""
    return f"λ={merge_options(cfg, mode, merge)['lam']:g}" if merge in LAMBDA_GRIDS else ""


def rows(cfg: Config) -> list[Row]:
    """Every row of the table, in the paper's order."""
    tasks, top = cfg.tasks, cfg.keeps[-1]

    def merged(mode: str, merge: str) -> Variant:
        keeps = cfg.keeps if (mode, merge) == ("full", "task-arithmetic") else (top,)
        return _base_variant(fft_store(cfg, mode, merge, keeps), "merged")

    def peru_fft(merge: str, keep: float) -> Variant:
        keeps = cfg.keeps if merge in ("none", "task-arithmetic") else (top,)
        return _tasks_variant(fft_store(cfg, "full", merge, keeps), tasks, f"m{100 * keep:g}")

    def lora(q: int, ablation: bool = False, rank: int = LORA_RANK) -> Variant:
        qs = ablated if ablation else cfg.ranks if rank == LORA_RANK else cfg.wide_ranks
        return _tasks_variant(lora_store(cfg, qs, ablation, rank), tasks, _lora_setting(rank, q, ablation))

    ablated = tuple(q for q in cfg.ranks if q < LORA_RANK)  # at q = r both are the adapter itself
    out: list[Row] = [
        ("-", "Pre-Trained", "θ0", lambda: _base_variant(modelstore.open(str(theta0_store(cfg))), "pretrained")),
        ("FFT", "Single-Task", "", lambda: _originals(cfg, "full")),
    ]
    out += [("FFT", MERGE_NAMES[m], _lambda_setting(cfg, "full", m), lambda m=m: merged("full", m)) for m in cfg.merges]
    for method, merge in (("Post-Pruning", "none"), ("PERU-FFT", "task-arithmetic")):
        out += [("FFT", method, f"{k:.0%}", lambda m=merge, k=k: peru_fft(m, k)) for k in cfg.keeps]
    out += [("FFT", f"PERU-FFT ({MERGE_NAMES[m]})", f"{top:.0%}", lambda m=m: peru_fft(m, top))
            for m in cfg.merges if m != "task-arithmetic"]  # fmt: skip
    out.append(("LoRA", "Single-Task", f"r={LORA_RANK}", lambda: _originals(cfg, "lora")))
    out += [("LoRA", MERGE_NAMES[m], _lambda_setting(cfg, "lora", m), lambda m=m: merged("lora", m))
            for m in cfg.merges]
    out += [("LoRA", "PERU-LoRA", f"q={q}", lambda q=q: lora(q)) for q in cfg.ranks]
    out += [("LoRA", "Approx(A)·Approx(B)ᵀ", f"q={q}", lambda q=q: lora(q, ablation=True)) for q in ablated]
    if cfg.wide_rank is not None:
        wide, r = f"LoRA r={cfg.wide_rank}", cfg.wide_rank
        out.append((wide, "Single-Task", f"r={r}", lambda: _originals(cfg, "lora", r)))
        out += [(wide, "PERU-LoRA", f"q={q}", lambda q=q: lora(q, rank=r)) for q in cfg.wide_ranks]
    return out


def evaluate_row(cfg: Config, group: str, method: str, setting: str, make: Callable[[], Variant]) -> dict[str, Any]:
    """Build (or reuse) the row's store and evaluate every task's model read back from it."""
    start = time.perf_counter()
    variant = make()
    acc = {t: evaluate(variant.models(t), t, limit=cfg.limit) for t in cfg.tasks}
    return {"group": group, "method": method, "setting": setting, "params": variant.params, "bytes": variant.bytes,
            "accuracy": acc, "average": sum(acc.values()) / len(acc),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def _needs_data(method: str) -> bool:
    """Whether a row's merge needs Fisher / Gram statistics (minutes of backward passes per task)."""
    return any(MERGE_NAMES[m] in method for m in STATS_KIND)


def run(cfg: Config, out: Path) -> list[dict[str, Any]]:
    """Evaluate every row not yet in `out`/results.json, saving each as it finishes, then write the
    table and plots in the paper's order. Rows that need statistics go last, so that a run cut
    short still has every data-free row."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done = {(r["group"], r["method"], r["setting"]): r for r in _read(results_path, cfg)}
    table = rows(cfg)
    for group, method, setting, make in sorted(table, key=lambda row: _needs_data(row[1])):
        if (group, method, setting) not in done:
            row = evaluate_row(cfg, group, method, setting, make)
            log.info("%-5s %-28s %-6s avg %.3f (%.0f s)", group, method, setting, row["average"], row["seconds"])
            done[group, method, setting] = row
            _write(results_path, cfg, list(done.values()))
    results = [done[group, method, setting] for group, method, setting, _ in table]
    _write(results_path, cfg, results)
    (out / "results.md").write_text(markdown(results, cfg.tasks))
    plots(results, _meta(cfg)["lambda_curves"], out)
    return results


def _meta(cfg: Config) -> dict[str, Any]:
    return {"tasks": list(cfg.tasks), "steps": cfg.steps, "n_train": cfg.n_train, "n_stats": cfg.n_stats,
            "n_val": cfg.n_val, "limit": cfg.limit, "keeps": list(cfg.keeps), "ranks": list(cfg.ranks),
            "merges": list(cfg.merges), "wide_rank": cfg.wide_rank, "wide_ranks": list(cfg.wide_ranks),
            "split_version": SPLIT_VERSION,
            "merge_options": {mode: {m: merge_options(cfg, mode, m) for m in ms} for mode, ms in _merges(cfg).items()},
            "lambda_curves": {mode: {m: lambda_sweep(cfg, mode, m)["curve"] for m in ms if m in LAMBDA_GRIDS}
                              for mode, ms in _merges(cfg).items()}}  # fmt: skip


def _merges(cfg: Config) -> dict[str, list[str]]:
    """The merges each mode's rows use: cfg.merges, and Task-Arithmetic under PERU-FFT in any case."""
    return {"full": list(dict.fromkeys(("task-arithmetic", *cfg.merges))), "lora": list(cfg.merges)}


def _read(path: Path, cfg: Config) -> list[dict[str, Any]]:
    """Rows of an earlier run with the same settings (any other settings start afresh)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data["rows"] if data.get("config") == json.loads(json.dumps(_meta(cfg))) else []


def _write(path: Path, cfg: Config, results: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": _meta(cfg), "rows": results}, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- table and plots


def markdown(results: list[dict[str, Any]], tasks: tuple[str, ...]) -> str:
    """The table in the paper's layout: accuracy in %, params in millions, bytes in MB."""
    head_ = ["", "method", "setting", "params (M)", "MB on disk", *tasks, "avg"]
    lines = ["| " + " | ".join(head_) + " |", "|" + "---|" * len(head_)]
    for r in results:
        cells = [r["group"], r["method"], r["setting"], f"{r['params'] / 1e6:.1f}", f"{r['bytes'] / 1e6:.1f}",
                 *(f"{100 * r['accuracy'][t]:.1f}" for t in tasks), f"**{100 * r['average']:.1f}**"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(results: list[dict[str, Any]], curves: dict[str, dict[str, list[list[float]]]], out: Path) -> None:
    """Average accuracy against m% (Post-Pruning vs PERU-FFT), against q (PERU-LoRA), against bytes,
    and the validation accuracy of the λ sweeps (`curves`: mode -> merge -> [[λ, accuracy]])."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(group: str, method: str) -> tuple[list[float], list[float]]:
        pts = [(float(r["setting"].strip("%q=")), 100 * r["average"])
               for r in results if r["group"] == group and r["method"] == method]  # fmt: skip
        return [x for x, _ in pts], [y for _, y in pts]

    lora_groups = [g for g in dict.fromkeys(r["group"] for r in results) if g.startswith("LoRA")]

    def line(ax: Any, group: str, method: str, **kw: Any) -> None:
        for r in results:
            if r["group"] == group and r["method"] == method:
                ax.axhline(100 * r["average"], **kw)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in ("Post-Pruning", "PERU-FFT"):
        ax.plot(*series("FFT", method), marker="o", label=method)
    line(ax, "FFT", "Single-Task", color="k", ls="--", label="Single-Task")
    line(ax, "FFT", "Task-Arithmetic", color="gray", ls=":", label="Task-Arithmetic")
    ax.set(xlabel="m (% of all model entries kept per task)", ylabel="average accuracy (%)", title="Fully fine-tuned")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fft_vs_m.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    qs: set[float] = set()
    for group, color in zip(lora_groups, ("C0", "C2")):
        rank = next(r["setting"] for r in results if r["group"] == group and r["method"] == "Single-Task")
        for method, style in (("PERU-LoRA", "-"), ("Approx(A)·Approx(B)ᵀ", ":")):
            x, y = series(group, method)
            if x:
                ax.plot(x, y, marker="o", color=color, ls=style, label=f"{method} ({rank})")
                qs.update(x)
        line(ax, group, "Single-Task", color=color, ls="--", label=f"Single-Task LoRA ({rank})")
    ax.set(xscale="log", xlabel="q (rank kept)", ylabel="average accuracy (%)", title="LoRA fine-tuned")
    ax.set_xticks(sorted(qs), [f"{q:g}" for q in sorted(qs)])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lora_vs_q.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # ~17 series: the default 10 colours repeat
    for method in dict.fromkeys(r["method"] for r in results):
        pts = [r for r in results if r["method"] == method]
        for group, marker in zip(["-", "FFT", *lora_groups], "*os^"):
            sel = [r for r in pts if r["group"] == group]
            if sel:
                ax.plot([r["bytes"] / 1e6 for r in sel], [100 * r["average"] for r in sel], marker=marker, ls="-",
                        label=f"{method} ({group})" if group != "-" else method)  # fmt: skip
    ax.set(xscale="log", xlabel="MB on disk, all tasks", ylabel="average accuracy (%)",
           title="Accuracy against storage")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # after the scale, which resets it
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, by_merge in curves.items():
        for merge, curve in by_merge.items():
            ax.plot(*zip(*((lam, 100 * acc) for lam, acc in curve)), marker=".", label=f"{MERGE_NAMES[merge]} ({mode})")
    ax.set(xlabel="λ", ylabel="average validation accuracy (%)", title="Choosing λ on the validation split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lambda_sweep.png", dpi=120)
    plt.close("all")


# ---------------------------------------------------------------- command line


def smoke_config(tasks: tuple[str, ...], cache: Path, checkpoint_cache: Path | None = None) -> Config:
    """A run of every kind of row in a minute or two: 3-step checkpoints, one m, q = 2 and 16 (and 2
    of r = 32), one merge."""
    return Config(tasks, steps=3, n_train=64, n_stats=8, n_val=16, limit=32, cache=cache,
                  checkpoint_cache=checkpoint_cache, keeps=(0.1,), ranks=(2, LORA_RANK), merges=("task-arithmetic",),
                  wide_rank=32, wide_ranks=(2,))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python -m tools.paper_table``."""
    p = argparse.ArgumentParser(prog="python -m tools.paper_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=parse_tasks, default=",".join(TASKS),
                   help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps of the checkpoints (batch 32)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--n-stats", type=int, default=256, help="validation examples per task for Fisher / Gram")
    p.add_argument("--n-val", type=int, default=250, help="validation examples per task that choose λ")
    p.add_argument("--limit", type=int, default=None, help="test examples per task (default: all)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--smoke", action="store_true", help="a quick check of every kind of row (see smoke_config)")
    args = p.parse_args(argv)
    tasks = args.tasks
    cfg = Config(tasks, args.steps, n_stats=args.n_stats, n_val=args.n_val, limit=args.limit, cache=args.cache)
    if args.smoke:
        cfg = smoke_config(tasks, args.cache)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    start = time.perf_counter()
    results = run(cfg, args.out)
    print(markdown(results, tasks), end="")
    print(f"({len(results)} rows, {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
