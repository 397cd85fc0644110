"""PERU-LoRA math against PEFT itself: reading adapters, rank-q truncation, and PEFT export.

Every adapter here is made by peft on a tiny model built from a config, and PEFT's own
merge_and_unload() is the oracle for what the update must be.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

from modelstore.kinds.lora import (  # noqa: E402
    LoraAdapter,
    LoraError,
    LowRank,
    compress_adapter,
    read_adapter,
    resolve_names,
    truncated_svd,
    write_peft_adapter,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


# ---------------------------------------------------------------- helpers: tiny models and PEFT adapters


def bert_config() -> BertConfig:
    return BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
    )


def make_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config()).eval()


def make_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Case:
    path: Path
    make_base: Callable[[], torch.nn.Module]
    base: dict[str, torch.Tensor]  # theta0
    merged: dict[str, torch.Tensor]  # PEFT's merge_and_unload()
    peft_ranks: dict[str, int]  # module path -> r PEFT built
    peft_scales: dict[str, float]  # module path -> scaling PEFT built


def build_case(path: Path, make_base: Callable[[], torch.nn.Module], safe: bool = True, **lora: object) -> Case:
    """Make a random (non-zero) LoRA adapter with PEFT, save it, and record PEFT's own merge."""
    model = make_base()
    base = state(model)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    ranks, scales = {}, {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            ranks[name], scales[name] = module.r["default"], module.scaling["default"]
        if isinstance(module, ModulesToSaveWrapper):  # a trained head differs from theta0
            for p in module.modules_to_save["default"].parameters():
                p.data.add_(torch.randn_like(p))
    peft_model.save_pretrained(path, safe_serialization=safe)
    merged = state(peft_model.merge_and_unload())
    return Case(path, make_base, base, merged, ranks, scales)


CASE_SPECS: dict[str, tuple[Callable[[], torch.nn.Module], dict]] = {
    "plain": (make_bert, dict(r=8, lora_alpha=16, target_modules=["query", "value", "dense", "word_embeddings"])),
    "rslora": (make_bert, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["query", "key"])),
    "patterns": (
        make_bert,
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["query", "value", "intermediate.dense"],
            rank_pattern={"layer.0.attention.self.query": 4, r"layer\.1\..*value": 2},
            alpha_pattern={"value": 5, "^bert.encoder.layer.1.intermediate.dense": 3},
        ),
    ),
    "gpt2": (make_gpt2, dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"])),
    "saved_bin": (
        make_bert,
        dict(r=8, lora_alpha=8, target_modules=["query"], modules_to_save=["classifier"], safe=False),
    ),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_case(root / name, make, **kwargs) for name, (make, kwargs) in CASE_SPECS.items()}


def apply(base: dict[str, torch.Tensor], adapter: LoraAdapter, updates: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """theta0 + every low-rank update, with modules_to_save tensors replacing theirs."""
    out = {k: v.clone() for k, v in base.items()}
    for name, low in updates.items():
        out[adapter.modules[name].target] += low.dense(dtype=torch.float32)
    for saved in adapter.saved.values():
        out[saved.target] = saved.tensor
    return out


def assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


def copy_adapter(case: Case, dst: Path, **config_changes: object) -> Path:
    shutil.copytree(case.path, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


# ---------------------------------------------------------------- reading adapters


@pytest.mark.parametrize("name", list(CASE_SPECS))
def test_ranks_and_scales_match_peft(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    adapter = read_adapter(case.path)
    assert adapter.modules.keys() == case.peft_ranks.keys()
    for module, m in adapter.modules.items():
        assert m.r == case.peft_ranks[module], module
        assert m.scale == pytest.approx(case.peft_scales[module], rel=1e-12), module


def test_patterns_follow_peft_matching(cases: dict[str, Case]) -> None:
    modules = read_adapter(cases["patterns"].path).modules
    q0, v1 = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"
    assert (modules[q0].r, modules[q0].scale) == (4, 16 / 4)
    assert (modules[v1].r, modules[v1].scale) == (2, 5 / 2)
    assert modules["bert.encoder.layer.0.attention.self.value"].scale == 5 / 8
    assert modules["bert.encoder.layer.1.intermediate.dense"].scale == 3 / 8
    assert modules["bert.encoder.layer.0.intermediate.dense"].scale == 16 / 8


def test_layouts_and_saved_tensor_names(cases: dict[str, Case]) -> None:
    gpt2 = read_adapter(cases["gpt2"].path).modules["transformer.h.0.attn.c_attn"]
    assert gpt2.layout == "fan_in_fan_out" and gpt2.weight_shape == (32, 96)  # Conv1D weight is [in, out]
    emb = read_adapter(cases["plain"].path).modules["bert.embeddings.word_embeddings"]
    assert emb.layout == "embedding" and emb.weight_shape == (100, 64)
    assert (cases["saved_bin"].path / "adapter_model.bin").is_file()  # the torch.load(weights_only) route
    saved = read_adapter(cases["saved_bin"].path).saved
    assert {k: (s.module, s.target) for k, s in saved.items()} == {
        "classifier.weight": ("classifier", "classifier.weight"),
        "classifier.bias": ("classifier", "classifier.bias"),
    }


# ---------------------------------------------------------------- exactness and truncation


@pytest.mark.parametrize("name", list(CASE_SPECS))
def test_full_rank_reproduces_peft_merge(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    adapter = read_adapter(case.path)
    updates = compress_adapter(adapter, rank=1000)
    for module, low in updates.items():
        assert low.rank == adapter.modules[module].r and low.dropped.numel() == 0 and low.rel_error == 0.0
    changed = [k for k in case.base if not torch.equal(case.base[k], case.merged[k])]
    assert len(changed) == len(adapter.modules) + len(adapter.saved)  # the oracle really moved every target
    assert_state_close(apply(case.base, adapter, updates), case.merged)


@pytest.mark.parametrize("name", ["patterns", "gpt2", "plain"])
def test_truncation_is_best_rank_q(cases: dict[str, Case], name: str) -> None:
    """Eckart-Young via numpy on PEFT's dense update: same singular values, same matrix, same error."""
    case = cases[name]
    adapter = read_adapter(case.path)
    for m in adapter.modules.values():
        q = min(3, m.r)  # the patterns case has modules of rank 2
        dense = (case.merged[m.target].double() - case.base[m.target].double()).numpy()
        u, sv, vt = np.linalg.svd(dense, full_matrices=False)
        best = (u[:, :q] * sv[:q]) @ vt[:q]
        low = truncated_svd(m.B, m.A, m.scale, rank=q, layout=m.layout)
        scale = np.abs(dense).max()
        assert low.rank == q
        np.testing.assert_allclose(low.S.numpy(), sv[:q], rtol=1e-5)
        np.testing.assert_allclose(low.dropped.numpy(), sv[q : m.r], rtol=1e-4, atol=1e-6 * sv[0])
        assert np.all(sv[m.r :] < 1e-5 * sv[0])  # PEFT's update really has rank r
        np.testing.assert_allclose(low.dense(dtype=torch.float64).numpy(), best, atol=1e-5 * scale)
        norm = np.linalg.norm(dense)  # fp32 rounding of PEFT's merge leaves ~1e-7 * norm of noise
        error = np.linalg.norm(dense - low.dense(dtype=torch.float64).numpy())
        assert error == pytest.approx(float(low.dropped.square().sum().sqrt()), rel=1e-4, abs=1e-6 * norm)
        assert low.rel_error == pytest.approx(error / norm, rel=1e-4, abs=1e-6)
        assert (low.rel_error > 0.01) == (q < m.r)  # dropping random directions loses something
        low32 = truncated_svd(m.B, m.A, m.scale, rank=q, layout=m.layout, dtype=torch.float32)
        np.testing.assert_allclose(low32.dense().numpy(), best, atol=1e-4 * scale)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize(("energy", "q"), [(0.5, 1), (0.8, 2), (0.9, 3), (0.97, 4), (1.0, 4)])
def test_energy_picks_smallest_q(energy: float, q: int) -> None:
    """Update with singular values 2*[4, 3, 2, 1]: squared shares 16, 25, 29, 30 of 30."""
    sv = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    B = orthonormal(20, 4, 0) * sv
    A = orthonormal(12, 4, 1).T
    low = truncated_svd(B, A, 2.0, energy=energy)
    assert low.rank == q
    torch.testing.assert_close(torch.cat([low.S, low.dropped]), 2 * sv)
    kept = float(low.S.square().sum()) / float((2 * sv).square().sum())
    assert kept >= energy - 1e-12


def test_energy_on_real_module(cases: dict[str, Case]) -> None:
    case = cases["plain"]
    m = read_adapter(case.path).modules["bert.encoder.layer.1.attention.self.query"]
    dense = (case.merged[m.target].double() - case.base[m.target].double()).numpy()
    power = np.linalg.svd(dense, compute_uv=False) ** 2
    share = np.cumsum(power) / power.sum()
    for energy in (0.3, 0.6, 0.95):
        expected = int(np.argmax(share >= energy)) + 1
        assert truncated_svd(m.B, m.A, m.scale, energy=energy).rank == expected


def test_zero_update_has_no_error() -> None:
    low = truncated_svd(torch.zeros(6, 2), torch.randn(2, 5), 1.0, energy=0.9)
    assert low.rank == 0 and low.rel_error == 0.0
    assert torch.equal(low.dense(), torch.zeros(6, 5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"rank": 2, "energy": 0.5}, "exactly one"),
        ({"rank": 0}, "positive integer"),
        ({"energy": 0.0}, r"\(0, 1\]"),
        ({"energy": 1.5}, r"\(0, 1\]"),
    ],
)
def test_truncation_arguments_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(LoraError, match=message):
        truncated_svd(torch.randn(6, 2), torch.randn(2, 5), 1.0, **kwargs)


def test_factor_shapes_are_checked() -> None:
    with pytest.raises(LoraError, match="do not form a product"):
        truncated_svd(torch.randn(6, 3), torch.randn(2, 5), 1.0, rank=1)


# ---------------------------------------------------------------- PEFT export


@pytest.mark.parametrize(
    ("name", "select"),
    [("patterns", {"rank": 3}), ("gpt2", {"energy": 0.8}), ("saved_bin", {"rank": 2}), ("plain", {"energy": 0.9})],
)
def test_export_loads_in_peft_and_merges_to_low_rank(
    cases: dict[str, Case], tmp_path: Path, name: str, select: dict
) -> None:
    case = cases[name]
    adapter = read_adapter(case.path)
    updates = compress_adapter(adapter, **select)
    saved = {k: s.tensor for k, s in adapter.saved.items()}
    write_peft_adapter(tmp_path, {"base_model_name_or_path": "tiny"}, updates, saved, original_config=adapter.config)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["lora_alpha"] == config["r"]
    assert config["fan_in_fan_out"] == (name == "gpt2")
    if len({low.rank for low in updates.values()}) > 1:
        assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]

    loaded = PeftModel.from_pretrained(case.make_base(), tmp_path)
    assert_state_close(state(loaded.merge_and_unload()), apply(case.base, adapter, updates))
    reread = read_adapter(tmp_path)
    assert {k: m.r for k, m in reread.modules.items()} == {k: low.rank for k, low in updates.items()}


def test_export_refuses_to_override_lora_fields(cases: dict[str, Case], tmp_path: Path) -> None:
    updates = compress_adapter(read_adapter(cases["plain"].path), rank=2)
    with pytest.raises(LoraError, match="lora_alpha"):
        write_peft_adapter(tmp_path, {"lora_alpha": 7}, updates, {})


# ---------------------------------------------------------------- name resolution


def test_resolve_strips_task_prefix_for_bare_base(cases: dict[str, Case]) -> None:
    torch.manual_seed(0)
    bare = BertModel(bert_config()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in bare.items()}
    adapter = resolve_names(read_adapter(cases["saved_bin"].path), bare.keys(), shapes)
    query = adapter.modules["bert.encoder.layer.0.attention.self.query"]
    assert query.target == "encoder.layer.0.attention.self.query.weight"
    assert adapter.saved["classifier.weight"].target == "classifier.weight"  # new in the task model


def test_resolve_adds_one_leading_component(cases: dict[str, Case]) -> None:
    names = [f"model.{k}" for k in cases["gpt2"].base]
    adapter = resolve_names(read_adapter(cases["gpt2"].path), names)
    assert adapter.modules["transformer.h.1.mlp.c_proj"].target == "model.transformer.h.1.mlp.c_proj.weight"


def test_resolve_exact_match_wins(cases: dict[str, Case]) -> None:
    names = list(cases["gpt2"].base) + [f"x.{k}" for k in cases["gpt2"].base]
    adapter = resolve_names(read_adapter(cases["gpt2"].path), names)
    assert adapter.modules["transformer.h.0.attn.c_attn"].target == "transformer.h.0.attn.c_attn.weight"


def test_resolve_rejects_ambiguous_and_missing(cases: dict[str, Case]) -> None:
    adapter = read_adapter(cases["rslora"].path)
    bare = [k.removeprefix("bert.") for k in cases["rslora"].base]
    with pytest.raises(LoraError, match="ambiguous"):
        resolve_names(adapter, bare + [f"model.{k}" for k in cases["rslora"].base])
    with pytest.raises(LoraError, match="matches no base tensor"):
        resolve_names(adapter, cases["gpt2"].base)


def test_resolve_checks_shapes_against_layout(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["gpt2"]
    adapter = read_adapter(copy_adapter(case, tmp_path / "a", fan_in_fan_out=False))
    shapes = {k: tuple(v.shape) for k, v in case.base.items()}
    with pytest.raises(LoraError, match="fan_in_fan_out"):
        resolve_names(adapter, shapes, shapes)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
        ({"bias": "all"}, "bias='all'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
        ({"init_lora_weights": "astra", "astra_config": {}}, "relative to a modified base"),
        ({"target_parameters": ["experts.down_proj"]}, "target_parameters"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"alora_invocation_tokens": [5]}, "aLoRA"),
        ({"r": 4}, "config .* says 4"),
    ],
)
def test_unsupported_config_raises(cases: dict[str, Case], tmp_path: Path, change: dict, message: str) -> None:
    path = copy_adapter(cases["rslora"], tmp_path / "a", **change)
    with pytest.raises(LoraError, match=message) as info:
        read_adapter(path)
    assert "\n" not in str(info.value)


def test_real_dora_adapter_rejected(tmp_path: Path) -> None:
    peft_model = get_peft_model(make_bert(), LoraConfig(r=2, target_modules=["query"], use_dora=True))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(LoraError, match="DoRA"):
        read_adapter(tmp_path)


def edit_weights(case: Case, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(case.path, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


QUERY0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.__setitem__(f"{QUERY0}.lora_A.weight", torch.randn(7, 64)), "different ranks"),
        (lambda t: t.pop(f"{QUERY0}.lora_B.weight"), "no lora_B"),
        (lambda t: t.__setitem__(f"{QUERY0}.lora_A.weight", torch.randn(8, 64, 1, 1)), "not convolutions"),
        (lambda t: t.__setitem__("base_model.model.bert.pooler.dense.weight", torch.randn(64, 64)), "modules_to_save"),
        (lambda t: t.__setitem__("encoder.weight", torch.randn(2)), "PEFT LoRA adapter"),
    ],
)
def test_inconsistent_weights_raise(cases: dict[str, Case], tmp_path: Path, edit: Callable, message: str) -> None:
    with pytest.raises(LoraError, match=message):
        read_adapter(edit_weights(cases["rslora"], tmp_path / "a", edit))


def test_missing_files_raise(cases: dict[str, Case], tmp_path: Path) -> None:
    with pytest.raises(LoraError, match="not a directory"):
        read_adapter(tmp_path / "nowhere")
    no_weights = copy_adapter(cases["rslora"], tmp_path / "w")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        read_adapter(no_weights)
    no_config = copy_adapter(cases["rslora"], tmp_path / "c")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(LoraError, match="no adapter_config.json"):
        read_adapter(no_config)
