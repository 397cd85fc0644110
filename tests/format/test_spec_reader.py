"""The spec holds the code to account: tests/spec_reader.py, a reader written from spec/FORMAT.md
alone (numpy, json and zarr's decoding, nothing of modelstore), reads every kind and option and
agrees with `Store.load` bit for bit, on stores written now and on the committed old ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MAGNITUDE, finetuned_copy, peft_adapter
from safetensors.torch import save_file
from spec_reader import SpecError, lora_tolerance, read_task

import modelstore

DATA = Path(__file__).parents[1] / "data"


def _bits(t: torch.Tensor) -> tuple[bytes, tuple[int, ...], str]:
    name = str(t.dtype).removeprefix("torch.")
    a = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return np.ascontiguousarray(a).tobytes(), tuple(t.shape), name


def _same(url: str, task: str) -> None:
    """Bit for bit, except where the spec leaves the last bits to a BLAS (LoRA's float32 matmul)."""
    got = modelstore.open(url).load(task)
    ref = read_task(url, task)
    loose = lora_tolerance(url, task)
    assert set(got) == set(ref), task
    for name, (a, dtype) in ref.items():
        want = (np.ascontiguousarray(a).tobytes(), tuple(a.shape), dtype)
        if name in loose:
            g = got[name].to(torch.float32).numpy().astype(np.float64)
            r = a.astype(np.float64)
            assert _bits(got[name])[1:] == want[1:], f"{task} {name}"
            assert (np.abs(g - r) <= loose[name] + np.abs(r) * 2.0 ** -23).all(), f"{task} {name}"
        else:
            assert _bits(got[name]) == want, f"{task} {name}"


@pytest.fixture(scope="module")
def stores(bert_models, tmp_path_factory):
    """Stores of every kind and option: (url, task) pairs."""
    from transformers import BertForSequenceClassification
    root = tmp_path_factory.mktemp("spec")
    pre, tasks = bert_models["pre"], bert_models["tasks"]
    out = []

    merged = str(root / "merged")  # a Task-Arithmetic θ* and every fft option, TALL and BitDelta on it
    s = modelstore.build(merged, pre, {"alpha": tasks["alpha"], "beta": tasks["beta"]}, keep=0.1,
                         kind_options=MAGNITUDE)
    variants = {"default": dict(),  # DARE, int4 values
                "per-tensor": dict(granularity="per-tensor", value_dtype="float32"),
                "dare": dict(keep=0.3, sparsify="dare", seed=5, value_dtype="bfloat16"),
                "dare-q": dict(keep=0.05, sparsify="dare", dare_q=0.03, value_dtype="int4", group_size=8),
                "dare-seeded": dict(keep=0.3, sparsify="dare", seed=2**32 - 3, value_dtype="bfloat16",
                                    positions="seeded"),
                "dare-q-seeded": dict(keep=0.05, sparsify="dare", dare_q=0.03, value_dtype="int4", group_size=8,
                                      positions="seeded"),
                "int8": dict(value_dtype="int8", group_size=16, sparsify="magnitude"),
                "int4": dict(keep=0.2, value_dtype="int4", group_size=8, sparsify="magnitude"),
                "bitdelta": dict(kind="bitdelta")}
    for name, kw in variants.items():
        s.add_task(name, tasks["gamma"], **kw)
    s.add_task("tall", tasks["gamma"], kind="tall-mask", pretrained=pre)
    cls = BertForSequenceClassification(bert_models["cfg"])  # a head, and names under `bert.`
    cls.bert.load_state_dict(bert_models["sds"]["gamma"], strict=False)
    cls.save_pretrained(str(root / "cls"))
    s.add_task("head", str(root / "cls"), keep=0.2)
    s.add_task("head-tall", str(root / "cls"), kind="tall-mask")  # 1-bit entries naming their base tensor
    s.add_task("head-bits", str(root / "cls"), kind="bitdelta")
    s.add_task("head-exact", str(root / "cls"), kind="exact")
    s.add_task("exact0", tasks["gamma"], kind="exact", base="pretrained")
    out += [(merged, t) for t in ["alpha", "beta", *variants, "tall", "head", "head-tall", "head-bits", "head-exact",
                                  "exact0"]]

    emr = str(root / "emr")
    modelstore.build(emr, pre, {"alpha": tasks["alpha"], "beta": tasks["beta"]}, kind="emr")
    out += [(emr, "alpha"), (emr, "beta")]

    plain = str(root / "pretrained")  # θ0 alone: Post-Pruning, BitDelta and a LoRA adapter on it
    s = modelstore.build(plain, pre, {"pp": tasks["alpha"]}, merge="none", keep=0.05, exclude="pooler",
                         kind_options=MAGNITUDE)
    s.add_task("bd0", tasks["beta"], kind="bitdelta")
    s.add_lora_task("lora", peft_adapter(bert_models, root / "adapter"), rank=4)
    out += [(plain, t) for t in ("pp", "bd0", "lora")]

    g = torch.Generator().manual_seed(4)  # bfloat16 weights: bfloat16 values, and int4 ones
    sd0 = {"w": torch.randn(64, 32, generator=g).bfloat16(), "b": torch.randn(32, generator=g).bfloat16(),
           "ids": torch.arange(10)}
    save_file(sd0, str(root / "bf-pre.safetensors"))
    save_file({k: v for k, v in finetuned_copy(sd0, 7).items() if k != "ids"}, str(root / "bf-t.safetensors"))
    bf = str(root / "bf16")
    s = modelstore.build(bf, str(root / "bf-pre.safetensors"), {"t": str(root / "bf-t.safetensors")}, keep=0.3,
                         kind_options={"sparsify": "magnitude", "value_dtype": "bfloat16"})
    s.add_task("t4", str(root / "bf-t.safetensors"), value_dtype="int4", group_size=4, keep=0.5)
    s.add_task("tall", str(root / "bf-t.safetensors"), kind="tall-mask", pretrained=str(root / "bf-pre.safetensors"))
    out += [(bf, t) for t in ("t", "t4", "tall")]
    return out


def test_every_kind_and_option_reads_as_the_spec_says(stores):
    kinds = {(json.load(open(os.path.join(u, "manifest.json")))["tasks"][t]["kind"]) for u, t in stores}
    from modelstore.kinds import kind_names
    assert kinds == set(kind_names())  # every registered kind is read by the spec's rules
    for url, task in stores:
        _same(url, task)


def test_stores_written_by_earlier_versions_read_as_the_spec_says():
    for url in (DATA / "v1" / "store", DATA / "v2-count0" / "store"):
        for task in modelstore.open(str(url)).tasks():
            _same(str(url), task)


def test_root_group_says_its_format_version(stores):
    for url in {u for u, _ in stores}:
        assert json.load(open(os.path.join(url, "zarr.json")))["attributes"] == {"modelstore": {"format_version": 2}}


def test_every_array_metadata_is_covered_by_a_digest(stores, tmp_path):
    """Stock zarr reads an edited zarr.json (here: big-endian values) silently; both readers refuse it."""
    import shutil
    url, task = next((u, t) for u, t in stores if t == "per-tensor")
    m = json.load(open(os.path.join(url, "manifest.json")))
    assert all("zarr_json_sha256" in a for e in [*m["bases"].values(), *m["tasks"].values()]
               for a in e["arrays"].values())
    copy = str(tmp_path / "edited")
    shutil.copytree(url, copy)
    meta = os.path.join(copy, m["tasks"][task]["path"], "values", "zarr.json")
    j = json.load(open(meta))
    j["codecs"][0]["configuration"]["endian"] = "big"
    json.dump(j, open(meta, "w"))
    with pytest.raises(SpecError):
        read_task(copy, task)
    with pytest.raises(modelstore.CorruptStoreError, match="metadata of array 'values' fails its checksum"):
        modelstore.open(copy).load(task)
    assert not modelstore.open(copy).check().ok
