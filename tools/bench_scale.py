"""Benchmark at LLM scale: build, add-task and load of a Llama-shaped bf16 model, beside their floors.

Writes a synthetic sharded checkpoint (θ0) and fine-tunes of it to disk tensor by tensor (never
the whole model in memory), then runs each operation in a fresh process and prints its time and
peak anonymous memory (RssAnon: mapped checkpoint pages count in RSS, they are not working
memory) next to a floor measured in the same run:

- read floors: reading θ0 and θt into memory tensor by tensor (what a build must read), and θt
  plus the bytes of the stored base θ* (what any add-task must read);
- safetensors load: `load_file` of the full checkpoint plus a copy of each tensor (a state dict in
  anonymous memory, which is what a load returns), in a fresh process;
- clone: copying the cached base (what a warm load competes with), alternating with the warm load
  so that both get fresh memory in the same state (`SETTLE_S`), in wall and CPU seconds.

    python -m tools.bench_scale --params 1e9 [--threads 2] [--keep 0.1] [--json]
    python -m tools.bench_scale --params 7e9 --dir /var/tmp/bench   # ~40 GB of disk for a while
    python -m tools.bench_scale --params 1e9 --s3   # also a cold load from a moto S3 server on 127.0.0.1
    python -m tools.bench_scale --params 1e9 --base-codec none   # the base written uncompressed
    python -m tools.bench_scale --params 7e9 --cold   # every step starts with an empty page cache (root)
    python -m tools.bench_scale --params 1e9 --tasks 3   # build merges three fine-tunes

Files are deleted at the end (or kept with --keep-files).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from tools.bench_store import proc_bytes, rss_anon

D, FF, VOCAB = 4096, 11008, 32000
SHARD_BYTES = 4 << 30


def llama_shapes(params: float) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-7B-like model with as many layers as fit `params`."""
    per_layer = 4 * D * D + 3 * D * FF + 2 * D
    layers = max(1, round((params - 2 * VOCAB * D - D) / per_layer))
    out = [("model.embed_tokens.weight", (VOCAB, D))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (D, D)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (FF, D)), (p + "mlp.up_proj.weight", (FF, D)),
                (p + "mlp.down_proj.weight", (D, FF))]
        out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,))]
    out += [("model.norm.weight", (D,)), ("lm_head.weight", (VOCAB, D))]
    return out


def write_sharded(path: str, shapes: list[tuple[str, tuple[int, ...]]],
                  make: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
    """An HF sharded safetensors checkpoint written one tensor at a time (bf16)."""
    os.makedirs(path, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in shard:
            n = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(path, fname), "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape in shard:
                fh.write(make(name, shape).to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"model_type": "llama", "hidden_size": D}, fh)


def _fill_rows(out: torch.Tensor, name: str, salt: int,
               fill: Callable[[torch.Tensor, torch.Generator], None]) -> torch.Tensor:
    """`fill(block, generator)` over blocks of about 4M entries of `out` (whole rows), side by side in
    threads, each with a generator seeded by (name, salt, block): torch's generators are sequential,
    and a 7B model is billions of draws."""
    rows = out.view(out.shape[0], -1) if out.dim() > 1 else out.view(1, -1)
    step = max(1, (4 << 20) // max(1, rows.shape[1]))

    def one(i: int) -> None:
        fill(rows[i:i + step], torch.Generator().manual_seed(zlib.crc32(f"{name}/{salt}/{i}".encode())))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, range(0, rows.shape[0], step)))
    return out


def pretrained(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape)
    return _fill_rows(torch.empty(shape), name, 0, lambda t, g: t.normal_(0.0, 0.02, generator=g))


def finetune(salt: int) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """θ0 plus a dense small delta and 2% larger changes, like a real task vector."""
    def fill(t: torch.Tensor, g: torch.Generator) -> None:
        delta = torch.empty_like(t).normal_(0.0, 2e-4, generator=g)
        delta[torch.empty_like(t).uniform_(generator=g) < 0.02] *= 20
        t.add_(delta)

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _fill_rows(pretrained(name, shape), name, salt, fill)
    return make


# ---- measuring in fresh processes --------------------------------------------------------------

def _child(fn: Callable[..., Any], args: tuple, threads: int, pipe: Any) -> None:
    from numcodecs import blosc

    import modelstore  # noqa: F401 - imported before the clock starts, as torch is (a fixed 0.3 s)
    torch.set_num_threads(threads)
    blosc.set_nthreads(threads)  # chunk (de)compression threads too
    base, peak, stop = rss_anon(), [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.01)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.perf_counter()
    extra = fn(*args)
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    pipe.send({"s": seconds, "anon": max(peak[0], rss_anon()) - base, **(extra or {})})


def fresh(fn: Callable[..., Any], *args: Any, threads: int) -> dict[str, Any]:
    """Run `fn(*args)` in a new process; its time and peak anonymous memory above the interpreter's."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(fn, args, threads, send))
    p.start()
    out = recv.recv()
    p.join()
    return out


def mem_available() -> int:
    """Bytes of memory the kernel says are available (MemAvailable)."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def drop_page_cache() -> None:
    """Empty the kernel's page cache (needs root), so a step reads its files from disk as a fresh
    machine does: at 7B the checkpoints and the store exceed the memory, so what a step finds
    cached depends on what ran before it, and a warm safetensors load beside a cold store load
    (or the reverse) measures the cache, not the code."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches: {e}") from None


def read_floor(*paths: str) -> None:
    """Read every tensor of the checkpoints into memory, one at a time (safetensors maps files
    lazily, so each tensor is copied to touch its bytes)."""
    from modelstore.inputs.sources import open_checkpoint
    for path in paths:
        ck = open_checkpoint(path)
        for n in ck.names():
            ck.get(n).clone()


def read_floor_add(store: str, task: str) -> None:
    """What any add-task must read: every tensor of θt, and the bytes of the store's base (θ*),
    each file read whole into one reused buffer. At 7B the two exceed this machine's memory, so
    this is slower than twice reading θt alone, whose second half finds much of it cached."""
    read_floor(task)
    buf = bytearray(64 << 20)
    for root, _, files in os.walk(os.path.join(store, "bases")):
        for f in files:
            with open(os.path.join(root, f), "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def safetensors_load(path: str) -> dict[str, Any]:
    return {"tensors": len(load_shards(path, "cpu"))}


def load_shards(path: str, device: str) -> dict[str, torch.Tensor]:
    """Every shard of a checkpoint directory onto `device` by safetensors' `load_file` (on the CPU
    each tensor is copied too: `load_file` maps the file, and a load returns a state dict in memory)."""
    from safetensors.torch import load_file
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            part = load_file(os.path.join(path, f), device=device)
            sd.update({k: v.clone() for k, v in part.items()} if torch.device(device).type == "cpu" else part)
    return sd


#: The setting its recorded figures measured: a magnitude top-m with the tasks' own bf16 values.
SETTING = {"sparsify": "magnitude", "value_dtype": "bfloat16"}


def build(store: str, pre: str, tasks: list[str], keep: float, base_codec: str) -> None:
    import modelstore
    modelstore.build(store, pre, {f"t{i}": t for i, t in enumerate(tasks)}, keep=keep, base_codec=base_codec, **SETTING)


def add_task(store: str, task: str, keep: float) -> None:
    import modelstore
    modelstore.add_task(store, "added", task, keep=keep, **SETTING)


def load(store: str, task: str) -> None:
    """A cold load as a 7B model gets it: the base streamed into the output, not cached."""
    import modelstore
    modelstore.open(store, cache_base=False).load(task)


#: Seconds each side of the warm-load comparison waits before it runs: virtual machines with free page
#: reporting (this one) hand freed memory back to the host ~2 s after it is freed, and memory
#: taken back before that costs a third of memory handed back (no host fault). Run back to back,
#: a short clone reused the pages the load had just freed while the longer load ran into the
#: report of the clone's: the same code measured 1.3-4.2 x. After the pause both start alike.
SETTLE_S = 3.0


def warm_load(store: str, task: str) -> dict[str, Any]:
    """Time a second load (base cached) against cloning the model, each from the same memory state
    (the load and the clone alternate, each freed and `SETTLE_S` passed before the other runs),
    five times; medians of wall and CPU seconds (user + system, all threads)."""
    import modelstore
    s = modelstore.open(store, cache_base=True)
    s.load(task)  # the first load reads the base
    base = s.base(s.entry(task)["base"])
    runs: dict[str, list[tuple[float, float]]] = {"warm": [], "clone": []}

    def timed(name: str, fn: Callable[[], Any]) -> None:
        time.sleep(SETTLE_S)
        c0, t0 = cpu_seconds(), time.perf_counter()
        out = fn()
        runs[name].append((time.perf_counter() - t0, cpu_seconds() - c0))
        del out

    for _ in range(5):
        timed("warm", lambda: s.load(task))
        timed("clone", lambda: {k: v.clone() for k, v in base.items()})
    med = {k: (sorted(w for w, _ in v)[2], sorted(c for _, c in v)[2]) for k, v in runs.items()}
    return {"warm_s": med["warm"][0], "clone_s": med["clone"][0],
            "warm_cpu_s": med["warm"][1], "clone_cpu_s": med["clone"][1]}


def cpu_seconds() -> float:
    """User and system CPU time of this process so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def s3_download(opts: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Download every file of a checkpoint from S3 into memory (the floor of any cold S3 load)."""
    import s3fs
    fs = s3fs.S3FileSystem(**opts)
    files = fs.ls(prefix)
    return {"bytes": sum(len(b) for b in fs.cat(files).values())}


def s3_load(opts: dict[str, Any], url: str, task: str) -> None:
    """A cold load from S3: the base and the task, nothing cached."""
    import modelstore
    modelstore.open(url, storage_options=opts, cache_base=False).load(task)


def s3_steps(store: str, ckpt: str, threads: int) -> dict[str, Any]:
    """Copy the store and a checkpoint to a moto S3 server on 127.0.0.1 and time a cold load of
    task t1 from it against downloading the checkpoint from the same server."""
    import s3fs
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import start_moto

    import modelstore
    server, opts = start_moto()
    try:
        fs = s3fs.S3FileSystem(**opts)
        # whole objects (< 5 GB): moto's server loses parts of concurrent multipart uploads of GB files
        fs.put(ckpt, "models/ckpt", recursive=True, chunksize=5 << 30)
        modelstore.open(store).sync_to("s3://models/store", tasks=["added"], dst_options=opts)
        out = {"s3_download": fresh(s3_download, opts, "models/ckpt", threads=threads),
               "s3_load": fresh(s3_load, opts, "s3://models/store", "added", threads=threads)}
    finally:
        server.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--tasks", type=int, default=1, help="fine-tunes the build merges and stores")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--base-codec", choices=["lz4", "none"], default="lz4", help="how the store writes its base")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints and stores")
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--s3", action="store_true", help="also time a cold load from a local moto S3 server")
    ap.add_argument("--cold", action="store_true", help="empty the page cache before each step (needs root)")
    a = ap.parse_args()
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench-scale-", dir=a.dir)
    shapes = llama_shapes(a.params)
    n = sum(math.prod(s) for _, s in shapes)
    r: dict[str, Any] = {"params": n, "model_bytes": 2 * n, "threads": a.threads, "keep": a.keep,
                         "tasks": a.tasks, "base_codec": a.base_codec, "cold": a.cold}
    log = (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr, flush=True))
    try:
        t0 = time.perf_counter()
        pre, t1p = os.path.join(root, "pre"), os.path.join(root, f"task{a.tasks}")
        merged = [os.path.join(root, f"task{i}") for i in range(a.tasks)]
        write_sharded(pre, shapes, pretrained)
        for i, path in enumerate(merged + [t1p]):
            write_sharded(path, shapes, finetune(i + 1))
        log(f"wrote {a.tasks + 2} checkpoints of {n / 1e9:.2f}B bf16 parameters in {time.perf_counter() - t0:.0f} s")
        store = os.path.join(root, "store")
        steps: list[tuple[str, Callable[..., Any], tuple]] = [
            ("read_floor_inputs", read_floor, (pre, *merged)),
            ("build", build, (store, pre, merged, a.keep, a.base_codec)),
            ("read_floor_1", read_floor, (t1p,)),
            ("read_floor_add", read_floor_add, (store, t1p)),
            ("add_task", add_task, (store, t1p, a.keep)),
            ("safetensors_load", safetensors_load, (t1p,)),
            ("load", load, (store, "added")),
            ("warm_load", warm_load, (store, "added")),
        ]
        for name, fn, args in steps:
            if name == "warm_load" and 2 * r["model_bytes"] > 0.9 * mem_available():
                log("warm_load: skipped (the cached base and the load would not fit in memory)")
                continue
            if a.cold:
                drop_page_cache()
            time.sleep(SETTLE_S)  # the memory the last step freed is handed back before this one starts
            r[name] = fresh(fn, *args, threads=a.threads)
            log(f"{name}: {r[name]['s']:.1f} s, {r[name]['anon'] / 1e9:.2f} GB anonymous")
        if a.s3:
            r.update(s3_steps(store, t1p, a.threads))
            log(f"s3: download {r['s3_download']['s']:.1f} s, cold load {r['s3_load']['s']:.1f} s")
        # reading θt and θ*: θt and the stored base's files, or (faster where many small files are
        # slower to read than one large one) two checkpoints of the model's size: the same bytes
        add_floor = min(r["read_floor_add"]["s"], 2 * r["read_floor_inputs"]["s"] / (a.tasks + 1))
        r["ratios"] = {
            "build_vs_read_floor": r["build"]["s"] / r["read_floor_inputs"]["s"],
            # the goal: reading the inputs once, plus 3 x (reading θt and θ*) per task
            "build_vs_goal": r["build"]["s"] / (r["read_floor_inputs"]["s"] + 3 * a.tasks * add_floor),
            "add_task_vs_read_floor": r["add_task"]["s"] / add_floor,
            "add_task_vs_2x_theta_t": r["add_task"]["s"] / (2 * r["read_floor_1"]["s"]),
            "add_task_anon_GB": r["add_task"]["anon"] / 1e9,
            "load_vs_safetensors": r["load"]["s"] / r["safetensors_load"]["s"],
            "load_anon_vs_model": r["load"]["anon"] / r["model_bytes"],
            "safetensors_anon_vs_model": r["safetensors_load"]["anon"] / r["model_bytes"],
        }
        if "warm_load" in r:
            r["ratios"]["warm_load_vs_clone"] = r["warm_load"]["warm_s"] / r["warm_load"]["clone_s"]
            r["ratios"]["warm_load_cpu_vs_clone"] = r["warm_load"]["warm_cpu_s"] / r["warm_load"]["clone_cpu_s"]
        if a.s3:
            r["ratios"]["s3_cold_load_vs_download"] = r["s3_load"]["s"] / r["s3_download"]["s"]
    finally:
        if not a.keep_files:
            shutil.rmtree(root, ignore_errors=True)
    report(r, a.json, f"{n / 1e9:.2f}B bf16 parameters ({2 * n / 1e9:.1f} GB), keep {a.keep}, {a.threads} threads, "
           f"base codec {a.base_codec}{', page cache emptied before each step' if a.cold else ''}")


def report(r: dict[str, Any], as_json: bool, title: str) -> None:
    """The results as JSON, or a title line and each ratio (- where it was not measured)."""
    if as_json:
        print(json.dumps(r, indent=2))
        return
    print(title)
    for k, v in r["ratios"].items():
        print(f"  {k:28} {'-' if v is None else f'{v:8.2f}'}")


if __name__ == "__main__":
    main()
