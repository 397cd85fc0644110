"""Average accuracy against bits per parameter of every way modelstore keeps a task, on the real
MiniLM tasks of tools.paper_table, each variant loaded back from a real store.

Rows: PERU-FFT × {float16, int8, int4} × m, Post-Pruning and DARE (float16, int4; int4 with a
second seed at m ≤ 5%) at each m, TALL masks, EMR, BitDelta, and the reference points
Task-Arithmetic, TIES (one model) and Single-Task (the originals). `bits_per_param` is a task's own
stored bytes × 8 per parameter of its model, averaged over the tasks (the shared bases not counted:
they are paid once); `bytes` is what the whole row costs on disk, bases included. Stores are cached
under the paper table's cache directory.

    python -m tools.frontier                       # all 8 tasks, 150-step checkpoints
    python -m tools.frontier --tasks rt,trump --smoke --out /tmp/frontier
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import modelstore
from tools.finetune import evaluate, pretrained_path
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
from tools.tasks import TASKS, parse_tasks

KEEPS = (0.01, 0.02, 0.05, 0.1, 0.2)
VALUE_DTYPES = ("float16", "int8", "int4")
DARE_VALUE_DTYPES = ("float16", "int4")
_BUILD_KEYS = ("merge", "merge_options", "kind", "keep", "granularity", "value_dtype")
"""Keywords `modelstore.build` takes itself; a setting's other kind options go in its `kind_options`."""


def bits_per_param(store: modelstore.Store, task: str) -> float:
    """The task's stored bytes × 8 per parameter of its model (the shared bases not counted)."""
    n = sum(math.prod(t["shape"]) for t in store.table(task))
    return store.entry(task)["bytes"] * 8 / n


def _store(cfg: Config, name: str, make: Callable[[str], object]) -> modelstore.Store:
    """The cached store `name`, made by `make(path)` when missing or unreadable."""
    path = cfg.dir / "frontier" / name
    if _open(path) is None:
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        make(str(path))
    return modelstore.open(str(path))


def _variant(cfg: Config, store_name: str, build: dict[str, Any], settings: dict[str, dict[str, Any]]) -> Callable:
    """A store built with `build` (its first setting), each task also added at every other setting
    as ``<task>-<setting>``; returns a function of a setting giving (loader, bits_per_param, bytes)."""
    ckpts = checkpoints(cfg, "full")
    first, *rest = settings

    def make(path: str) -> None:
        own = {k: v for k, v in settings[first].items() if k in _BUILD_KEYS}
        kind_options = {k: v for k, v in settings[first].items() if k not in _BUILD_KEYS}
        modelstore.build(path, str(pretrained_path()), {f"{t}-{first}": str(p) for t, p in ckpts.items()},
                         **build, **own, kind_options=kind_options)
        s = modelstore.open(path, mode="a")
        for setting in rest:
            for t, p in ckpts.items():
                s.add_task(f"{t}-{setting}", str(p), **settings[setting])

    def at(setting: str) -> tuple[Callable[[str], dict], float, int]:
        s = _store(cfg, store_name, make)
        names = [f"{t}-{setting}" for t in cfg.tasks]
        bases = {b for n in names for b in s.entry(n).get("bases", [s.entry(n)["base"]])}
        cost = sum(s.info()["bases"][b]["bytes"] for b in bases) + sum(s.entry(n)["bytes"] for n in names)
        bpp = sum(bits_per_param(s, n) for n in names) / len(names)
        return (lambda t: s.load(f"{t}-{setting}")), bpp, cost

    return at


def rows(cfg: Config, keeps: tuple[float, ...]) -> list[tuple[str, str, Callable[[], tuple]]]:
    """(method, setting, variant maker) of every row."""
    ta = {"merge": "task-arithmetic", "merge_options": merge_options(cfg, "full", "task-arithmetic")}
    by_m = {f"m{100 * k:g}": {"keep": k} for k in keeps}
    out: list[tuple[str, str, Callable[[], tuple]]] = []
    for vd in VALUE_DTYPES:
        peru = _variant(cfg, f"peru-{vd}", ta, {m: {**o, "value_dtype": vd} for m, o in by_m.items()})
        out += [(f"PERU-FFT {vd}", m, lambda p=peru, m=m: p(m)) for m in by_m]
    post = _variant(cfg, "post-pruning", {"merge": "none"}, by_m)
    out += [("Post-Pruning", m, lambda m=m: post(m)) for m in by_m]
    for vd in DARE_VALUE_DTYPES:  # DARE's drop as the sparsifier, with float16 and with int4 values
        dtype = {} if vd == "float16" else {"value_dtype": vd}
        dare = _variant(cfg, "dare" if vd == "float16" else f"dare-{vd}", ta,
                        {m: {**o, "sparsify": "dare", **dtype} for m, o in by_m.items()})
        out += [("DARE" if vd == "float16" else f"DARE {vd}", m, lambda d=dare, m=m: d(m)) for m in by_m]
    low = {m: o for m, o in by_m.items() if o["keep"] <= 0.05}  # DARE's drop is random: a second seed
    again = _variant(cfg, "dare-int4-seed1", ta, {m: {**o, "sparsify": "dare", "value_dtype": "int4", "seed": 1}
                                                 for m, o in low.items()})
    out += [("DARE int4 seed 1", m, lambda m=m: again(m)) for m in low]
    for method, name, build in (("TALL masks", "tall", {"kind": "tall-mask", "merge_options": {"lam": 1.0}}),
                                ("EMR", "emr", {"kind": "emr"}), ("BitDelta", "bitdelta", {"kind": "bitdelta",
                                                                                         "merge": "none"})):
        make = _variant(cfg, name, {}, {"1bit": build})
        out.append((method, "1 bit", lambda f=make: f("1bit")))
    for merge, label in (("task-arithmetic", "Task-Arithmetic"), ("ties", "TIES")):
        def merged(merge: str = merge) -> tuple:
            v = _base_variant(fft_store(cfg, "full", merge, (keeps[-1],)), "merged")
            return v.models, 0.0, v.bytes
        out.append((label, "", merged))

    def single() -> tuple:
        v = _originals(cfg, "full")
        return v.models, 8 * v.bytes / v.params, v.bytes
    out.append(("Single-Task", "", single))
    return out


def run(cfg: Config, keeps: tuple[float, ...], out: Path) -> list[dict[str, Any]]:
    """Evaluate every row not yet in `out`/results.json (saved row by row), then plot."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    done = {(r["method"], r["setting"]): r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    for method, setting, make in rows(cfg, keeps):
        if (method, setting) in done:
            continue
        start = time.perf_counter()
        models, bpp, cost = make()
        acc = {t: evaluate(models(t), t, limit=cfg.limit) for t in cfg.tasks}
        done[method, setting] = {"method": method, "setting": setting, "accuracy": acc,
                                 "average": sum(acc.values()) / len(acc), "bits_per_param": bpp, "bytes": cost,
                                 "seconds": round(time.perf_counter() - start, 1)}
        print(f"{method:20} {setting:6} avg {done[method, setting]['average']:.3f}  {bpp:.3f} bits/param",
              file=sys.stderr)
        path.write_text(json.dumps(list(done.values()), indent=1))
    results = list(done.values())
    plot(results, out / "frontier.png")
    (out / "results.md").write_text(table(results, cfg.tasks))
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


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Average accuracy against bits per parameter, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "os^vD<>Pp*hX"
    for i, method in enumerate(dict.fromkeys(r["method"] for r in results)):
        pts = sorted((r["bits_per_param"], r["average"]) for r in results if r["method"] == method)
        ax.plot(*zip(*pts), marker=markers[i % len(markers)], color=plt.cm.tab20(i % 20), label=method)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("bits per parameter of a task (bases not counted)")
    ax.set_ylabel("average accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python -m tools.frontier``."""
    p = argparse.ArgumentParser(prog="python -m tools.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=parse_tasks, default=",".join(TASKS),
                   help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps of the checkpoints (batch 32)")
    p.add_argument("--limit", type=int, default=None, help="test examples per task (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "frontier")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--smoke", action="store_true", help="3-step checkpoints, 32 test examples, m = 10% only")
    args = p.parse_args(argv)
    cfg, keeps = Config(args.tasks, args.steps, limit=args.limit, cache=args.cache), KEEPS
    if args.smoke:
        cfg, keeps = smoke_config(args.tasks, args.cache), (0.1,)
    for r in run(cfg, keeps, args.out):
        print(f"{r['method']:20} {r['setting']:6} {r['average']:.3f} {r['bits_per_param']:.3f} {r['bytes']}")


if __name__ == "__main__":
    main()
