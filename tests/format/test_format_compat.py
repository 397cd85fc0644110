"""Stores written before the architecture change (format version 1, tests/data/v1, made by the
previous modelstore) open, load bit-identically (a LoRA task's stored factors; its merged weights
to float32 rounding, since the matmul's last bit depends on the CPU) and accept new tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import modelstore

V1 = Path(__file__).parents[1] / "data" / "v1"


def test_v1_store_loads_bit_identically():
    s = modelstore.open(str(V1 / "store"))
    assert s.tasks() == ["a", "b", "bf", "l"]
    assert {t: s.entry(t)["kind"] for t in s.tasks()} == {"a": "fft", "b": "fft", "bf": "fft", "l": "lora"}
    for t in s.tasks():
        want = load_file(str(V1 / f"{t}.safetensors"))
        got = s.load(t)
        assert set(got) == set(want), t
        for k, v in want.items():
            assert got[k].dtype == v.dtype, (t, k)
            if t == "l":  # a float32 matmul of the stored factors: its last bit depends on the CPU's kernels
                torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=f"{t} {k}")
            else:
                assert torch.equal(got[k], v), (t, k)
    factors = load_file(str(V1 / "l-factors.safetensors"))
    a = s.load("l", merged=False)
    for k, low in a.updates.items():
        for x in "USV":
            assert torch.equal(getattr(low, x), factors[f"{k}.{x}"])


def test_v1_store_takes_new_tasks(tmp_path):
    url = tmp_path / "store"
    shutil.copytree(V1 / "store", url)
    s = modelstore.open(str(url), mode="a")
    s.remove("a")
    old = s.load("b")
    s.add_task("again", _checkpoint_of(old, tmp_path), keep=1.0, value_dtype="float32")
    got = modelstore.open(str(url)).load("again")
    assert all(torch.allclose(got[k], old[k], atol=1e-6, rtol=0) for k in old)
    assert modelstore.open(str(url)).tasks() == ["again", "b", "bf", "l"]


def test_v1_store_upgrades_to_version_2_when_it_gets_a_version_2_payload(tmp_path):
    """Old tasks keep their CRC-32 records and still verify; the new task's arrays carry chunk
    digests, and the manifest says version 2 so that a version-1 reader refuses it cleanly."""
    url = tmp_path / "store"
    shutil.copytree(V1 / "store", url)
    s = modelstore.open(str(url), mode="a")
    assert s.manifest["version"] == 1
    s.add_task("again", _checkpoint_of(s.load("b"), tmp_path), keep=0.5)
    m = json.loads((url / "manifest.json").read_text())
    assert m["version"] == 2
    assert all("crc32" in a and "chunks_crc32c" not in a for a in m["tasks"]["b"]["arrays"].values())
    assert all("chunks_crc32c" in a and "crc32" not in a for a in m["tasks"]["again"]["arrays"].values())
    assert modelstore.open(str(url)).check().ok
    want = {t: load_file(str(V1 / f"{t}.safetensors")) for t in ("b", "bf")}
    for t, sd in want.items():
        got = modelstore.open(str(url), cache_base=False).load(t)
        assert all(torch.equal(got[k], v) for k, v in sd.items())


def _checkpoint_of(sd: dict[str, torch.Tensor], tmp_path: Path) -> str:
    from safetensors.torch import save_file
    path = str(tmp_path / "ck.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def test_count_0_entries_after_others_load(tmp_path):
    """tests/data/v2-count0 (made by modelstore 3085ac2, tests/data/v2-count0/make.py): `build
    --exclude pooler` recorded the unchanged pooler tensors as `sparse` entries with start 0 after
    the others, which loads refused with a raw AssertionError. They read as the base's tensors, and
    tasks written now start such entries where the indices stand (starts never go back)."""
    url = Path(__file__).parents[1] / "data" / "v2-count0" / "store"
    s = modelstore.open(str(url))
    table = s.table("a")
    assert [(t["name"], t["start"], t["count"]) for t in table if not t["count"]] == \
        [("pos_ids", 0, 0), ("pooler.b", 0, 0), ("pooler.w", 0, 0)]
    assert s.check().ok
    got, base, want = s.load("a"), s.base("pretrained"), load_file(str(url.parent / "a.safetensors"))
    assert set(got) == {*want, "pos_ids"}
    for k in ("pooler.b", "pooler.w", "pos_ids"):
        assert torch.equal(got[k], base[k]) and got[k].dtype == base[k].dtype
    for k in ("enc.b", "enc.w"):  # keep 1, float32 values: θ0 + (θt − θ0) in float32
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    from modelstore.serving.export import export
    files = export(s, "a", tmp_path / "exported")
    exported = load_file(str(tmp_path / "exported" / files[0]))
    assert all(torch.equal(exported[k], got[k]) for k in got)
    pre = str(tmp_path / "pre.safetensors")
    save_file({k: v.contiguous() for k, v in base.items()}, pre)
    again = modelstore.build(str(tmp_path / "s"), pre, {"a": str(url.parent / "a.safetensors")}, keep=1.0,
                             value_dtype="float32", exclude="pooler", merge="none")
    starts = [t["start"] for t in again.table("a")]
    assert starts == sorted(starts) and again.table("a")[-1]["start"] == 136
    assert all(torch.equal(again.load("a")[k], got[k]) for k in got)
