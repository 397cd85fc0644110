"""Loads on a GPU: every kind of task materialized on the device equals its load on the CPU (bit for
bit where the arithmetic is elementwise; to float rounding where a product of low-rank factors is
summed in another order), loaded into and switched in a model on the device alike; a cold load of a
bf16 model peaks at about the model's bytes of device memory and copies host to device only the
base and the task's payload.

These run where torch sees a CUDA device (`tools/device_check.sh` runs them on the device machine);
elsewhere they are skipped. MODELSTORE_TEST_DEVICE=cpu runs the comparisons on the CPU, against
itself, to check the tests' own code; the memory and copy figures need CUDA."""

from __future__ import annotations

import math
import os

import pytest
import torch

import modelstore
from tools.bench_gpu import finish, h2d_bytes, start

DEVICE = os.environ.get("MODELSTORE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device here (tools/device_check.sh runs these on one)")
peft = pytest.importorskip("peft")

FACTORED = {"lora"}  # kinds whose loads multiply factors on the device (matrix products round differently)


def _adapter(cfg, sd0, path: str) -> str:
    from transformers import BertModel
    m = BertModel(cfg)
    m.load_state_dict(sd0, strict=False)
    torch.manual_seed(4)
    peft.get_peft_model(m, peft.LoraConfig(init_lora_weights=False, r=4, target_modules=["query", "value"])
                        ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def kinds_store(bert_models, tmp_path_factory) -> str:
    """One task of every kind: PERU-FFT on a merged base (float16 and int8 values), Post-Pruning on θ0,
    tall-mask, bitdelta, and a LoRA task."""
    root = tmp_path_factory.mktemp("gpu")
    url = str(root / "s")
    t = bert_models["tasks"]
    modelstore.build(url, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1)
    s = modelstore.open(url, mode="a")
    s.add_pretrained(bert_models["pre"])
    s.add_task("q8", t["gamma"], keep=0.05, value_dtype="int8", group_size=64)
    s.add_task("post", t["gamma"], keep=0.05, base="pretrained", granularity="per-tensor")
    s.add_task("tall", t["gamma"], kind="tall-mask")
    s.add_task("bits", t["gamma"], kind="bitdelta", base="pretrained")
    s.add_lora_task("lo", _adapter(bert_models["cfg"], bert_models["sd0"], str(root / "ad")), rank=2)
    return url


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], kind: str) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        g = got[k]
        assert g.device.type == torch.device(DEVICE).type and g.dtype == v.dtype and g.shape == v.shape, k
        if kind in FACTORED:
            torch.testing.assert_close(g.cpu(), v, msg=k)
        else:
            assert torch.equal(g.cpu(), v), k


@pytest.mark.parametrize("cache_base", [True, False])
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_every_kind_loads_on_the_device_as_on_the_cpu(kinds_store, cache_base, dtype):
    on_cpu = modelstore.open(kinds_store)
    s = modelstore.open(kinds_store, cache_base=cache_base)
    for task in s.tasks():
        kind = s.entry(task)["kind"]
        _assert_same(s.load(task, device=DEVICE, dtype=dtype), on_cpu.load(task, dtype=dtype), kind)


def test_unmerged_lora_factors_load_on_the_device(kinds_store):
    s = modelstore.open(kinds_store)
    got, want = s.load("lo", device=DEVICE, merged=False), s.load("lo", merged=False)
    assert set(got.updates) == set(want.updates) and set(got.tensors) == set(want.tensors)
    for name, u in want.updates.items():
        for field in ("U", "S", "V", "dropped"):
            a, b = getattr(got.updates[name], field), getattr(u, field)
            assert a.device.type == torch.device(DEVICE).type and torch.equal(a.cpu(), b), (name, field)
    for name, t in want.tensors.items():
        assert torch.equal(got.tensors[name].cpu(), t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_into_and_switch_a_model_on_the_device(bert_models, kinds_store, dtype):
    from transformers import BertModel
    s = modelstore.open(kinds_store)
    model = BertModel(bert_models["cfg"]).to(device=DEVICE, dtype=dtype)
    for task in ["alpha", "lo", "post", "alpha", "bits", "beta", "tall", "q8"]:
        if task == "post":
            s.load_into(model, task)
        else:
            s.switch(model, task)
        want = s.load(task, dtype=dtype)
        got = model.state_dict()
        _assert_same({k: got[k] for k in want}, want, s.entry(task)["kind"])


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory) -> tuple[str, int]:
    """A store of a bf16 model of 64 tensors (134M parameters) and one task on θ0; the model's bytes.
    A load holds two tensors beyond the one it makes (read ahead), 3% of this model."""
    from tools.bench_scale import finetune, pretrained, write_sharded
    root = tmp_path_factory.mktemp("bf16")
    shapes = [(f"layers.{i}.{n}", (1024, 2048)) for i in range(32) for n in ("a", "b")]
    write_sharded(str(root / "pre"), shapes, pretrained)
    write_sharded(str(root / "t"), shapes, finetune(1))
    s = modelstore.Store.create(str(root / "s"))
    s.add_pretrained(str(root / "pre"))
    s.add_task("t", str(root / "t"), keep=0.1, base="pretrained")
    return str(root / "s"), 2 * sum(math.prod(sh) for _, sh in shapes)


@pytest.mark.skipif(DEVICE is None or torch.device(DEVICE).type != "cuda", reason="device memory and copies are CUDA's")
def test_a_cold_load_needs_the_models_memory_once_and_copies_only_the_payload(bf16_store):
    url, model_bytes = bf16_store
    s = modelstore.open(url, cache_base=False)
    dev = torch.device(DEVICE)
    start(dev)
    sd = s.load("t", device=dev)
    peak = finish(dev)["peak_allocated"]
    assert sum(t.numel() * t.element_size() for t in sd.values()) == model_bytes
    del sd
    assert peak <= 1.1 * model_bytes, f"peak {peak / model_bytes:.2f} x the model"
    p = s.entry("t")["params"]
    assert (p["index_dtype"], p["value_dtype"]) == ("uint32", "bfloat16")
    payload = s.entry("t")["kept"] * (4 + 2)  # the kept entries' gaps and values, decoded on the host
    copied = h2d_bytes(lambda: s.load("t", device=dev), dev)
    assert copied is not None and model_bytes <= copied <= model_bytes + 1.05 * payload + (1 << 20), copied
