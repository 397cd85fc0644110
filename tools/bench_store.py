"""Benchmark of the store core on a synthetic model: build, load, and top-k.

Every figure is reported next to a baseline measured in the same process:
- build time per task against reading and writing the full checkpoint with safetensors,
- load time of a task (base cached / cold) against reading the full checkpoint into memory
  (safetensors.load_file + a copy of each tensor, since load_file alone only maps the file),
- bytes on disk against the full checkpoint,
- the exact streaming radix top-k against numpy partition and torch.topk over the same deltas,
- `modelstore.sync` of the whole store to a new local directory against shutil.copytree of it.

    python -m tools.bench_store --params 50e6 --tasks 3 --keep 0.1
    MODELSTORE_DELTA_CACHE_BYTES=0 python -m tools.bench_store   # fully streaming top-k
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modelstore
from modelstore.kinds.fft.topk import find_cut, kept_count, magnitude_bits


def synthetic(root: str, params: float, tasks: int, dtype: torch.dtype) -> tuple[str, dict[str, str]]:
    """A pre-trained model of square layers and `tasks` fine-tunes with sparse-ish deltas."""
    g = torch.Generator().manual_seed(0)
    d = 1024
    layers = max(1, int(params // (d * d)))
    base = {f"layer.{i}.weight": (torch.randn(d, d, generator=g) * 0.02).to(dtype) for i in range(layers)}
    base["norm.weight"] = torch.ones(d, dtype=dtype)
    save_file(base, f"{root}/pre.safetensors")
    paths = {}
    for t in range(tasks):
        sd = {}
        for k, v in base.items():
            delta = torch.randn(v.shape, generator=g) * 2e-4
            big = torch.rand(v.shape, generator=g) < 0.02
            delta[big] *= 20
            sd[k] = (v.float() + delta).to(dtype)
        paths[f"task{t}"] = f"{root}/task{t}.safetensors"
        save_file(sd, paths[f"task{t}"])
    return f"{root}/pre.safetensors", paths


class PeakAnon:
    """Peak anonymous memory (RssAnon: not the mmap'd checkpoint pages) while a block runs."""

    def __enter__(self):
        import threading
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def proc_bytes(path: str, key: str) -> int:
    """A "key: N kB" figure of a /proc file in bytes (0 where there is none)."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_anon() -> int:
    return proc_bytes("/proc/self/status", "RssAnon")


def setting(path: str) -> dict[str, str]:
    """What its recorded figures measured: a magnitude top-m with values in the checkpoint's float
    dtype (bfloat16 for a bf16 checkpoint, else float16)."""
    with safe_open(path, "pt") as f:
        bf16 = f.get_slice(next(iter(f.keys()))).get_dtype() == "BF16"
    return {"sparsify": "magnitude", "value_dtype": "bfloat16" if bf16 else "float16"}


def _child_add_task(store: str, path: str, keep: float, threads: int, out) -> None:
    torch.set_num_threads(threads)
    before = rss_anon()
    with PeakAnon() as peak:
        t0 = time.perf_counter()
        modelstore.add_task(store, "extra", path, keep=keep, **setting(path))
        seconds = time.perf_counter() - t0
    out.send((seconds, peak.peak - before))


def add_task_in_child(store: str, path: str, keep: float) -> tuple[float, int]:
    """add-task in a fresh process, so its peak anonymous memory is not hidden by this one's heap."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_add_task, args=(store, path, keep, torch.get_num_threads(), send))
    p.start()
    result = recv.recv()
    p.join()
    return result


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 gives steadier figures on a busy machine)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as root:
        pre, tasks = synthetic(root, a.params, a.tasks, dtype)
        full_bytes = os.path.getsize(pre)
        r: dict = {"params": a.params, "tasks": a.tasks, "keep": a.keep, "dtype": a.dtype,
                   "threads": torch.get_num_threads()}

        # baselines: read + write one full checkpoint, read one full checkpoint
        def copy_full():
            save_file(load_file(tasks["task0"]), f"{root}/copy.safetensors")
        r["baseline_copy_s"], _ = timed(copy_full, 2)
        r["baseline_load_full_s"], _ = timed(lambda: {k: v.clone() for k, v in load_file(tasks["task0"]).items()}, 3)

        t_build, store = timed(lambda: modelstore.build(f"{root}/store", pre, tasks, keep=a.keep, **setting(pre)))
        r["build_s"] = t_build
        r["build_per_task_vs_copy"] = t_build / (a.tasks + 1) / r["baseline_copy_s"]
        t_add, extra = add_task_in_child(f"{root}/store", tasks["task0"], a.keep)
        r["add_task_s"] = t_add
        r["add_task_extra_anon_bytes"] = extra
        r["add_task_extra_anon_vs_full"] = extra / full_bytes
        r["add_task_vs_copy"] = t_add / r["baseline_copy_s"]

        s = modelstore.open(f"{root}/store")
        r["load_cold_s"], _ = timed(lambda: modelstore.open(f"{root}/store").load("task0"))
        s.load("task0")
        r["load_warm_s"], _ = timed(lambda: s.load("extra"), 3)
        r["load_warm_vs_load_full"] = r["load_warm_s"] / r["baseline_load_full_s"]
        r["load_cold_vs_load_full"] = r["load_cold_s"] / r["baseline_load_full_s"]
        info = s.info("task0")
        r["task_bytes"], r["full_bytes"] = info["bytes"], full_bytes
        r["task_bytes_vs_full"] = info["bytes"] / full_bytes
        r["store_bytes_vs_all_full"] = s.info()["bytes"] / (full_bytes * a.tasks)

        r["baseline_copytree_s"], _ = timed(
            lambda: shutil.copytree(f"{root}/store", f"{root}/tree-{time.time_ns()}"), 2)
        r["sync_s"], _ = timed(lambda: modelstore.sync(f"{root}/store", f"{root}/sync-{time.time_ns()}"), 2)
        r["sync_vs_copytree"] = r["sync_s"] / r["baseline_copytree_s"]

        # top-k: radix (two streaming passes) vs numpy partition vs torch.topk on the same |u|
        sd0, sd1 = load_file(pre), load_file(tasks["task0"])
        u = torch.cat([(sd1[k].float() - sd0[k].float()).reshape(-1) for k in sd0]).numpy()
        k = kept_count(a.keep, u.size)
        bits = magnitude_bits(torch.from_numpy(u))
        r["select_radix_s"], _ = timed(lambda: find_cut(k, lambda: iter([bits])), 2)
        r["select_np_partition_s"], _ = timed(lambda: np.partition(np.abs(u), u.size - k)[u.size - k], 2)
        r["select_torch_topk_s"], _ = timed(lambda: torch.topk(torch.from_numpy(u).abs(), k, sorted=False), 1)
        r["radix_vs_partition"] = r["select_radix_s"] / r["select_np_partition_s"]
        r["radix_vs_topk"] = r["select_radix_s"] / r["select_torch_topk_s"]
        r["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        r["max_rss_vs_full"] = r["max_rss_bytes"] / full_bytes
    if a.json:
        print(json.dumps(r, indent=2))
        return
    for key, v in r.items():
        print(f"{key:28} {v:.4g}" if isinstance(v, float) else f"{key:28} {v}")


if __name__ == "__main__":
    main()
