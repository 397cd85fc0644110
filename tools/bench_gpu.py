"""Benchmark of a load onto a GPU: a task of a Llama-shaped bf16 store against torch loading the full
checkpoint there.

Writes θ0 and one fine-tune θt (tools.bench_scale's synthetic sharded checkpoints, tensor by
tensor), stores θ0 as the base and θt as a task (top-`keep` of θt − θ0), then in fresh processes:

- torch: `safetensors.torch.load_file(shard, device=...)` of each shard of θt, the full checkpoint
  on the device (what a Hugging Face load of one fine-tune moves);
- load: `modelstore.open(store, cache_base=False).load(task, device=...)`, the base streamed into
  the output on the device and only the task's kept entries added there;

each with its time (CUDA initialised before the clock, synchronised before it stops), peak device
memory (`max_memory_allocated`, against the model's bytes; the goal is 1.1 x) and the bytes copied
host to device (summed from the profiler's memcpy records, in a second, profiled run). Then the
device's load is compared with a load on the CPU, tensor by tensor, bit for bit.

    python -m tools.bench_gpu --params 7e9 --dir /tmp/bench [--json]   # ~45 GB of disk for a while
    python -m tools.bench_gpu --params 1e8 --device cpu                 # the same steps on the CPU

Files are deleted at the end (or kept with --keep-files). On a machine without the packages zarr
needs, `tools/device_check.sh` installs them from wheels carried beside the checkout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from tools.bench_scale import (
    SETTING,
    finetune,
    fresh,
    llama_shapes,
    load_shards,
    pretrained,
    report,
    write_sharded,
)


def start(device: torch.device) -> None:
    """Initialise the device (CUDA's context takes seconds) and zero its peak-memory counter."""
    if device.type == "cuda":
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def finish(device: torch.device) -> dict[str, Any]:
    """Wait for the device; its peak memory since `start` (None off CUDA)."""
    if device.type != "cuda":
        return {"peak_allocated": None, "peak_reserved": None}
    torch.cuda.synchronize(device)
    return {"peak_allocated": torch.cuda.max_memory_allocated(device),
            "peak_reserved": torch.cuda.max_memory_reserved(device)}


def h2d_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes `fn` copies host to device, from the CUDA profiler's memcpy records (None off CUDA, or
    when the profiler recorded no copies: then it could not see them)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize(device)
    del out
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh).get("traceEvents", [])
    copies = [e for e in events if "HtoD" in str(e.get("name", "")) and "bytes" in e.get("args", {})]
    return sum(int(e["args"]["bytes"]) for e in copies) if copies else None


def torch_load(path: str, device: str) -> dict[str, Any]:
    """The full checkpoint onto `device` by safetensors, shard by shard (`bench_scale.load_shards`)."""
    return _timed(lambda: load_shards(path, device), torch.device(device))


def store_load(store: str, task: str, device: str) -> dict[str, Any]:
    """The task onto `device` by modelstore, its base streamed (not cached)."""
    import modelstore
    dev = torch.device(device)
    return _timed(lambda: modelstore.open(store, cache_base=False).load(task, device=dev), dev)


def _timed(run: Callable[[], dict[str, torch.Tensor]], dev: torch.device) -> dict[str, Any]:
    """`run`'s time and peak device memory, then the bytes a second, profiled run copies to the device."""
    start(dev)
    t0 = time.perf_counter()
    sd = run()
    stats = finish(dev)
    seconds = time.perf_counter() - t0
    out_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    del sd
    return {"load_s": seconds, "out_bytes": out_bytes, **stats, "h2d_bytes": h2d_bytes(run, dev)}


def same_as_cpu(store: str, task: str, device: str) -> dict[str, Any]:
    """Whether the load on `device` equals the load on the CPU bit for bit, tensor by tensor (the
    CPU's streamed one at a time beside the device's state dict)."""
    import modelstore
    s = modelstore.open(store, cache_base=False)
    on_device = s.load(task, device=device)
    differ = [n for n, t in s.tensors(task, "cpu")
              if not (on_device[n].dtype == t.dtype and torch.equal(on_device[n].cpu(), t))]
    return {"tensors": len(on_device), "differ": differ[:10], "n_differ": len(differ)}


def make_store(root: str, shapes: list[tuple[str, tuple[int, ...]]], keep: float, threads: int) -> dict[str, Any]:
    """θ0, θt (tensors of `shapes`) and a store of θ0 (base) and θt (task "t") under `root`; how
    long each took."""
    import modelstore
    pre, ft, store = (os.path.join(root, n) for n in ("pre", "t", "store"))
    t0 = time.perf_counter()
    write_sharded(pre, shapes, pretrained)
    write_sharded(ft, shapes, finetune(1))
    t1 = time.perf_counter()
    torch.set_num_threads(threads)
    s = modelstore.Store.create(store)
    s.add_pretrained(pre)
    s.add_task("t", ft, keep=keep, base="pretrained", **SETTING)
    return {"params": sum(math.prod(sh) for _, sh in shapes), "write_s": t1 - t0,
            "store_s": time.perf_counter() - t1, "store": store, "ckpt": ft}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=7e9)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dir", default=None, help="where to write the checkpoints and the store")
    ap.add_argument("--no-check", action="store_true", help="skip comparing the device's load with the CPU's")
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: torch sees no CUDA device here; "
                         "pass --device cpu to run the steps on the CPU")
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench-gpu-", dir=a.dir)
    log = (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr, flush=True))
    try:
        made = make_store(root, llama_shapes(a.params), a.keep, a.threads)
        r: dict[str, Any] = {"params": made["params"], "model_bytes": 2 * made["params"], "keep": a.keep,
                             "device": a.device, "threads": a.threads,
                             "write_s": made["write_s"], "store_s": made["store_s"]}
        log(f"{made['params'] / 1e9:.2f}B parameters: checkpoints written in {made['write_s']:.0f} s, "
            f"stored in {made['store_s']:.0f} s")
        r["torch"] = fresh(torch_load, made["ckpt"], a.device, threads=a.threads)
        log(f"torch: {r['torch']['load_s']:.1f} s")
        r["load"] = fresh(store_load, made["store"], "t", a.device, threads=a.threads)
        log(f"load: {r['load']['load_s']:.1f} s")
        if not a.no_check:
            r["check"] = fresh(same_as_cpu, made["store"], "t", a.device, threads=a.threads)
            log(f"check: {r['check']['n_differ']} of {r['check']['tensors']} tensors differ from the CPU's load")
    finally:
        if not a.keep_files:
            shutil.rmtree(root, ignore_errors=True)
    r["ratios"] = ratios(r)
    report(r, a.json, f"{r['params'] / 1e9:.2f}B bf16 parameters ({r['model_bytes'] / 1e9:.1f} GB), keep {a.keep}, "
           f"device {a.device}, {a.threads} threads")


def ratios(r: dict[str, Any]) -> dict[str, float | None]:
    """The figures against their floors: time against torch's load, memory and bytes against the model's."""
    def per(x: int | None, y: int | None) -> float | None:
        return None if x is None or not y else x / y

    load, base = r["load"], r["torch"]
    return {
        "load_vs_torch": load["load_s"] / base["load_s"],
        "peak_vs_model": per(load["peak_allocated"], r["model_bytes"]),
        "torch_peak_vs_model": per(base["peak_allocated"], r["model_bytes"]),
        "h2d_vs_model": per(load["h2d_bytes"], r["model_bytes"]),
        "torch_h2d_vs_model": per(base["h2d_bytes"], r["model_bytes"]),
    }


if __name__ == "__main__":
    main()
