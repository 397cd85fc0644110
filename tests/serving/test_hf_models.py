"""Serving transformers models from a store: tied weights (GPT-2's lm_head is wte) through load_model,
load_into and switch, generating what the original fine-tune generates; load_model's dtypes and errors."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import finetuned_copy

import modelstore


@pytest.fixture(scope="module")
def gpt2_store(tmp_path_factory):
    """A tiny GPT-2 LM (lm_head tied to wte) and one fine-tune of it stored whole (keep 1.0)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=101, n_positions=32, bos_token_id=0,
                     eos_token_id=100, pad_token_id=100)
    pre = GPT2LMHeadModel(cfg)
    pre.save_pretrained(str(root / "pre"))
    tuned = GPT2LMHeadModel(cfg)
    tuned.load_state_dict(finetuned_copy(pre.state_dict(), seed=5, scale=0.5))
    tuned.tie_weights()
    tuned.save_pretrained(str(root / "ft"))
    url = str(root / "s")
    modelstore.build(url, str(root / "pre"), {"ft": str(root / "ft")}, merge="none", keep=1.0, value_dtype="float32")
    return {"url": url, "cfg": cfg, "tuned": tuned.eval()}


def _greedy(model, n=12):
    prompt = torch.tensor([[1, 7, 42, 3]])
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          pad_token_id=100)[0].tolist()


def _tied(model):
    return model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_tied_gpt2_generates_as_the_original_through_every_route(gpt2_store):
    from transformers import GPT2LMHeadModel
    want = _greedy(gpt2_store["tuned"])
    store = modelstore.open(gpt2_store["url"])
    assert "lm_head.weight" not in store.load("ft")  # saved once, under wte
    loaded = modelstore.load_model("ft", store, GPT2LMHeadModel)
    assert _tied(loaded) and not loaded.training and _greedy(loaded) == want
    for write in (store.load_into, store.switch):
        m = GPT2LMHeadModel(gpt2_store["cfg"]).eval()
        write(m, "ft")
        assert _tied(m) and _greedy(m) == want


def test_load_model_dtypes_and_class_names(gpt2_store):
    from transformers import GPT2LMHeadModel, GPT2Model
    store = modelstore.open(gpt2_store["url"])
    plain = modelstore.load_model("ft", gpt2_store["url"])  # the class the task's config.json names
    assert type(plain) is GPT2LMHeadModel and plain.transformer.wte.weight.dtype == torch.float32
    bare = modelstore.load_model("ft", store, GPT2Model)  # its transformer.… tensors, placed as wte.…
    assert torch.equal(bare.wte.weight, store.load("ft")["transformer.wte.weight"])
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("auto", torch.float32)):
        m = modelstore.load_model("ft", store, "GPT2LMHeadModel", dtype=name)
        assert {p.dtype for p in m.parameters()} == {dtype} and _tied(m)
        want = store.load("ft", dtype=dtype)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in want.items())


def test_load_model_errors_are_one_line(gpt2_store, bert_models, tmp_path):
    from transformers import BertModel, GPT2ForSequenceClassification
    store = modelstore.open(gpt2_store["url"])
    cases = [(BertModel, "cannot be built"),
             (GPT2ForSequenceClassification, "does not fit GPT2ForSequenceClassification.*missing.*score"),
             ("NoSuchModel", "model_cls must be"), (dict, "model_cls must be")]
    for cls, msg in cases:
        with pytest.raises(modelstore.InputError, match=msg) as e:
            modelstore.load_model("ft", store, cls)
        assert "\n" not in str(e.value)
    with pytest.raises(modelstore.InputError, match="floating dtype"):
        modelstore.load_model("ft", store, dtype="int8")
    from safetensors.torch import save_file
    bare, task = str(tmp_path / "pre.safetensors"), str(tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in bert_models["sd0"].items()}, bare)
    save_file({k: v.contiguous() for k, v in bert_models["sds"]["alpha"].items()}, task)
    s = modelstore.build(str(tmp_path / "s"), bare, {"a": task}, merge="none")
    with pytest.raises(modelstore.InputError, match="nor its base keeps a config.json.*load_into"):
        modelstore.load_model("a", s)


def test_a_mismatched_class_gives_the_error_without_transformers_load_report(gpt2_store):
    """transformers 5 logs a "LOAD REPORT" table of the keys; load_model states them in its one-line
    error instead. A handler of transformers' logger sees the report of a plain from_pretrained."""
    from transformers import GPT2ForSequenceClassification
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger, root = logging.getLogger("transformers.modeling_utils"), logging.getLogger("transformers")
    level = root.level
    root.setLevel(logging.WARNING)  # conftest sets TRANSFORMERS_VERBOSITY=error
    logger.addHandler(handler)
    try:
        store = modelstore.open(gpt2_store["url"])
        with pytest.raises(modelstore.InputError, match="does not (match|fit).*missing.*score"):
            modelstore.load_model("ft", store, GPT2ForSequenceClassification)
        assert not [m for m in seen if "LOAD REPORT" in m]
        config = gpt2_store["cfg"]
        GPT2ForSequenceClassification.from_pretrained(None, config=config, state_dict=store.load("ft"),
                                                      device_map={"": torch.device("cpu")})
        assert [m for m in seen if "LOAD REPORT" in m]  # the filter went with load_model's call
    finally:
        logger.removeHandler(handler)
        root.setLevel(level)


def test_load_model_takes_the_task_first_and_the_store_from_the_environment(gpt2_store, monkeypatch):
    from transformers import GPT2LMHeadModel
    monkeypatch.setenv("MODELSTORE_URL", str(gpt2_store["url"]))
    by_env = modelstore.load_model("ft", model_cls=GPT2LMHeadModel)
    given = modelstore.load_model("ft", gpt2_store["url"], GPT2LMHeadModel)
    assert all(torch.equal(a, b) for a, b in zip(by_env.state_dict().values(), given.state_dict().values()))
    monkeypatch.delenv("MODELSTORE_URL")
    with pytest.raises(modelstore.InputError, match="MODELSTORE_URL"):
        modelstore.load_model("ft")


def test_a_moe_whose_experts_transformers_fuses_loads_and_exports_but_is_not_written_in_place(tmp_path):
    """transformers 5 stacks a Qwen3-MoE checkpoint's per-expert tensors into one as it loads it:
    load_model gives them to from_pretrained to fuse, equal to the original; export loads back the
    same; a write in place (load_into, switch) has no tensor for each expert and says so in one
    line, pointing to export (calibration builds each candidate instead: tests/fidelity)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from modelstore.serving.export import export
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    pre = Qwen3MoeForCausalLM(cfg)
    pre.save_pretrained(tmp_path / "pre")
    tuned = Qwen3MoeForCausalLM(cfg)
    tuned.load_state_dict(finetuned_copy(pre.state_dict(), seed=5, scale=0.5))
    tuned.save_pretrained(tmp_path / "ft")
    url = str(tmp_path / "s")
    modelstore.build(url, str(tmp_path / "pre"), {"ft": str(tmp_path / "ft")}, merge="none", keep=1.0,
                     value_dtype="float32")
    want = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "ft").state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in want
    for got in (modelstore.load_model("ft", url),
                (export(modelstore.open(url), "ft", tmp_path / "out"), Qwen3MoeForCausalLM.from_pretrained(
                    tmp_path / "out"))[1]):
        assert got.state_dict().keys() == want.keys()
        for k, v in got.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-6, msg=k)
    store = modelstore.open(url)
    for write in (store.load_into, store.switch):
        with pytest.raises(modelstore.InputError, match="fuses its checkpoint's tensors") as e:
            write(Qwen3MoeForCausalLM(cfg), "ft")
        assert "modelstore export" in str(e.value) and "\n" not in str(e.value)
