"""Benchmark of seeded DARE positions (`--positions seeded`) on a real pre-trained / fine-tuned pair:
the same task stored with its positions and seeded (no positions), at each keep m, int4 values.
Reports each task's bytes and bits per parameter, its weights' relative error ||θ̂t − θt|| / ||θt||
(seeded values keep their int4 zeros, stored ones drop them and regroup: not quite the same
weights), and its load time (the median of `--repeat` loads from one store with its base cached,
as a store serving several tasks keeps it; the tasks' loads interleaved so that a busy machine
slows both alike), with the seeded/stored ratios of each.

    python -m tools.bench_seeded PRE FT [--keeps 0.01 0.05 0.2] [--value-dtype int4] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import modelstore
from modelstore.build import init
from modelstore.evaluation.weights import verify


def measure(pre: str, ft: str, keeps: list[float], value_dtype: str, repeat: int, root: str) -> list[dict[str, Any]]:
    """One row per keep: bytes, bits per parameter and median load seconds of the stored and seeded task."""
    store = init(f"{root}/s", pre)
    names = {(m, pos): f"{pos}-{m:g}" for m in keeps for pos in ("stored", "seeded")}
    for (m, pos), name in names.items():
        store.add_task(name, ft, sparsify="dare", keep=m, value_dtype=value_dtype, positions=pos)
    warm = modelstore.open(store.url)  # the base is cached by the first load
    for name in names.values():
        warm.load(name)
    times: dict[str, list[float]] = {name: [] for name in names.values()}
    for _ in range(repeat):
        for name in names.values():
            t0 = time.perf_counter()
            warm.load(name)
            times[name].append(time.perf_counter() - t0)
    errors = {name: verify(warm, name, ft)["rel_error"] for name in names.values()}
    rows = []
    for m in keeps:
        e = {pos: store.entry(names[(m, pos)]) for pos in ("stored", "seeded")}
        t = {pos: statistics.median(times[names[(m, pos)]]) for pos in ("stored", "seeded")}
        rows.append({"keep": m, "value_dtype": value_dtype,
                     **{f"{pos}_bytes": e[pos]["bytes"] for pos in e},
                     **{f"{pos}_bits_per_param": round(8 * e[pos]["bytes"] / e[pos]["total"], 4) for pos in e},
                     **{f"{pos}_kept": e[pos]["kept"] for pos in e},
                     **{f"{pos}_rel_error": round(errors[names[(m, pos)]], 5) for pos in e},
                     **{f"{pos}_load_s": round(t[pos], 4) for pos in t},
                     "bytes_ratio": round(e["seeded"]["bytes"] / e["stored"]["bytes"], 3),
                     "load_ratio": round(t["seeded"] / t["stored"], 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pre")
    ap.add_argument("ft")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    ap.add_argument("--value-dtype", default="int4")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        rows = measure(a.pre, a.ft, a.keeps, a.value_dtype, a.repeat, root)
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print("| m | values | stored bits/param | seeded bits/param | bytes ratio | rel. error stored / seeded "
          "| stored load | seeded load | load ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['keep']:g} | {r['value_dtype']} | {r['stored_bits_per_param']:.3f} | "
              f"{r['seeded_bits_per_param']:.3f} | {r['bytes_ratio']:.2f} | "
              f"{r['stored_rel_error']:.4f} / {r['seeded_rel_error']:.4f} | {r['stored_load_s'] * 1e3:.0f} ms | "
              f"{r['seeded_load_s'] * 1e3:.0f} ms | {r['load_ratio']:.2f} |")


if __name__ == "__main__":
    main()
