"""Made by modelstore 3085ac2 (before count-0 entries were written at the array's position)."""
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

import modelstore

out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True); os.makedirs(out)
g = torch.Generator().manual_seed(3)
pre = {"enc.w": torch.randn(16, 8, generator=g), "enc.b": torch.randn(8, generator=g),
       "pooler.w": torch.randn(8, 8, generator=g), "pooler.b": torch.randn(8, generator=g),
       "pos_ids": torch.arange(12, dtype=torch.int64)}
task = {k: (v + 0.05 * torch.randn(v.shape, generator=g)) if k.startswith("enc") else v.clone()
        for k, v in pre.items() if k != "pos_ids"}
save_file(pre, f"{out}/pre.safetensors"); save_file(task, f"{out}/a.safetensors")
modelstore.build(f"{out}/store", f"{out}/pre.safetensors", {"a": f"{out}/a.safetensors"}, keep=1.0,
                 value_dtype="float32", exclude="pooler", merge="none")
os.remove(f"{out}/pre.safetensors")
