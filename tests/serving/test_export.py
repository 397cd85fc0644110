"""`export --format hf` writes a complete model directory: weights sharded as save_pretrained
shards them, in a chosen dtype, with config.json and the pre-trained model's tokenizer and
generation files, which the store keeps checksummed beside its base."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import modelstore
from modelstore.cli import main


@pytest.fixture()
def gpt2_store(tmp_path):
    """A tiny GPT-2 LM with a real (trained here, offline) tokenizer and a generation config."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )
    torch.manual_seed(0)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 20,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(fast), n_positions=32)
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    m = GPT2LMHeadModel(cfg)
    m.save_pretrained(pre)
    fast.save_pretrained(pre)
    GenerationConfig(max_new_tokens=5, eos_token_id=1).save_pretrained(pre)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.save_pretrained(ft)
    url = str(tmp_path / "s")
    modelstore.build(url, str(pre), {"ft": str(ft)}, keep=1.0, value_dtype="float32")
    return url, str(pre), str(ft)


def test_export_is_a_complete_sharded_model_directory(gpt2_store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    url, pre, ft = gpt2_store
    s = modelstore.open(url)
    kept = s.manifest["bases"]["merged"]["files"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(kept)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["export", url, "ft", str(out), "--max-shard-size", "20KB"])
    assert r.exit_code == 0, r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / f).is_file() for f in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for name in kept:
        assert (out / name).read_bytes() == (tmp_path / "pre" / name).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(ft).eval()
    x = torch.tensor([[2, 3, 4, 5]])
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-5)
    gen = pipeline("text-generation", model=str(out), tokenizer=str(out))
    assert (AutoTokenizer.from_pretrained(out)("the cat").input_ids
            == AutoTokenizer.from_pretrained(pre)("the cat").input_ids)
    assert isinstance(gen("the cat", do_sample=False)[0]["generated_text"], str)


def test_export_casts_to_a_dtype(gpt2_store, tmp_path):
    from transformers import AutoModelForCausalLM
    url, _, _ = gpt2_store
    out = tmp_path / "half"
    modelstore.open(url)
    from modelstore.serving.export import export
    export(modelstore.open(url), "ft", out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    want = modelstore.open(url).load("ft", dtype="bfloat16")
    from safetensors.torch import load_file
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    r = CliRunner().invoke(main, ["export", url, "ft", str(tmp_path / "bad"), "--max-shard-size", "lots"])
    assert r.exit_code == 1 and "max-shard-size" in r.output and r.output.count("\n") == 1


def test_a_damaged_model_file_is_caught(gpt2_store, tmp_path):
    url, _, _ = gpt2_store
    s = modelstore.open(url)
    path = os.path.join(url, s.manifest["bases"]["merged"]["path"], "files", "tokenizer.json")
    with open(path, "ab") as fh:
        fh.write(b" ")
    assert not modelstore.open(url).check().ok
    with pytest.raises(modelstore.CorruptStoreError, match="model file 'tokenizer.json' is damaged"):
        modelstore.open(url).model_files("merged")
    os.remove(path)
    with pytest.raises(modelstore.CorruptStoreError, match="'tokenizer.json' is missing"):
        modelstore.open(url).model_files("merged")


def test_model_files_travel_with_sync(gpt2_store, tmp_path):
    url, pre, _ = gpt2_store
    dst = str(tmp_path / "copy")
    modelstore.open(url).sync_to(dst)
    got = modelstore.open(dst).model_files("merged")
    assert got["tokenizer.json"] == open(os.path.join(pre, "tokenizer.json"), "rb").read()
    shutil.rmtree(dst)


def test_a_fine_tune_that_added_tokens_is_served_with_its_own_tokenizer(tmp_path):
    """A fine-tune that added tokens (its embeddings resized) keeps its tokenizer with the task:
    the export tokenizes its new words as the original does and predicts what it predicts. A
    fine-tune re-saved with the base's tokenizer keeps none (transformers rewrites the settings
    file on every save: the vocabulary decides)."""
    from conftest import make_tokenizer, tiny_bert_config
    from transformers import AutoTokenizer, BertForSequenceClassification
    tok = make_tokenizer("bert")
    torch.manual_seed(0)
    m = BertForSequenceClassification(tiny_bert_config(vocab_size=len(tok), num_labels=2)).eval()
    m.save_pretrained(tmp_path / "pre")
    tok.save_pretrained(tmp_path / "pre")
    with torch.no_grad():
        m.classifier.weight.add_(0.5)
    m.save_pretrained(tmp_path / "same")
    AutoTokenizer.from_pretrained(tmp_path / "pre").save_pretrained(tmp_path / "same")
    tok.add_tokens(["zorblax", "frobnicate"])
    m.resize_token_embeddings(len(tok))
    with torch.no_grad():
        m.bert.embeddings.word_embeddings.weight[-2:] = torch.randn(2, m.config.hidden_size)
    m.save_pretrained(tmp_path / "added")
    tok.save_pretrained(tmp_path / "added")
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    s = modelstore.open(url, mode="a")
    for name in ("same", "added"):
        s.add_task(name, str(tmp_path / name), kind="exact")
    assert set(s.entry("same")["files"]) == {"config.json"}
    assert "tokenizer.json" in s.entry("added")["files"]
    text = "a zorblax frobnicate cat"
    for name, want in (("same", AutoTokenizer.from_pretrained(tmp_path / "pre")), ("added", tok)):
        out = tmp_path / f"exp-{name}"
        r = CliRunner().invoke(main, ["export", url, name, str(out)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        got = AutoTokenizer.from_pretrained(out)
        assert got(text)["input_ids"] == want(text)["input_ids"]
    ids = tok(text, return_tensors="pt")
    assert ids["input_ids"][0].tolist() != AutoTokenizer.from_pretrained(tmp_path / "pre")(text)["input_ids"]
    original = BertForSequenceClassification.from_pretrained(tmp_path / "added").eval()
    exported = BertForSequenceClassification.from_pretrained(tmp_path / "exp-added").eval()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in exported.state_dict().items())
    with torch.no_grad():  # the same weights: the same logits, but for the last bits a kernel may vary
        torch.testing.assert_close(exported(**ids).logits, original(**ids).logits, rtol=1e-5, atol=1e-6)
