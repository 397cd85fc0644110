"""Store behaviour: commits, crash safety, checksums, format versions, inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import MAGNITUDE
from safetensors.torch import save_file

import modelstore
from modelstore.format import payload as layout


def test_add_task_keeps_base_and_others_untouched(bert_models, store2):
    before = modelstore.open(store2)
    alpha = before.load("alpha")
    base_path = before.manifest["bases"]["merged"]["path"]
    s = modelstore.add_task(store2, "gamma", bert_models["tasks"]["gamma"], keep=0.2)
    assert s.tasks() == ["alpha", "beta", "gamma"]
    assert s.manifest["bases"]["merged"]["path"] == base_path
    assert s.manifest["tasks"]["alpha"] == before.manifest["tasks"]["alpha"]
    assert all(torch.equal(v, alpha[k]) for k, v in s.load("alpha").items())
    assert s.info("gamma")["params"]["keep"] == 0.2
    with pytest.raises(modelstore.TaskExistsError, match="--overwrite"):
        modelstore.add_task(store2, "gamma", bert_models["tasks"]["gamma"])
    old_path = s.manifest["tasks"]["gamma"]["path"]
    s = modelstore.add_task(store2, "gamma", bert_models["tasks"]["alpha"], keep=0.1, overwrite=True)
    assert not os.path.exists(os.path.join(store2, old_path))
    assert all(torch.equal(v, alpha[k]) for k, v in s.load("gamma").items())  # same source, same keep


def test_interrupted_write_leaves_no_partial_task(bert_models, store2, monkeypatch):
    calls = {"n": 0}
    real = layout.FlatWriter.append

    def flaky(self, a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, a)

    monkeypatch.setattr(layout.FlatWriter, "append", flaky)
    with pytest.raises(KeyboardInterrupt):
        modelstore.add_task(store2, "gamma", bert_models["tasks"]["gamma"])
    monkeypatch.setattr(layout.FlatWriter, "append", real)
    s = modelstore.open(store2)
    assert s.tasks() == ["alpha", "beta"]
    assert not os.path.exists(os.path.join(store2, "tasks", "gamma"))  # the writer removed its own payload
    assert set(s.load("alpha")) == set(bert_models["sd0"])
    s = modelstore.add_task(store2, "gamma", bert_models["tasks"]["gamma"])
    assert s.tasks() == ["alpha", "beta", "gamma"]
    left = sorted(set(os.listdir(os.path.join(store2, "tasks", "gamma"))) - {"zarr.json"})
    assert left == [os.path.basename(s.manifest["tasks"]["gamma"]["path"])]


def test_corrupted_chunk_is_detected_and_named(store2):
    s = modelstore.open(store2)
    vals = os.path.join(store2, s.manifest["tasks"]["beta"]["path"], "values", "c", "0")
    blob = bytearray(open(vals, "rb").read())
    blob[len(blob) // 2] ^= 0x40
    open(vals, "wb").write(blob)
    s = modelstore.open(store2)
    with pytest.raises(modelstore.CorruptStoreError, match=r"task 'beta'.*values.*tensor \w+"):
        s.load("beta")
    s.load("alpha")  # other tasks still load


def test_tampered_table_is_detected(store2):
    s = modelstore.open(store2)
    meta = os.path.join(store2, s.manifest["tasks"]["alpha"]["path"], "zarr.json")
    doc = json.load(open(meta))
    doc["attributes"]["tensors"][0]["count"] += 1
    json.dump(doc, open(meta, "w"))
    with pytest.raises(modelstore.CorruptStoreError, match="alpha"):
        modelstore.open(store2).load("alpha")


def test_garbled_group_metadata_is_a_clear_error(store2):
    s = modelstore.open(store2)
    with open(os.path.join(store2, s.manifest["tasks"]["alpha"]["path"], "zarr.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(modelstore.CorruptStoreError, match="unreadable"):
        modelstore.open(store2).load("alpha")


def test_not_a_store_and_newer_version(tmp_path, store2):
    with pytest.raises(modelstore.StoreNotFoundError, match="not a modelstore store"):
        modelstore.open(str(tmp_path / "nothing"))
    m = json.load(open(os.path.join(store2, "manifest.json")))
    m["version"] = 99
    json.dump(m, open(os.path.join(store2, "manifest.json"), "w"))
    with pytest.raises(modelstore.FormatVersionError, match="upgrade modelstore"):
        modelstore.open(store2)


def test_remove_task(store2):
    s = modelstore.open(store2)
    path = s.manifest["tasks"]["alpha"]["path"]
    modelstore.remove_task(store2, "alpha")
    s = modelstore.open(store2)
    assert s.tasks() == ["beta"] and not os.path.exists(os.path.join(store2, path))
    with pytest.raises(modelstore.TaskNotFoundError, match="no task 'alpha'"):
        s.load("alpha")


def test_memory_url_and_env_default(bert_models, monkeypatch):
    url = "memory://modelstore-test/s1"
    s = modelstore.build(url, bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]}, keep=1.0,
                         value_dtype="float32")
    monkeypatch.setenv("MODELSTORE_URL", url)
    sd = modelstore.load("alpha")
    want = bert_models["sds"]["alpha"]
    assert all(torch.allclose(sd[k].float(), want[k].float(), atol=1e-6) for k in want)
    assert s.info()["tasks"] == ["alpha"]


def test_load_into_module(bert_models, store2):
    from transformers import BertModel
    m = BertModel(bert_models["cfg"])
    s = modelstore.open(store2)
    s.load_into(m, "alpha")
    sd = s.load("alpha")
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items() if k in sd)
    m.encoder.layer[0].attention.self.query.weight = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(modelstore.InputError, match="does not fit"):
        s.load_into(m, "alpha")


# ---- inputs -------------------------------------------------------------------------------------

def test_input_formats_sharded_safetensors_and_torch_bin(bert_models, tmp_path):
    sd0, sd1 = bert_models["sd0"], bert_models["sds"]["alpha"]
    names = sorted(sd1)
    half = len(names) // 2
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save_file({k: sd1[k].contiguous() for k in names[:half]}, str(shard_dir / "model-00001-of-00002.safetensors"))
    save_file({k: sd1[k].contiguous() for k in names[half:]}, str(shard_dir / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    json.dump({"metadata": {}, "weight_map": weight_map}, open(shard_dir / "model.safetensors.index.json", "w"))
    torch.save(sd1, str(tmp_path / "t.bin"))
    save_file({k: v.contiguous() for k, v in sd0.items()}, str(tmp_path / "pre.safetensors"))
    s = modelstore.build(str(tmp_path / "s"), str(tmp_path / "pre.safetensors"),
                         {"sharded": str(shard_dir), "bin": str(tmp_path / "t.bin"),
                          "hf": bert_models["tasks"]["alpha"]},
                         merge="none", keep=1.0, value_dtype="float32")
    for t in ("sharded", "bin", "hf"):
        got = s.load(t)
        assert all(torch.allclose(got[k], sd1[k], atol=1e-6, rtol=0) for k in sd1), t


class Payload:
    """An arbitrary class: unpickling it would run code from the file."""


def test_pickle_that_is_not_weights_only_is_refused(tmp_path, bert_models):
    torch.save({"w": torch.zeros(2), "obj": Payload()}, str(tmp_path / "evil.bin"))
    with pytest.raises(modelstore.InputError, match="weights_only"):
        modelstore.build(str(tmp_path / "s"), str(tmp_path / "evil.bin"), {})


@pytest.mark.parametrize("bad, match", [
    ({"keep": 0.0}, "--keep"), ({"keep": 1.5}, "--keep"), ({"granularity": "row"}, "--granularity"),
    ({"value_dtype": "int3"}, "--value-dtype"), ({"include": "("}, "regular expression"),
    ({"merge": "magic"}, "unknown merge method"),
])
def test_bad_options(bert_models, tmp_path, bad, match):
    with pytest.raises(modelstore.InputError, match=match):
        modelstore.build(str(tmp_path / "s"), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]}, **bad)
    assert not os.path.exists(tmp_path / "s" / "manifest.json")


@pytest.mark.parametrize("name", ["", "-x", "a/b", "../x", "a b", "x" * 200, ".hidden"])
def test_bad_task_names(bert_models, tmp_path, name):
    with pytest.raises(modelstore.InputError, match="invalid task name"):
        modelstore.build(str(tmp_path / "s"), bert_models["pre"], {name: bert_models["tasks"]["alpha"]})


def test_nan_and_missing_tensors_are_refused(bert_models, tmp_path):
    sd = dict(bert_models["sds"]["alpha"])
    k = "encoder.layer.0.attention.self.query.weight"
    bad = dict(sd)
    bad[k] = sd[k].clone()
    bad[k][0, 0] = float("nan")
    save_file({n: v.contiguous() for n, v in bad.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(modelstore.InputError, match=f"task 'x' tensor '{k}' has NaN or Inf"):
        modelstore.build(str(tmp_path / "s1"), bert_models["pre"], {"x": str(tmp_path / "nan.safetensors")})
    missing = {n: v.contiguous() for n, v in sd.items() if n != k}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    modelstore.init(str(tmp_path / "s2"), bert_models["pre"])
    with pytest.raises(modelstore.InputError, match=f"lacks tensor '{k}'"):
        modelstore.add_task(str(tmp_path / "s2"), "x", str(tmp_path / "missing.safetensors"))
    assert modelstore.open(str(tmp_path / "s2")).tasks() == []


def test_other_architecture_is_refused(bert_models, tmp_path):
    from conftest import tiny_bert_config
    from transformers import BertModel
    other = BertModel(tiny_bert_config(hidden_size=48, intermediate_size=96))
    other.save_pretrained(str(tmp_path / "other"))
    modelstore.init(str(tmp_path / "s"), bert_models["pre"])
    with pytest.raises(modelstore.InputError, match="differ in shape from the base"):
        modelstore.add_task(str(tmp_path / "s"), "x", str(tmp_path / "other"))


def test_build_refuses_existing_store(store2, bert_models):
    with pytest.raises(modelstore.InputError, match="already holds a store"):
        modelstore.build(store2, bert_models["pre"], {"x": bert_models["tasks"]["alpha"]})


def test_fp16_overflow_is_refused(tmp_path):
    save_file({"w": torch.zeros(4)}, str(tmp_path / "pre.safetensors"))
    save_file({"w": torch.tensor([1e6, 0, 0, 0])}, str(tmp_path / "t.safetensors"))
    with pytest.raises(modelstore.InputError, match="float32"):
        modelstore.build(str(tmp_path / "s"), str(tmp_path / "pre.safetensors"), {"t": str(tmp_path / "t.safetensors")},
                         merge="none", keep=1.0, value_dtype="float16")


def test_missing_or_swapped_chunk_is_detected(bert_models, tmp_path):
    import shutil
    url = str(tmp_path / "s")
    t = bert_models["tasks"]
    s = modelstore.build(url, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1)
    a, b = (os.path.join(url, s.manifest["tasks"][n]["path"], "values", "c", "0") for n in ("alpha", "beta"))
    saved = tmp_path / "chunk"
    shutil.copy(a, saved)
    shutil.copy(b, a)  # a valid chunk (its crc32c holds) in the wrong place
    with pytest.raises(modelstore.CorruptStoreError, match="task 'alpha': array 'values' does not match"):
        modelstore.open(url).load("alpha")
    os.remove(a)  # zarr would read a missing chunk as zeros
    with pytest.raises(modelstore.CorruptStoreError, match="task 'alpha'"):
        modelstore.open(url).load("alpha")
    shutil.copy(saved, a)
    modelstore.open(url).load("alpha")
    base_chunk = os.path.join(url, s.manifest["bases"]["merged"]["path"], "data.float32", "c", "0")
    os.remove(base_chunk)
    with pytest.raises(modelstore.CorruptStoreError, match="base 'merged'"):
        modelstore.open(url).load("beta")


# ---- streamed loads (bases larger than the cache budget) ------------------------------------------

@pytest.mark.parametrize("value_dtype, model_dtype", [("float16", torch.float32), ("bfloat16", torch.bfloat16)])
def test_streamed_load_is_bit_identical_to_the_cached_one(bert_models, tmp_path, value_dtype, model_dtype):
    sd0 = {k: (v.to(model_dtype) if v.dtype.is_floating_point else v) for k, v in bert_models["sd0"].items()}
    sd1 = {k: (v.to(model_dtype) if v.dtype.is_floating_point else v) for k, v in bert_models["sds"]["alpha"].items()}
    save_file(sd0, str(tmp_path / "pre.safetensors"))
    save_file(sd1, str(tmp_path / "t.safetensors"))
    url = str(tmp_path / "s")
    modelstore.build(url, str(tmp_path / "pre.safetensors"), {"t": str(tmp_path / "t.safetensors")}, keep=0.2,
                     value_dtype=value_dtype)
    cached = modelstore.open(url, cache_base=True)
    streamed = modelstore.open(url, cache_base=False)
    for dtype in (None, torch.float16, torch.float32):
        a, b = cached.load("t", dtype=dtype), streamed.load("t", dtype=dtype)
        assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert not streamed._bases and cached._bases  # the streamed store kept no base


def test_streamed_load_into_copies_one_tensor_at_a_time(bert_models, store2):
    from transformers import BertModel
    m = BertModel(bert_models["cfg"])
    modelstore.open(store2, cache_base=False).load_into(m, "alpha")
    want = modelstore.open(store2).load("alpha")
    assert all(torch.equal(v, want[k]) for k, v in m.state_dict().items() if k in want)


def test_streamed_base_damage_is_detected(store2):
    s = modelstore.open(store2)
    base = os.path.join(store2, s.manifest["bases"]["merged"]["path"], "data.float32", "c", "0")
    os.remove(base)  # zarr would read a missing chunk as zeros: the reader refuses it by name
    with pytest.raises(modelstore.CorruptStoreError, match="base 'merged'.*chunk 0 is missing"):
        modelstore.open(store2, cache_base=False).load("alpha")


def test_dtypes_are_accepted_as_names(store2):
    s = modelstore.open(store2)
    want = s.load("alpha", dtype=torch.float16)
    for name in ("float16", "torch.float16"):
        got = s.load("alpha", dtype=name)
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    stored = s.load("alpha")
    assert all(torch.equal(v, stored[k]) for k, v in s.load("alpha", dtype="auto").items())
    for bad in ("int8", "float17", torch.int64):
        with pytest.raises(modelstore.InputError, match="floating dtype"):
            s.load("alpha", dtype=bad)


# ---- uncompressed bases -------------------------------------------------------------------------

def _codecs(url: str, base_id: str) -> list[list[str]]:
    import zarr
    s = modelstore.open(url)
    group = zarr.open_group(os.path.join(url, s.manifest["bases"][base_id]["path"]), mode="r", zarr_format=3)
    return [[type(c).__name__ for c in a.metadata.codecs] for _, a in group.arrays()]


def test_uncompressed_base_loads_the_same_weights(bert_models, tmp_path):
    """base_codec="none" writes the base's chunks as bytes + crc32c; every load (cached, streamed,
    read straight into the output from local files, fetched from another filesystem) gives the
    weights of the compressed store; θ0 added later follows the store's choice."""
    sd0 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in bert_models["sd0"].items()}
    sd1 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in bert_models["sds"]["alpha"].items()}
    save_file(sd0, str(tmp_path / "pre.safetensors"))
    save_file(sd1, str(tmp_path / "t.safetensors"))
    args = (str(tmp_path / "pre.safetensors"), {"t": str(tmp_path / "t.safetensors")})
    lz4 = modelstore.build(str(tmp_path / "lz4"), *args, keep=0.2)
    raw = modelstore.build(str(tmp_path / "raw"), *args, keep=0.2, base_codec="none")
    assert {tuple(c) for c in _codecs(str(tmp_path / "raw"), "merged")} == {("BytesCodec", "Crc32cCodec")}
    assert {tuple(c) for c in _codecs(str(tmp_path / "lz4"), "merged")} == {("BytesCodec", "BloscCodec", "Crc32cCodec")}
    assert raw.manifest["bases"]["merged"]["codec"] == "none"
    assert raw.info()["bytes"] > lz4.info()["bytes"]
    modelstore.sync(str(tmp_path / "raw"), "memory://rawbase")
    for dtype in (None, torch.float32):
        want = lz4.load("t", dtype=dtype)
        for url, cache in ((str(tmp_path / "raw"), False), (str(tmp_path / "raw"), True), ("memory://rawbase", False)):
            got = modelstore.open(url, cache_base=cache).load("t", dtype=dtype)
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), (url, cache, dtype)
    raw.add_pretrained(str(tmp_path / "pre.safetensors"))
    assert raw.manifest["bases"]["pretrained"]["codec"] == "none"
    assert _codecs(str(tmp_path / "raw"), "pretrained")[0] == ["BytesCodec", "Crc32cCodec"]
    assert all(torch.equal(raw.base("pretrained")[k], sd0[k]) for k in sd0)
    assert raw.check().ok


def test_base_codec_from_the_cli_and_config(bert_models, tmp_path):
    from click.testing import CliRunner

    from modelstore.cli import main
    r = CliRunner().invoke(main, ["init", str(tmp_path / "i"), "--pretrained", bert_models["pre"],
                                  "--base-codec", "none"])
    assert r.exit_code == 0, r.output
    assert modelstore.open(str(tmp_path / "i")).manifest["bases"]["pretrained"]["codec"] == "none"
    r = CliRunner().invoke(main, ["info", str(tmp_path / "i")])
    assert "base pretrained: none" in r.output and ", uncompressed" in r.output
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"pretrained: {bert_models['pre']}\n"
                   f"tasks: {{a: {bert_models['tasks']['alpha']}}}\nbase_codec: none\n")
    r = CliRunner().invoke(main, ["build", str(tmp_path / "b"), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert modelstore.open(str(tmp_path / "b")).manifest["bases"]["merged"]["codec"] == "none"
    r = CliRunner().invoke(main, ["build", str(tmp_path / "c"), "--config", str(cfg), "--base-codec", "lz4"])
    assert r.exit_code == 0 and modelstore.open(str(tmp_path / "c")).manifest["bases"]["merged"]["codec"] == "lz4"
    with pytest.raises(modelstore.InputError, match="unknown base codec 'zip'; use one of lz4, none"):
        modelstore.build(str(tmp_path / "d"), bert_models["pre"], {}, merge="none", base_codec="zip")


def test_chunk_length_doubles_past_the_folder_limit():
    from modelstore.format.codecs import CHUNK_ELEMENTS, MAX_CHUNKS, chunk_length
    assert chunk_length(1) == 1 and chunk_length(1000) == 1000
    assert chunk_length(CHUNK_ELEMENTS * MAX_CHUNKS) == CHUNK_ELEMENTS
    assert chunk_length(CHUNK_ELEMENTS * MAX_CHUNKS + 1) == 2 * CHUNK_ELEMENTS
    for capacity in (CHUNK_ELEMENTS * MAX_CHUNKS * 5 + 7, 70 * 10**9, 405 * 10**9):
        n = chunk_length(capacity)
        assert -(-capacity // n) <= MAX_CHUNKS < -(-capacity // (n // 2))  # as few doublings as it takes


def test_large_arrays_are_written_in_at_most_max_chunks_objects(bert_models, tmp_path, monkeypatch):
    """With chunks of 256 elements and at most 4 per array (a 17B base's case, made small), every
    array of base and tasks has at most 4 chunk objects in its folder, written with longer chunks,
    and every load, the check and a sync read the same weights as a store of default chunks (from
    memory://, fetching one chunk at a time: longer chunks fetch fewer at once)."""
    from modelstore.format import chunks, codecs
    tasks = bert_models["tasks"]
    args = (bert_models["pre"], {"alpha": tasks["alpha"], "beta": tasks["beta"]})
    plain = modelstore.build(str(tmp_path / "plain"), *args, keep=0.1, kind_options=MAGNITUDE)
    monkeypatch.setattr(codecs, "CHUNK_ELEMENTS", 256)
    monkeypatch.setattr(codecs, "MAX_CHUNKS", 4)
    few = modelstore.build(str(tmp_path / "few"), *args, keep=0.1, kind_options=MAGNITUDE)
    few.add_pretrained(bert_models["pre"])
    lengths = []
    for meta in (tmp_path / "few").rglob("zarr.json"):
        m = json.loads(meta.read_text())
        if m.get("node_type") != "array":
            continue
        n = m["chunk_grid"]["configuration"]["chunk_shape"][0]
        lengths.append(n)
        assert len(list((meta.parent / "c").iterdir())) == -(-m["shape"][0] // n) <= 4, meta
        assert n == m["shape"][0] or (n % 256 == 0 and (n // 256) & (n // 256 - 1) == 0), (meta, n)
    assert max(lengths) > 256 * 4  # some arrays needed longer chunks
    assert few.check().ok
    modelstore.sync(str(tmp_path / "few"), "memory://fewchunks")
    monkeypatch.setattr(chunks, "WINDOW_BYTES", 1)
    for task in ("alpha", "beta"):
        want = plain.load(task)
        for url, cache in ((str(tmp_path / "few"), False), (str(tmp_path / "few"), True),
                           ("memory://fewchunks", False)):
            got = modelstore.open(url, cache_base=cache).load(task)
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), (url, cache, task)
    assert all(torch.equal(few.base("pretrained")[k], v) for k, v in bert_models["sd0"].items())
    assert all(torch.equal(few.base("merged")[k], v) for k, v in plain.base("merged").items())


def test_indices_are_written_in_blosc_blocks_of_the_chosen_size(bert_models, tmp_path, monkeypatch):
    """Index chunks carry INDEX_BLOCK_BYTES as their blosc blocksize, in the metadata and in each
    chunk's blosc header (the fast writer passes it on: 4 KiB here, so a chunk has several blocks),
    and such a store loads the weights a default store does."""
    from modelstore.format import codecs
    tasks = bert_models["tasks"]
    args = (bert_models["pre"], {"alpha": tasks["alpha"], "beta": tasks["beta"]})
    plain = modelstore.build(str(tmp_path / "plain"), *args, keep=0.3)
    monkeypatch.setattr(codecs, "INDEX_BLOCK_BYTES", 4096)
    small = modelstore.build(str(tmp_path / "small"), *args, keep=0.3)
    for root, size in ((tmp_path / "plain", 1 << 20), (tmp_path / "small", 4096)):
        metas = [m for m in root.rglob("indices/zarr.json")]
        assert len(metas) == 2
        for meta in metas:
            blosc = json.loads(meta.read_text())["codecs"][1]["configuration"]
            assert blosc["cname"] == "zstd" and blosc["blocksize"] == size
            for chunk in (meta.parent / "c").iterdir():
                header = chunk.read_bytes()[:16]
                nbytes, blocksize = int.from_bytes(header[4:8], "little"), int.from_bytes(header[8:12], "little")
                assert blocksize == min(size, nbytes) and (size == 1 << 20 or nbytes > 2 * size), chunk
    assert small.check().ok
    for task in ("alpha", "beta"):
        want = plain.load(task)
        got = modelstore.open(str(tmp_path / "small"), cache_base=False).load(task)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
