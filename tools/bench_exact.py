"""Benchmark of `--kind exact` on a real pre-trained / fine-tuned pair, each figure beside its
baseline measured in the same run:

- bytes of the exact task (as stored: XOR with θ0, byte planes, codecs.py's `planes` codec)
  against the checkpoint's bytes, and against ZipNN's method on the fine-tune alone: the same byte
  planes without the XOR, compressed with the same codec;
- with --merged [OTHER ...]: the same task XORed against a task-arithmetic θ* = θ0 + 0.3·Σ τ over
  it and the other fine-tunes given, instead of θ0 (both through the same coder);
- load time of the task (a freshly opened store: its base read and decoded too, into the store's
  cache or streamed; and with the base cached, as a store serving several tasks keeps it; and cold:
  the store's and the checkpoint's files dropped from the page cache first) against safetensors: `load_file` of the
  checkpoint plus a copy of each tensor (load_file alone only maps the file);
- with --codecs: the XORed planes under other codecs (bytes and decode speed, one thread), which is
  how codecs.py's choice was made.

    python -m tools.bench_exact PRE FT [--cast bfloat16] [--merged [OTHER ...]] [--codecs] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numcodecs import Blosc  # type: ignore[import-untyped]
from safetensors.torch import load_file, save_file

import modelstore
from modelstore.build import init
from modelstore.format.codecs import CHUNK_ELEMENTS, compressors
from modelstore.kinds.exact import words


def checkpoint_file(path: str) -> str:
    """The safetensors file of a checkpoint given as a file or an HF model directory."""
    return os.path.join(path, "model.safetensors") if os.path.isdir(path) else path


def planes(task: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None) -> dict[tuple[int, int], np.ndarray]:
    """(bytes per element, plane) -> that byte plane (0: the most significant byte) of every tensor,
    concatenated in order (ZipNN's byte grouping, over whole tensors); XORed with `base`'s bits where
    it has the tensor in the same shape and dtype (the exact kind's rule)."""
    out: dict[tuple[int, int], list[np.ndarray]] = {}
    for key, v in task.items():
        w, k = words(v), v.element_size()
        b = None if base is None else base.get(key)
        if b is not None and b.shape == v.shape and b.dtype == v.dtype:
            w = w ^ words(b)
        raw = w.view(torch.uint8).numpy().reshape(-1, k)  # little-endian words: the high byte last
        for i in range(k):
            out.setdefault((k, i), []).append(np.ascontiguousarray(raw[:, k - 1 - i]))
    return {key: np.concatenate(ps) for key, ps in out.items()}


def chunks(a: np.ndarray) -> list[np.ndarray]:
    return [a[i:i + CHUNK_ELEMENTS] for i in range(0, a.size, CHUNK_ELEMENTS)] or [a]


def coded(arrays: dict[tuple[int, int], np.ndarray], codec: Any, whole: bool = False) -> tuple[int, float]:
    """(compressed bytes, decode seconds) of the arrays in CHUNK_ELEMENTS chunks under `codec`;
    `whole`: each itemsize's planes interleaved back into words first (for shuffling codecs)."""
    if whole:
        by_size: dict[int, list[np.ndarray]] = {}
        for (k, _), a in sorted(arrays.items()):
            by_size.setdefault(k, []).append(a)
        # word bytes in memory order (little-endian: the last plane first), as a flat byte array
        arrays = {(k, 0): np.stack(ps[::-1], axis=1).reshape(-1).view(f"<u{k}") for k, ps in by_size.items()}
    blobs = [codec.encode(c) for a in arrays.values() for c in chunks(a)]
    for b in blobs:  # once untimed: the first decode pays for fresh memory
        codec.decode(b)
    t0 = time.perf_counter()
    for b in blobs:
        codec.decode(b)
    return sum(len(b) for b in blobs), time.perf_counter() - t0


def planes_codec() -> Blosc:
    """zstd as codecs.py's "words" codec uses it, on planes already split (no shuffle)."""
    c: dict[str, Any] = dict(compressors("words", 1)[0].to_dict()["configuration"])  # type: ignore[arg-type]
    return Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=Blosc.NOSHUFFLE, blocksize=c["blocksize"])


def _blosc(cname: str, level: int, shuffle: int) -> Callable[[], Blosc]:
    return lambda: Blosc(cname, level, shuffle, blocksize=1 << 20)


#: name -> (codec, whether it sees whole words: else byte planes split per tensor beforehand)
CANDIDATES: dict[str, tuple[Callable[[], Any], bool]] = {
    "words zstd1 shuffle (stored)": (_blosc("zstd", 1, Blosc.SHUFFLE), True),
    "words zstd3 shuffle": (_blosc("zstd", 3, Blosc.SHUFFLE), True),
    "words zstd1 bitshuffle": (_blosc("zstd", 1, Blosc.BITSHUFFLE), True),
    "words lz4 shuffle": (_blosc("lz4", 5, Blosc.SHUFFLE), True),
    "planes zstd1": (_blosc("zstd", 1, Blosc.NOSHUFFLE), False),
    "planes zstd3": (_blosc("zstd", 3, Blosc.NOSHUFFLE), False),
    "planes zstd9": (_blosc("zstd", 9, Blosc.NOSHUFFLE), False),
    "planes lz4": (_blosc("lz4", 5, Blosc.NOSHUFFLE), False),
}


def evict(*paths: str) -> None:
    """Drop these files (directories walked) from the page cache, so a read goes to the disk (this
    process's own files only: the machine's other page cache stays as it is)."""
    for p in paths:
        files = [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs] if os.path.isdir(p) else [p]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def best_of(fns: dict[str, tuple[Callable[[], Any], tuple[str, ...]]], repeat: int) -> dict[str, float]:
    """name -> the best of `repeat` timings of its function, the functions taking turns (so a busy
    spell of this shared machine slows them alike); each one's files (the tuple) dropped from the
    page cache before it runs."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, (fn, cold) in fns.items():
            evict(*cold)
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def run(pre: str, ft: str, cast: str | None, merged: list[str] | None, codecs: bool, repeat: int,
        base_codec: str = "lz4") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-exact-") as root:
        pre_f, ft_f = checkpoint_file(pre), checkpoint_file(ft)
        dt = getattr(torch, cast) if cast else None

        def cast_to(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(dt) if dt is not None and v.dtype.is_floating_point else v for k, v in sd.items()}

        if cast:
            for src, dst in ((pre_f, f"{root}/pre.safetensors"), (ft_f, f"{root}/ft.safetensors")):
                save_file(cast_to(load_file(src)), dst)
            pre_f, ft_f = f"{root}/pre.safetensors", f"{root}/ft.safetensors"
        sd0, sd1 = load_file(pre_f), load_file(ft_f)
        full = sum(v.numel() * v.element_size() for v in sd1.values())
        params = sum(v.numel() for v in sd1.values())
        changed = sum(int((sd1[k] != sd0[k]).sum()) for k in sd1 if k in sd0 and sd0[k].shape == sd1[k].shape)
        r: dict[str, Any] = {"dtype": cast or "as saved", "base_codec": base_codec, "params": params,
                             "checkpoint_bytes": full, "changed_fraction": changed / params}
        url = f"{root}/s"
        init(url, pre_f, base_codec=base_codec)
        t0 = time.perf_counter()
        s = modelstore.add_task(url, "t", ft_f, kind="exact")
        r["add_task_s"] = round(time.perf_counter() - t0, 3)
        got = s.load("t")
        r["bit_identical"] = got.keys() == sd1.keys() and all(
            torch.equal(got[k].view(torch.uint8), sd1[k].contiguous().view(torch.uint8)) for k in sd1)
        r["exact_bytes"] = s.info("t")["bytes"]
        r["exact_ratio"] = r["exact_bytes"] / full
        plain = planes(sd1, None)
        r["zipnn_bytes"], _ = coded(plain, planes_codec())
        r["zipnn_ratio"] = r["zipnn_bytes"] / full
        r["exact_vs_zipnn"] = r["exact_bytes"] / r["zipnn_bytes"]
        if merged is not None:
            fts = [sd1, *(cast_to(load_file(checkpoint_file(p))) for p in merged)]
            theta = {k: (v.float() + 0.3 * sum(f[k].float() - v.float() for f in fts)).to(v.dtype)
                     if v.dtype.is_floating_point else v for k, v in sd0.items()}
            r["merged_tasks"] = len(fts)
            r["xor_theta0_bytes"], _ = coded(planes(sd1, sd0), planes_codec())
            r["xor_merged_bytes"], _ = coded(planes(sd1, theta), planes_codec())
        warm = modelstore.open(url)
        warm.load("t")

        def safetensors_load() -> None:
            {k: v.clone() for k, v in load_file(ft_f).items()}

        r.update({f"{k}_s": v for k, v in best_of({
            "safetensors_load": (safetensors_load, ()),
            "load": (lambda: modelstore.open(url).load("t"), ()),
            "load_streamed_base": (lambda: modelstore.open(url, cache_base=False).load("t"), ()),
            "load_cached_base": (lambda: warm.load("t"), ()),
        }, repeat).items()})
        r.update({f"{k}_s": v for k, v in best_of({
            "cold_safetensors_load": (safetensors_load, (ft_f,)),
            "cold_load_streamed_base": (lambda: modelstore.open(url, cache_base=False).load("t"), (url,)),
        }, repeat).items()})
        r["load_vs_safetensors"] = r["load_s"] / r["safetensors_load_s"]
        r["load_streamed_vs_safetensors"] = r["load_streamed_base_s"] / r["safetensors_load_s"]
        r["load_cached_vs_safetensors"] = r["load_cached_base_s"] / r["safetensors_load_s"]
        r["cold_load_vs_safetensors"] = r["cold_load_streamed_base_s"] / r["cold_safetensors_load_s"]
        if codecs:
            xor = planes(sd1, sd0)
            nbytes = sum(a.size for a in xor.values())
            r["codecs"] = {}
            for name, (make, whole) in CANDIDATES.items():
                size, dec = min((coded(xor, make(), whole) for _ in range(repeat)), key=lambda x: x[1])
                r["codecs"][name] = {"ratio": round(size / full, 4), "decode_GBps": round(nbytes / dec / 1e9, 2)}
        return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.bench_exact", description=__doc__.split("\n\n")[0])
    p.add_argument("pretrained", help="pre-trained checkpoint (HF dir or .safetensors)")
    p.add_argument("finetuned", help="fine-tuned checkpoint of it")
    p.add_argument("--cast", choices=("bfloat16", "float16", "float32"), default=None,
                   help="cast both checkpoints' float tensors first (a bf16 release of a float32 fine-tune)")
    p.add_argument("--merged", nargs="*", default=None, metavar="OTHER",
                   help="also XOR against θ* = θ0 + 0.3·Σ τ over the task and these other fine-tunes")
    p.add_argument("--codecs", action="store_true", help="also measure other codecs on the XORed planes")
    p.add_argument("--base-codec", choices=("lz4", "none"), default="lz4", help="how the store keeps θ0")
    p.add_argument("--repeat", type=int, default=5, help="loads timed (best of)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    r = run(a.pretrained, a.finetuned, a.cast, a.merged, a.codecs, a.repeat, a.base_codec)
    if a.json:
        print(json.dumps(r))
        return
    for k, v in r.items():
        print(f"{k:>34}: {json.dumps(v) if isinstance(v, dict) else (round(v, 4) if isinstance(v, float) else v)}")


if __name__ == "__main__":
    main()
