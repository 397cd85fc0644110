"""Average accuracy against bits per parameter of every way modelstore keeps a task, on the real
MiniLM tasks of tools.paper_table, each variant loaded back from a real store.

Rows: PERU-FFT × {float16, int8, int4} × m, Post-Pruning and DARE (float16, int4; int4 with a
second seed at m ≤ 5%, and with its positions re-drawn from the seed instead of stored) at each
m, TALL masks, EMR, BitDelta, Exact (kind "exact", bit for bit), the reference points
Task-Arithmetic, TIES (one model) and Single-Task (the originals), and the calibration-driven rows
(issue 25), calibrated on the first 256 examples of each task's validation split through its
frozen prompt head: Calibrated (modelstore chooses each task's setting, the cheapest with top-1
agreement ≥ 0.9 / 0.95 / 0.98 / 0.99 / 0.995 with the original, or a mean KL ≤ 0.01 / 0.02;
Calibrated seeded: the same with DARE's positions re-drawn) and DAREx-q int4 (DARE at m = 1, 2%
with its rescale tuned on the calibration data). Without
modelstore.Calibration the calibrated rows are left out. `bits_per_param` is a task's own stored
bytes × 8 per parameter of its model, averaged over the tasks (the shared bases not counted: they
are paid once); `bytes` is what the whole row costs on disk, bases included; `agreement` is each
task's top-1 agreement with its original over the test split. Stores are cached under the paper
table's cache directory, rows in results.json: a rerun evaluates only the rows missing there.
Checkpoints are never fine-tuned here (except --smoke's 3-step ones): a missing one is an error.

    python -m tools.frontier                       # all 8 tasks, 150-step checkpoints
    python -m tools.frontier --regime long         # 1000-step checkpoints of 4 tasks, results in long/
    python -m tools.frontier --tasks rt,trump --smoke --out /tmp/frontier
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

import modelstore
from modelstore.fidelity.metrics import agreement_low
from tools.finetune import (
    accuracy,
    checkpoint_dir,
    head,
    load_state_dict,
    logits,
    predictions,
    pretrained_path,
)
from tools.paper_table import (
    DEFAULT_CACHE,
    ROOT,
    Config,
    _base_variant,
    _open,
    _originals,
    checkpoints,
    fft_store,
    merge_options,
    smoke_config,
)
from tools.tasks import TASKS, load_task, parse_tasks

KEEPS = (0.01, 0.02, 0.05, 0.1, 0.2)
VALUE_DTYPES = ("float16", "int8", "int4")
DARE_VALUE_DTYPES = ("float16", "int4")
Target = tuple[str, float]
"""A calibrated row's target: ("agreement", a), top-1 agreement with the original at least a
(min_agreement), or ("kl", k), mean KL from the original at most k (max_kl)."""
TARGETS: tuple[Target, ...] = (*(("agreement", a) for a in (0.9, 0.95, 0.98, 0.99, 0.995)), ("kl", 0.01), ("kl", 0.02))
"""What the calibrated rows ask of each task."""
DAREX_KEEPS = (0.01, 0.02)
N_CALIBRATION = 256
"""Calibration examples per task: the first of its validation split (never its test split)."""
CALIBRATED = ("Calibrated", "Calibrated seeded", "DAREx-q int4")
"""Methods whose rows need modelstore.Calibration (calibration-driven selection, FIDELITY.md)."""
_BUILD_KEYS = ("merge", "merge_options", "kind", "keep", "granularity", "value_dtype")
"""Keywords `modelstore.build` takes itself; a setting's other kind options go in its `kind_options`."""
LONG_TASKS = ("rt", "healthsrc", "wn_noun", "wn_verb")
LONG_METHODS = frozenset({"PERU-FFT float16", "PERU-FFT int4", "DARE", "DARE int4", "DARE int4 seeded", "TALL masks",
                          "EMR", "BitDelta",
                          "Exact", "Task-Arithmetic", "Single-Task", *CALIBRATED})  # fmt: skip


@dataclass(frozen=True)
class Regime:
    """A set of checkpoints and the rows run on them, with their own results directory."""

    steps: int
    tasks: tuple[str, ...]
    methods: frozenset[str] | None
    """Rows kept (None: all)."""
    out: Path


REGIMES = {
    "short": Regime(150, TASKS, None, ROOT / "docs" / "results" / "frontier"),
    "long": Regime(1000, LONG_TASKS, LONG_METHODS, ROOT / "docs" / "results" / "frontier" / "long"),
}


@dataclass(frozen=True)
class Plan:
    """Which rows a run makes: the m of the fixed rows, the agreement targets of the calibrated rows,
    the m of the DAREx-q rows, the calibration size, and the methods kept (None: all)."""

    keeps: tuple[float, ...] = KEEPS
    targets: tuple[Target, ...] = TARGETS
    darex_keeps: tuple[float, ...] = DAREX_KEEPS
    n_calibration: int = N_CALIBRATION
    methods: frozenset[str] | None = None


class Made(NamedTuple):
    """A row's variant: each task's weights, bits per parameter (averaged), bytes on disk, and the
    store entries and bits per parameter of its tasks (empty for the rows that are no store task)."""

    models: Callable[[str], Any]
    bits_per_param: float
    bytes: int
    entries: dict[str, Any]
    task_bits: dict[str, float]


def bits_per_param(store: modelstore.Store, task: str) -> float:
    """The task's stored bytes × 8 per parameter of its model (the shared bases not counted)."""
    n = sum(math.prod(t["shape"]) for t in store.table(task))
    return store.entry(task)["bytes"] * 8 / n


def missing_checkpoints(cfg: Config) -> list[str]:
    """The tasks of `cfg` whose full fine-tune is not cached yet (a run would start fine-tuning them)."""
    return [t for t in cfg.tasks if not checkpoint_dir(t, "full", cfg.steps, n_train=cfg.n_train,
                                                       cache_dir=cfg.checkpoint_cache).is_dir()]  # fmt: skip


def _store(cfg: Config, name: str, make: Callable[[str], object]) -> modelstore.Store:
    """The cached store `name`, made by `make(path)` when missing or unreadable."""
    path = cfg.dir / "frontier" / name
    if _open(path) is None:
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        make(str(path))
    return modelstore.open(str(path))


Options = Mapping[str, Any] | Callable[[str], Mapping[str, Any]]
"""add_task's keywords of a setting, or a function of the task giving them (a task's calibration data)."""


def _variant(cfg: Config, store_name: str, build: Callable[[], Mapping[str, Any]],
             settings: Mapping[str, Options]) -> Callable[[str], Made]:
    """A store built with `build()` and its first setting (the same keywords for every task); each
    task is added at any other setting as ``<task>-<setting>`` when a row first asks for it.
    Returns a function of a setting giving its Made."""

    def make(path: str) -> None:
        first, opts = next(iter(settings.items()))
        assert not callable(opts), "a store's first setting is built, so the same for every task"
        own = {k: v for k, v in opts.items() if k in _BUILD_KEYS}
        kind_options = {k: v for k, v in opts.items() if k not in _BUILD_KEYS}
        modelstore.build(path, str(pretrained_path()),
                         {f"{t}-{first}": str(p) for t, p in checkpoints(cfg, "full").items()},
                         **build(), **own, kind_options=kind_options)  # fmt: skip

    def at(setting: str) -> Made:
        s = _store(cfg, store_name, make)
        names = {t: f"{t}-{setting}" for t in cfg.tasks}
        missing = [t for t, n in names.items() if n not in s.tasks()]
        if missing:
            writer, opts, ckpts = modelstore.open(s.url, mode="a"), settings[setting], checkpoints(cfg, "full")
            for t in missing:
                writer.add_task(names[t], str(ckpts[t]), **(opts(t) if callable(opts) else opts))
            s = modelstore.open(s.url)
        entries = {t: s.entry(n) for t, n in names.items()}
        bases = {b for e in entries.values() for b in e.get("bases", [e["base"]])}
        cost = sum(s.info()["bases"][b]["bytes"] for b in bases) + sum(e["bytes"] for e in entries.values())
        bits = {t: bits_per_param(s, n) for t, n in names.items()}
        return Made(lambda t: s.load(names[t]), sum(bits.values()) / len(bits), cost, entries, bits)

    return at


@functools.cache
def calibration(task: str, n: int) -> Any:
    """The first `n` validation examples of `task`, with the outputs of its frozen prompt head (the
    checkpoint is a bare encoder): what calibrated add-task compares the stored task on."""
    spec, task_head = load_task(task), head(task)

    def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits(model, batch["input_ids"], batch["attention_mask"], task_head)

    return modelstore.Calibration(list(spec.val_texts[:n]), outputs=outputs, max_length=spec.max_len,
                                  name=f"{task} val[:{n}]")  # fmt: skip


def rows(cfg: Config, plan: Plan) -> list[tuple[str, str, Callable[[], Made]]]:
    """(method, setting, variant maker) of every row of `plan` (nothing is built until a maker runs)."""
    def ta() -> dict[str, Any]:
        return {"merge": "task-arithmetic", "merge_options": merge_options(cfg, "full", "task-arithmetic")}

    by_m = {f"m{100 * k:g}": {"keep": k} for k in plan.keeps}
    top_m = {m: {**o, "sparsify": "magnitude"} for m, o in by_m.items()}
    out: list[tuple[str, str, Callable[[], Made]]] = []
    for vd in VALUE_DTYPES:
        peru = _variant(cfg, f"peru-{vd}", ta, {m: {**o, "value_dtype": vd} for m, o in top_m.items()})
        out += [(f"PERU-FFT {vd}", m, lambda p=peru, m=m: p(m)) for m in by_m]
    post = _variant(cfg, "post-pruning", lambda: {"merge": "none"}, {m: {**o, "value_dtype": "float16"}
                                                                       for m, o in top_m.items()})
    out += [("Post-Pruning", m, lambda m=m: post(m)) for m in by_m]
    for vd in DARE_VALUE_DTYPES:  # DARE's drop as the sparsifier, with float16 and with int4 values
        dare = _variant(cfg, "dare" if vd == "float16" else f"dare-{vd}", ta,
                        {m: {**o, "sparsify": "dare", "value_dtype": vd} for m, o in by_m.items()})
        out += [("DARE" if vd == "float16" else f"DARE {vd}", m, lambda d=dare, m=m: d(m)) for m in by_m]
    low = {m: o for m, o in by_m.items() if o["keep"] <= 0.05}  # DARE's drop is random: a second seed
    again = _variant(cfg, "dare-int4-seed1", ta, {m: {**o, "sparsify": "dare", "value_dtype": "int4", "seed": 1}
                                                 for m, o in low.items()})
    out += [("DARE int4 seed 1", m, lambda m=m: again(m)) for m in low]
    # the same draws as DARE int4, its positions not stored but re-drawn from the seed on a load
    seeded = _variant(cfg, "dare-int4-seeded", ta, {m: {**o, "sparsify": "dare", "value_dtype": "int4",
                                                         "positions": "seeded"} for m, o in by_m.items()})
    out += [("DARE int4 seeded", m, lambda m=m: seeded(m)) for m in by_m]
    for method, name, build in (("TALL masks", "tall", {"kind": "tall-mask", "merge_options": {"lam": 1.0}}),
                                ("EMR", "emr", {"kind": "emr"}), ("BitDelta", "bitdelta", {"kind": "bitdelta",
                                                                                         "merge": "none"})):
        make = _variant(cfg, name, lambda: {}, {"1bit": build})
        out.append((method, "1 bit", lambda f=make: f("1bit")))
    for merge, label in (("task-arithmetic", "Task-Arithmetic"), ("ties", "TIES")):
        def merged(merge: str = merge) -> Made:
            v = _base_variant(fft_store(cfg, "full", merge, (plan.keeps[-1],)), "merged")
            return Made(v.models, 0.0, v.bytes, {}, {})
        out.append((label, "", merged))

    def single() -> Made:
        v = _originals(cfg, "full")
        return Made(v.models, 8 * v.bytes / v.params, v.bytes, {}, {})
    out.append(("Single-Task", "", single))
    # Exact, and the calibrated rows, share one store on the Task-Arithmetic base of PERU-FFT and DARE.
    n = plan.n_calibration
    chosen: dict[str, Options] = {"exact": {"kind": "exact"}}
    for positions in ("stored", "seeded"):
        chosen |= {_target_name(g, n, positions): lambda t, g=g, p=positions: {
                       "calibration": calibration(t, n), ("min_agreement" if g[0] == "agreement" else "max_kl"): g[1],
                       **({"positions": p} if p == "seeded" else {})}
                   for g in plan.targets}  # fmt: skip
    chosen |= {f"darex-m{100 * k:g}-val{n}": lambda t, k=k: {"sparsify": "dare", "value_dtype": "int4", "keep": k,
                                                             "calibration": calibration(t, n)}
               for k in plan.darex_keeps}  # fmt: skip
    calibrated = _variant(cfg, "calibrated", ta, chosen)
    out.append(("Exact", "bit for bit", lambda: calibrated("exact")))
    out += [("Calibrated" if p == "stored" else "Calibrated seeded", target_label(g),
             lambda g=g, p=p: calibrated(_target_name(g, n, p))) for p in ("stored", "seeded") for g in plan.targets]
    out += [("DAREx-q int4", f"m{100 * k:g}", lambda k=k: calibrated(f"darex-m{100 * k:g}-val{n}"))
            for k in plan.darex_keeps]
    return [r for r in out if plan.methods is None or r[0] in plan.methods]


def _target_name(target: Target, n: int, positions: str = "stored") -> str:
    """The store's task name suffix of a calibrated row: ``a0.99-val256``, ``kl0.02-val256``, and
    ``a0.99-val256-seeded`` where DARE candidates re-draw their positions."""
    return f"{'a' if target[0] == 'agreement' else 'kl'}{target[1]:g}-val{n}" + (
        "-seeded" if positions == "seeded" else "")


def target_label(target: Target) -> str:
    """A calibrated row's setting: ``agreement ≥ 0.99``, ``mean KL ≤ 0.02``."""
    return f"agreement ≥ {target[1]:g}" if target[0] == "agreement" else f"mean KL ≤ {target[1]:g}"


def parse_targets(text: str) -> tuple[Target, ...]:
    """``0.99,0.995,kl0.02`` as targets: a number is an agreement, ``kl`` before it a mean KL."""
    out: list[Target] = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        metric, number = ("kl", item[2:]) if item.startswith("kl") else ("agreement", item)
        try:
            out.append((metric, float(number)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"target {item!r} is not a number or kl<number>, e.g. 0.99 or kl0.02") from None
    return tuple(out)


def _summary(entry: Mapping[str, Any], bits: float) -> dict[str, Any]:
    """What a results row keeps of a calibrated task's fidelity record (the whole record stays in the
    store); `bits`: the task's bits per parameter."""
    f = entry["fidelity"]
    return {"setting": f["setting"], "metric": f["metric"], "target": f["target"], "met": f["met"],
            "calibration_agreement": f["agreement"], "mean_kl": f["mean_kl"], "examples": f["examples"],
            "seconds": f["seconds"], "bytes": entry["bytes"], "bits_per_param": bits,
            "candidates": [[setting_label(c["setting"]), c["bytes"], c["agreement"], c["met"]]
                           for c in f["candidates"]]}  # fmt: skip


def setting_label(setting: Mapping[str, Any]) -> str:
    """A chosen setting in a few words: ``dare int4 m2 q0.03``, ``magnitude float16 m10``, ``exact``."""
    if setting["kind"] != "fft":
        return str(setting["kind"])
    label = f"{setting.get('sparsify', 'magnitude')} {setting['value_dtype']} m{100 * setting['keep']:g}"
    return label + (f" q{setting['dare_q']:.3g}" if setting.get("dare_q") is not None else "")


class OtherTasksError(ValueError):
    """The results file of a run holds rows of other tasks."""


def run(cfg: Config, plan: Plan, out: Path) -> list[dict[str, Any]]:
    """Evaluate every row of `plan` not yet in `out`/results.json (saved row by row), then write the
    tables and the plot. A row records each task's accuracy and its top-1 agreement with the
    original (Single-Task) on the test split; a calibrated row also what the selection chose."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    done = {(r["method"], r["setting"]): r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    other = next((r for r in done.values() if set(r["accuracy"]) != set(cfg.tasks)), None)
    if other is not None:
        raise OtherTasksError(f"{path} holds rows of tasks {','.join(other['accuracy'])}, not {','.join(cfg.tasks)}: "
                         "give another --out")
    todo = rows(cfg, plan)
    if not hasattr(modelstore, "Calibration") and any(m in CALIBRATED for m, _, _ in todo):
        print("modelstore.Calibration is missing: the calibrated rows are left out", file=sys.stderr)
        todo = [r for r in todo if r[0] not in CALIBRATED]
    original: dict[str, torch.Tensor] = {}

    def reference(t: str) -> torch.Tensor:
        if t not in original:
            original[t] = predictions(load_state_dict(checkpoints(cfg, "full")[t]), t, limit=cfg.limit)
        return original[t]

    for method, setting, make in todo:
        if (method, setting) in done:
            continue
        start = time.perf_counter()
        made = make()
        pred = {t: predictions(made.models(t), t, limit=cfg.limit) for t in cfg.tasks}
        if method == "Single-Task":
            original.update(pred)
        acc = {t: accuracy(p, t) for t, p in pred.items()}
        row = {"method": method, "setting": setting, "accuracy": acc, "average": sum(acc.values()) / len(acc),
               "agreement": {t: int((p == reference(t)).sum()) / len(p) for t, p in pred.items()},
               "bits_per_param": made.bits_per_param, "bytes": made.bytes}  # fmt: skip
        chosen = {t: _summary(e, made.task_bits[t]) for t, e in made.entries.items() if "fidelity" in e}
        if chosen:
            row["selection"] = chosen
        done[method, setting] = {**row, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{method:20} {setting:6} avg {row['average']:.3f}  {made.bits_per_param:.3f} bits/param",
              file=sys.stderr)
        path.write_text(json.dumps(list(done.values()), indent=1, ensure_ascii=False))
    results = list(done.values())
    plot(results, out / "frontier.png")
    (out / "results.md").write_text(report(results, cfg.tasks))
    return results


def table(results: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    """The rows as a markdown table: bits per parameter, average and per-task accuracy (%)."""
    lines = ["| method | setting | bits / param | avg | " + " | ".join(tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for r in results:
        accs = " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks)
        lines.append(f"| {r['method']} | {r['setting']} | {r['bits_per_param']:.3f} | **{100 * r['average']:.1f}** "
                     f"| {accs} |")
    return "\n".join(lines) + "\n"


HELD = 0.02
"""How far a task's test agreement may fall below its calibration agreement and still count as held."""


def _held(test: float, sel: Mapping[str, Any]) -> tuple[bool, bool | None, bool]:
    """Whether a task's test agreement stayed within HELD under its calibration agreement, met its
    target (None where the row has no agreement target), and stayed at or above the one-sided 95%
    lower bound of its calibration agreement (the record's `agreement_low`, recomputed for records
    written before it)."""
    met = bool(test >= sel["target"]) if sel["target"] is not None and sel["metric"] == "agreement" else None
    low = agreement_low(sel["calibration_agreement"], sel["examples"])
    return test >= sel["calibration_agreement"] - HELD, met, test >= low


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else "yes" if ok else "**no**"


def selection_table(results: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    """The calibrated rows: first one line per row (on how many tasks the test agreement held, the
    selection's total seconds), then per task the setting chosen, the candidates tried, the seconds,
    its agreement with the original on the calibration data and on the whole test split, and
    whether the test agreement held: within HELD under the calibration agreement, and at or above
    the target where there is one."""
    chosen = [r for r in results if "selection" in r]
    lines = ["| method | setting | bits / param | avg | test ≥ cal − 0.02 | test ≥ target | test ≥ 95% bound "
             "| mean test agreement | selection seconds |", "|---" * 9 + "|"]
    for r in chosen:
        held = [_held(r["agreement"][t], r["selection"][t]) for t in tasks]
        met = "-" if held[0][1] is None else f"{sum(bool(h[1]) for h in held)}/{len(tasks)}"
        lines.append(f"| {r['method']} | {r['setting']} | {r['bits_per_param']:.3f} | {100 * r['average']:.1f} "
                     f"| {sum(h[0] for h in held)}/{len(tasks)} | {met} | {sum(h[2] for h in held)}/{len(tasks)} "
                     f"| {sum(r['agreement'][t] for t in tasks) / len(tasks):.4f} "
                     f"| {sum(r['selection'][t]['seconds'] for t in tasks):.0f} |")  # fmt: skip
    lines += ["", "| method | setting | task | chosen | candidates | seconds | bits / param | calibration agreement "
                  "| test agreement | test ≥ cal − 0.02 | test ≥ target | test ≥ 95% bound | accuracy |",
              "|---" * 13 + "|"]
    for r in chosen:
        for t in tasks:
            sel, test = r["selection"][t], r["agreement"][t]
            near, met, bound = _held(test, sel)
            lines.append(f"| {r['method']} | {r['setting']} | {t} | {setting_label(sel['setting'])} "
                         f"| {len(sel['candidates'])} | {sel['seconds']:.0f} | {sel['bits_per_param']:.3f} "
                         f"| {sel['calibration_agreement']:.4f} | {test:.4f} | {_yes(near)} | {_yes(met)} "
                         f"| {_yes(bound)} | {100 * r['accuracy'][t]:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def report(results: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    """results.md: the table of every row, then what the calibrated rows chose, task by task."""
    text = table(results, tasks)
    if any("selection" in r for r in results):
        text += "\n## Calibration-driven selection\n\n" + selection_table(results, tasks)
    return text


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Average accuracy against bits per parameter, one line per method; the calibrated rows are
    stars (each a target, each task at the setting chosen for it), labelled with their target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "os^vD<>Pph"
    for i, method in enumerate(dict.fromkeys(r["method"] for r in results)):
        pts = sorted((r["bits_per_param"], r["average"], r["setting"]) for r in results if r["method"] == method)
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        color = plt.cm.tab20(i % 20)
        if method.startswith("Calibrated"):
            ax.plot(x, y, ls="none", marker="*", markersize=14, color="gold" if method == "Calibrated" else "orange",
                    markeredgecolor="k", label=method, zorder=3)  # fmt: skip
            for bx, by, setting in pts:
                label = setting.split()[-1] if setting.startswith("agreement") else f"KL {setting.split()[-1]}"
                ax.annotate(label, (bx, by), textcoords="offset points", xytext=(6, -10), fontsize=7)
        else:
            ax.plot(x, y, marker=markers[i % len(markers)], color=color, label=method)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("bits per parameter of a task (bases not counted)")
    ax.set_ylabel("average accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _methods(text: str) -> frozenset[str]:
    names = frozenset(m.strip() for m in text.split(",") if m.strip())
    known = {m for m, _, _ in rows(Config(TASKS), Plan())}
    unknown = sorted(names - known)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r}; from: {', '.join(sorted(known))}")
    return names


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python -m tools.frontier``."""
    p = argparse.ArgumentParser(prog="python -m tools.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=REGIMES, default="short",
                   help="short: 150-step checkpoints of the 8 tasks, every row; long: 1000-step checkpoints of "
                        f"{','.join(LONG_TASKS)}, the rows that matter (docs/results/frontier/long)")
    p.add_argument("--tasks", type=parse_tasks, default=None, help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps of the checkpoints (batch 32)")
    p.add_argument("--methods", type=_methods, default=None,
                   help="only these rows (comma-separated methods, e.g. 'Exact,Calibrated,DAREx-q int4')")
    p.add_argument("--targets", type=parse_targets, default=None,
                   help="the calibrated rows' targets, in this order (comma-separated: 0.99 is an agreement, "
                        "kl0.02 a mean KL; default: all of " + ",".join(f"{'kl' if m == 'kl' else ''}{v:g}" for m, v in
                                                                        TARGETS) + ")")
    p.add_argument("--limit", type=int, default=None, help="test examples per task (default: all)")
    p.add_argument("--out", type=Path, default=None, help="default: the regime's directory under docs/results")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--smoke", action="store_true",
                   help="3-step checkpoints, 32 test examples, m = 10%% only, one target, 32 calibration examples")
    args = p.parse_args(argv)
    regime = REGIMES[args.regime]
    tasks, methods = args.tasks or regime.tasks, args.methods or regime.methods
    cfg = Config(tasks, args.steps or regime.steps, limit=args.limit, cache=args.cache)
    plan = Plan(methods=methods) if args.targets is None else Plan(targets=args.targets, methods=methods)
    if args.smoke:
        cfg = smoke_config(tasks, args.cache)
        plan = Plan(keeps=(0.1,), targets=args.targets or (("agreement", 0.99),), darex_keeps=(0.01,),
                    n_calibration=32, methods=methods)
    elif missing := missing_checkpoints(cfg):  # a long fine-tune takes most of an hour: never start one here
        p.exit(1, f"no {cfg.steps}-step checkpoint of {','.join(missing)} yet (fine-tunes running?); make each with "
                  f"python -m tools.finetune --task TASK --mode full --steps {cfg.steps} --no-eval\n")
    try:
        results = run(cfg, plan, args.out or regime.out)
    except OtherTasksError as e:
        p.exit(1, f"{e}\n")
    for r in results:
        print(f"{r['method']:20} {r['setting']:6} {r['average']:.3f} {r['bits_per_param']:.3f} {r['bytes']}")


if __name__ == "__main__":
    main()
