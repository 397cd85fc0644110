"""An installed modelstore's smoke test, with nothing but its declared dependencies: write a tiny
pre-trained model and two fine-tunes as safetensors, then `build`, `add-task`, `ls`, `check`,
`load` and a `sync` to memory:// through the installed command and API, and compare a lossless
task with its checkpoint.

Run it with the interpreter of the environment to test (tools/lowest_deps.sh does), from any
directory: `python tools/smoke.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

import modelstore


def _model(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {"emb.weight": torch.randn(64, 16, generator=g), "layer.weight": torch.randn(16, 16, generator=g),
                "layer.bias": torch.zeros(16)}
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def main() -> None:
    exe = [sys.executable, "-m", "modelstore"]
    with tempfile.TemporaryDirectory() as d:
        pre = _model(0)
        paths = {}
        for name, sd in {"pre": pre, "a": _model(1, pre), "b": _model(2, pre)}.items():
            paths[name] = os.path.join(d, f"{name}.safetensors")
            save_file(sd, paths[name])
        store = os.path.join(d, "store")
        run = lambda *a: subprocess.run([*exe, *a], check=True, capture_output=True, text=True).stdout  # noqa: E731
        run("--help")
        run("build", store, "--pretrained", paths["pre"], "--task", f"a={paths['a']}", "--merge", "none",
            "--keep", "1", "--value-dtype", "float32")
        run("add-task", store, "b", paths["b"], "--keep", "0.1")
        listed = json.loads(run("ls", store, "--json"))
        run("check", store)
        s = modelstore.open(store)
        got = s.load("a")
        from safetensors.torch import load_file
        want = load_file(paths["a"])
        assert all(torch.equal(got[k], want[k]) for k in want), "lossless task a differs from its checkpoint"
        s.load("b")
        modelstore.sync(store, "memory://smoke")  # a synchronous fsspec filesystem, as zarr wraps it
        copied = modelstore.open("memory://smoke").load("a")
        assert all(torch.equal(copied[k], want[k]) for k in want), "task a differs after a sync to memory://"
        print(f"smoke ok: modelstore {modelstore.__version__}, torch {torch.__version__}, tasks {listed}")


if __name__ == "__main__":
    main()
