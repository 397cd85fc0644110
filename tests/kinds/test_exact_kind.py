"""Task kind `exact`: a checkpoint kept bit for bit (XOR with its base tensor's bits, byte planes),
checked bit against bit, with the stored arrays also decoded by numpy and zarr alone as spec/FORMAT.md
section 11 describes them (not through modelstore's reader), and every file of its payload damaged."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import DAMAGE
from safetensors.torch import load_file, save_file

import modelstore
from modelstore.build import init
from modelstore.cli import main

_INTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes, flat (how `exact` compares: bit for bit, NaN payloads and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _assert_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        np.testing.assert_array_equal(_bits(got[k]), _bits(w), err_msg=k)


def _spec_decode(store: modelstore.Store, task: str, base: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Each tensor's bytes from the task's arrays read by zarr alone: its words, XORed with the base
    tensor's where the entry says so; a count-0 entry is the base tensor."""
    g = zarr.open_group(os.path.join(store.url, store.entry(task)["path"]), mode="r")
    arrays = {name: a[:] for name, a in g.arrays()}
    out = {}
    for t in g.attrs["tensors"]:
        b = _bits(base[t.get("base", t["name"])]) if t["kind"] == "sparse" or t["xor"] else None
        if t["kind"] == "sparse":
            assert t["count"] == 0
            out[t["name"]] = b
            continue
        w = arrays[t["array"]][t["start"]:t["start"] + t["count"]].view(np.uint8)
        out[t["name"]] = w if b is None else w ^ b
    return out


def _nan_payloads() -> dict[str, torch.Tensor]:
    """Bit patterns a float round trip would lose: NaN payloads, both zeros, infinities, subnormals."""
    f32 = torch.tensor([0x7FC12345, 0xFF800001, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001],
                       dtype=torch.int64).to(torch.int32).view(torch.float32)
    b16 = torch.tensor([0x7FC1, 0xFF81, 0x8000, 0x0001, 0x7F80], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    f16 = torch.tensor([0x7E01, 0xFC01, 0x8000, 0x0001], dtype=torch.int32).to(torch.int16).view(torch.float16)
    return {"f32": f32, "b16": b16, "f16": f16}


@pytest.fixture()
def mixed(tmp_path):
    """θ0 with tensors of every kind of dtype, and a fine-tune of it with a new head, a reshaped
    tensor, a dtype change and NaN/-0.0 bit patterns."""
    g = torch.Generator().manual_seed(0)
    pre = {
        "w32": torch.randn(300, 70, generator=g),
        "w16": torch.randn(40, 30, generator=g).half(),
        "wbf": torch.randn(1000, generator=g).bfloat16(),
        "ids": torch.arange(50),
        "i32": torch.randint(-9, 9, (64,), generator=g, dtype=torch.int32),
        "i8": torch.randint(-9, 9, (64,), generator=g, dtype=torch.int8),
        "mask": torch.rand(77, generator=g) > 0.5,
        "reshaped": torch.randn(10, 6, generator=g),
        "recast": torch.randn(12, generator=g),
        "f32": torch.zeros(6), "b16": torch.zeros(5).bfloat16(), "f16": torch.zeros(4).half(),
        "scalar": torch.tensor(1.5),
    }
    task = {k: v + (1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.dtype.is_floating_point else v.clone()
            for k, v in pre.items()}
    task["i32"][3] += 5
    task["mask"][:10] = ~task["mask"][:10]
    task["reshaped"] = torch.randn(6, 10, generator=g)
    task["recast"] = pre["recast"].double()
    task["head.weight"] = torch.randn(4, 70, generator=g)
    task["empty"] = torch.zeros(0, 3)
    task.update(_nan_payloads())
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(task, str(tmp_path / "task.safetensors"))
    url = str(tmp_path / "s")
    init(url, str(tmp_path / "pre.safetensors"))
    s = modelstore.add_task(url, "t-exact", str(tmp_path / "task.safetensors"), kind="exact")
    return s, pre, load_file(str(tmp_path / "task.safetensors"))


def test_every_dtype_loads_bit_identical(mixed):
    s, pre, task = mixed
    _assert_bits(s.load("t-exact"), task)
    _assert_bits(dict(modelstore.open(s.url).tensors("t-exact")), task)
    spec = _spec_decode(s, "t-exact", pre)
    for k, w in task.items():
        np.testing.assert_array_equal(spec[k], _bits(w), err_msg=k)


def test_xor_where_the_base_matches_own_bits_elsewhere(mixed):
    s, _, task = mixed
    table = {t["name"]: t for t in s.table("t-exact")}
    own, same = {"head.weight", "empty", "reshaped", "recast"}, {"ids", "i8"}
    assert {n for n, t in table.items() if t["kind"] == "sparse" and t["count"] == 0} == same
    assert {n for n, t in table.items() if n not in same and not t["xor"]} == own
    assert {t["dtype"] for t in table.values()} >= {"float32", "float16", "bfloat16", "int64", "int32", "int8", "bool"}
    e = s.info("t-exact")
    assert e["total"] == sum(v.numel() for v in task.values())
    assert e["kept"] == sum(task[n].numel() for n in table if n not in own)
    assert e["dense_tensors"] == len(own) and e["same_tensors"] == len(same)
    assert e["full_bytes"] == sum(v.numel() * v.element_size() for v in task.values())
    # an integer tensor changed in one entry: its XORed words are zero but there
    g = zarr.open_group(os.path.join(s.url, s.entry("t-exact")["path"]), mode="r")
    t = table["i32"]
    assert t["array"] == "words.int32"
    assert np.flatnonzero(g[t["array"]][t["start"]:t["start"] + t["count"]]).tolist() == [3]


def test_a_task_equal_to_its_base_is_nearly_free(tmp_path):
    pre = {"w": torch.randn(512, 512).bfloat16(), "v": torch.randn(4096)}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    url = str(tmp_path / "s")
    init(url, str(tmp_path / "pre.safetensors"))
    s = modelstore.add_task(url, "same", str(tmp_path / "pre.safetensors"), kind="exact")
    _assert_bits(s.load("same"), pre)
    assert s.info("same")["bytes"] < 0.01 * s.info("same")["full_bytes"]


def test_large_tensor_in_blocks_and_chunks(tmp_path):
    """A tensor of several row blocks and chunks (2**21 elements per chunk) round-trips exactly."""
    g = torch.Generator().manual_seed(1)
    pre = {"big": torch.randn(3 << 20, generator=g).view(1536, 2048).bfloat16(), "b": torch.randn(7, generator=g)}
    task = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in pre.items()}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(task, str(tmp_path / "task.safetensors"))
    url = str(tmp_path / "s")
    init(url, str(tmp_path / "pre.safetensors"))
    s = modelstore.add_task(url, "t", str(tmp_path / "task.safetensors"), kind="exact")
    _assert_bits(s.load("t"), task)
    _assert_bits(s.load("t", dtype="float32"), {k: v.float() for k, v in task.items()})
    # well under the bf16 checkpoint: the high byte plane is nearly all zero
    assert s.info("t")["bytes"] < 0.8 * s.info("t")["full_bytes"]


def test_many_small_tensors_per_chunk_decoded_ahead_and_damage_named(tmp_path, monkeypatch):
    """Chunks of 256 words: tensors lie inside chunks and across them. Loads (base cached or
    streamed, and tensor by tensor) are bit-identical; the chunks after the one being read are
    decoded in the decoding threads; a slice inside a chunk is lent as a view of it (no copy); and a
    damaged chunk in the middle is an error naming a tensor it holds, whether decoded ahead or not."""
    import threading

    from modelstore.format import chunks, codecs
    from modelstore.kinds.exact import Exact
    monkeypatch.setattr(codecs, "CHUNK_ELEMENTS", 256)
    g = torch.Generator().manual_seed(3)
    sizes = [int(n) for n in torch.randint(20, 700, (40,), generator=g)]
    pre = {f"t{i:02d}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    task = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(task, str(tmp_path / "task.safetensors"))
    url = str(tmp_path / "s")
    init(url, str(tmp_path / "pre.safetensors"))
    s = modelstore.add_task(url, "t", str(tmp_path / "task.safetensors"), kind="exact")
    decoded_in: list[str] = []
    fresh = chunks.Chunks._decode_fresh
    monkeypatch.setattr(chunks.Chunks, "_decode_fresh",
                        lambda self, i: decoded_in.append(threading.current_thread().name) or fresh(self, i))
    for cache in (True, False):
        _assert_bits(modelstore.open(url, cache_base=cache).load("t"), task)
    _assert_bits(dict(modelstore.open(url).tensors("t")), task)
    assert sum(n.startswith("modelstore-decode") for n in decoded_in) > sum(sizes) // 256

    payload = s._payload(s.entry("t"), "t", Exact())
    seg = payload.stream(torch.device("cpu"))
    a = seg.get("words.int32", 0, 10, "int32", borrow=True)
    b = seg.get("words.int32", 10, 20, "int32", borrow=True)
    c = seg.get("words.int32", 30, 10, "int32")
    assert b.data_ptr() == a.data_ptr() + 40 and c.data_ptr() != b.data_ptr() + 80  # lent, then copied
    want = zarr.open_group(os.path.join(url, s.entry("t")["path"]), mode="r")["words.int32"][:40]
    np.testing.assert_array_equal(torch.cat([a, b, c]).numpy(), want)

    table = s.table("t")
    middle = sorted((tmp_path / "s" / "tasks").rglob("words.int32/c/5"))
    assert len(middle) == 1
    middle[0].write_bytes(middle[0].read_bytes()[:-1] + b"\x00")
    held = [t["name"] for t in table if t["start"] < 6 * 256 and t["start"] + t["count"] > 5 * 256]
    for cache in (True, False):
        with pytest.raises(modelstore.CorruptStoreError, match=f"chunk 5 .*tensor {held[0]}"):
            modelstore.open(url, cache_base=cache).load("t")


def test_load_threads(tmp_path, monkeypatch, request):
    """How a load spreads its work: the words' first chunks are decoded in the decoding threads
    from the start, while the first tensors are copies of the base; torch runs the XORs on one
    thread (restored after the load, also when a caller stops reading early); and a worker thread
    reads the next tensor only where most words lie in tensors longer than a chunk."""
    import threading

    from modelstore.format import chunks, codecs
    from modelstore.kinds.exact import Exact
    monkeypatch.setattr(codecs, "CHUNK_ELEMENTS", 256)
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(4)
    pre = {"same": torch.randn(3000, generator=g), **{f"t{i}": torch.randn(100, generator=g) for i in range(12)}}
    task = {k: v if k == "same" else v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
    small = tmp_path / "small"
    big = {"big": torch.randn(2000, generator=g), "t": torch.randn(100, generator=g)}
    big_task = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in big.items()}
    for d, p, t in ((small, pre, task), (tmp_path / "big", big, big_task)):
        d.mkdir()
        save_file(p, str(d / "pre.safetensors"))
        save_file(t, str(d / "task.safetensors"))
        init(str(d / "s"), str(d / "pre.safetensors"))
        modelstore.add_task(str(d / "s"), "t", str(d / "task.safetensors"), kind="exact")
    decoded: dict[int, str] = {}
    fresh, words, tensor = chunks.Chunks._decode_fresh, Exact._words, Exact._tensor
    monkeypatch.setattr(chunks.Chunks, "_decode_fresh",
                        lambda self, i: decoded.setdefault(i, threading.current_thread().name) and fresh(self, i))
    read_in: list[str] = []

    def spied_words(self, *a):
        read_in.append(threading.current_thread().name)
        yield from words(self, *a)

    torch_threads: list[int] = []
    monkeypatch.setattr(Exact, "_words", spied_words)
    monkeypatch.setattr(Exact, "_tensor", staticmethod(
        lambda *a: torch_threads.append(torch.get_num_threads()) or tensor(*a)))
    _assert_bits(modelstore.open(str(small / "s")).load("t"), task)
    assert decoded[0].startswith("modelstore-decode") and set(torch_threads) == {1}
    assert torch.get_num_threads() == 2 and read_in == ["MainThread"]
    stream = modelstore.open(str(small / "s")).tensors("t")
    next(stream)
    del stream
    assert torch.get_num_threads() == 2
    read_in.clear()
    _assert_bits(modelstore.open(str(tmp_path / "big" / "s")).load("t"), big_task)
    assert read_in == ["modelstore-ahead"] and torch.get_num_threads() == 2


def test_head_over_a_bare_base(bert_models, tmp_path):
    """A BertForSequenceClassification fine-tune (`bert.` names, a `classifier`) over a BertModel θ0:
    its encoder XORs with the base tensors of the stripped names, the head keeps its own bits."""
    from transformers import BertForSequenceClassification
    m = BertForSequenceClassification(bert_models["cfg"])
    m.bert.load_state_dict(bert_models["sds"]["alpha"], strict=False)
    m.save_pretrained(str(tmp_path / "cls"))
    want = load_file(str(tmp_path / "cls" / "model.safetensors"))
    url = str(tmp_path / "s")
    init(url, bert_models["pre"])
    s = modelstore.add_task(url, "cls-exact", str(tmp_path / "cls"), kind="exact")
    _assert_bits(s.load("cls-exact"), want)
    table = {t["name"]: t for t in s.table("cls-exact")}
    assert {n for n, t in table.items() if t["kind"] == "words" and not t["xor"]} == \
        {n for n in want if n.startswith("classifier.")}
    assert table["bert.embeddings.word_embeddings.weight"]["base"] == "embeddings.word_embeddings.weight"
    spec = _spec_decode(s, "cls-exact", bert_models["sd0"])
    for k, w in want.items():
        np.testing.assert_array_equal(spec[k], _bits(w), err_msg=k)


def test_beside_an_fft_task_on_a_merged_base(store2, bert_models):
    """`add-task NAME-exact --kind exact` into a store that keeps only θ*: exact against θ*, the
    lossy task untouched, `check` sound, and a switch between the two gives each one's bits."""
    from transformers import BertModel
    before = modelstore.open(store2).load("alpha")
    r = CliRunner().invoke(main, ["add-task", store2, "alpha-exact", bert_models["tasks"]["alpha"], "--kind", "exact"])
    assert r.exit_code == 0, r.output
    assert "bit for bit" in r.output
    s = modelstore.open(store2)
    assert s.entry("alpha-exact")["base"] == "merged" and list(s.manifest["bases"]) == ["merged"]
    want = bert_models["sds"]["alpha"]
    _assert_bits(s.load("alpha-exact"), want)
    _assert_bits(s.load("alpha"), before)
    assert s.check().ok
    r = CliRunner().invoke(main, ["check", store2])
    assert r.exit_code == 0, r.output
    model = BertModel(bert_models["cfg"])
    for task in ("alpha", "alpha-exact", "beta", "alpha-exact"):
        s.switch(model, task)
        _assert_bits({k: v for k, v in model.state_dict().items() if k in want},
                     s.load(task) if task != "alpha-exact" else want)


def test_base_choice(bert_models, tmp_path):
    """θ* when the store has it (beside θ0), else θ0; --base picks one."""
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"beta": bert_models["tasks"]["beta"]}, kind="tall-mask")
    s = modelstore.open(url)
    assert set(s.manifest["bases"]) == {"merged", "pretrained"}
    alpha = bert_models["tasks"]["alpha"]
    s = modelstore.add_task(url, "a0", alpha, kind="exact")
    s = modelstore.add_task(url, "a1", alpha, kind="exact", base="pretrained")
    assert s.entry("a0")["base"] == "merged" and s.entry("a1")["base"] == "pretrained"
    for t in ("a0", "a1"):
        _assert_bits(s.load(t), bert_models["sds"]["alpha"])


def test_exact_takes_no_options(store2, bert_models):
    r = CliRunner().invoke(main, ["add-task", store2, "x", bert_models["tasks"]["alpha"], "--kind", "exact",
                                  "--keep", "0.1"])
    assert r.exit_code != 0 and "does not apply to --kind exact" in r.output and "Traceback" not in r.output
    assert "x" not in modelstore.open(store2).tasks()


def test_every_file_of_the_payload_damaged_in_turn(mixed, tmp_path):
    """Flip, truncate or delete each file of the exact task's payload: the load raises a
    CorruptStoreError naming the store, or (metadata damage that changes nothing) gives the same bits;
    never other bits. Every chunk's damage is an error, and `check` finds it."""
    s, _, task = mixed
    url0 = s.url
    payload = os.path.join(url0, s.entry("t-exact")["path"])
    files = sorted(os.path.relpath(os.path.join(d, f), url0) for d, _, fs in os.walk(payload) for f in fs)
    chunks = [f for f in files if "/c/" in f]
    assert len(chunks) >= 4  # a chunk of each words array
    errors = 0
    for i, rel in enumerate(files):
        for how, damage in DAMAGE.items():
            url = str(tmp_path / f"case-{i}-{how}")
            shutil.copytree(url0, url)
            damage(os.path.join(url, rel))
            try:
                got = modelstore.open(url).load("t-exact")
            except modelstore.CorruptStoreError as e:
                assert "\n" not in str(e) and url in str(e), f"{how} {rel}: {e}"
                assert not modelstore.open(url).check().ok, f"{how} {rel}: check found nothing"
                errors += 1
            else:
                assert rel not in chunks, f"{how} {rel}: damage not detected"
                _assert_bits(got, task)
            shutil.rmtree(url)
    assert errors >= 3 * len(chunks)


def test_build_with_kind_exact(tmp_path):
    """`build --kind exact`: every task bit for bit on the merged base the build makes."""
    g = torch.Generator().manual_seed(2)
    pre = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g).bfloat16()}
    tasks = {t: {k: v + (1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in pre.items()} for t in "xy"}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    for t, sd in tasks.items():
        save_file(sd, str(tmp_path / f"{t}.safetensors"))
    s = modelstore.build(str(tmp_path / "s"), str(tmp_path / "pre.safetensors"),
                         {t: str(tmp_path / f"{t}.safetensors") for t in tasks}, kind="exact")
    for t, sd in tasks.items():
        assert s.entry(t)["base"] == "merged"
        _assert_bits(s.load(t), sd)


def test_bench_exact_reports_bytes_against_zipnn(tmp_path):
    """tools/bench_exact on a small pair: bit-identical, and fewer bytes than byte planes of the
    fine-tune alone (the XOR leaves the high planes nearly all zero)."""
    from tools.bench_exact import run
    g = torch.Generator().manual_seed(3)
    pre = {"w": torch.randn(256, 256, generator=g), "ids": torch.arange(16)}
    ft = {"w": pre["w"] + 1e-4 * torch.randn(256, 256, generator=g), "ids": pre["ids"].clone()}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    r = run(str(tmp_path / "pre.safetensors"), str(tmp_path / "ft.safetensors"), "bfloat16", [], True, 1)
    assert r["bit_identical"] and r["dtype"] == "bfloat16" and r["checkpoint_bytes"] == 256 * 256 * 2 + 16 * 8
    assert r["exact_ratio"] < 0.8 * r["zipnn_ratio"] and r["zipnn_ratio"] < 1.0
    assert set(r["codecs"]) >= {"words zstd1 shuffle (stored)", "planes zstd1"}
    assert r["load_cached_base_s"] > 0 and r["safetensors_load_s"] > 0
