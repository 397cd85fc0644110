"""LoRA tasks in a store (PERU-LoRA): adapters made by peft itself, checked against peft and numpy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_bert_config

import modelstore
from modelstore.cli import main

peft = pytest.importorskip("peft")


def _adapter(model, path, seed, **cfg):
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **cfg)
    pm = peft.get_peft_model(model, config)
    pm.save_pretrained(path)
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return merged


@pytest.fixture(scope="module")
def bert_lora(tmp_path_factory):
    from transformers import BertModel
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    cfg = tiny_bert_config()
    base = BertModel(cfg)
    base.save_pretrained(str(root / "pre"))
    sd0 = {k: v.detach().clone() for k, v in base.state_dict().items()}

    def fresh():
        m = BertModel(cfg)
        m.load_state_dict(sd0)
        return m

    merged = _adapter(fresh(), str(root / "ad1"), 1, r=8, lora_alpha=16, target_modules=["query", "value", "dense"])
    merged_rs = _adapter(fresh(), str(root / "ad2"), 2, r=8, lora_alpha=8, use_rslora=True, target_modules=["key"],
                         rank_pattern={"key": 4}, alpha_pattern={"key": 3})
    return {"root": root, "pre": str(root / "pre"), "sd0": sd0, "fresh": fresh,
            "ad1": str(root / "ad1"), "merged1": merged, "ad2": str(root / "ad2"), "merged2": merged_rs}


def test_full_rank_reproduces_peft_merge(bert_lora, tmp_path):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_lora["pre"])
    s = modelstore.add_lora_task(url, "t1", bert_lora["ad1"], rank=8)
    s = modelstore.add_lora_task(url, "t2", bert_lora["ad2"], rank=64)
    for task, want in (("t1", bert_lora["merged1"]), ("t2", bert_lora["merged2"])):
        got = s.load(task)
        assert set(got) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"{task} {k}")
    info = s.info("t1")
    assert info["kind"] == "lora" and info["params"]["q_max"] == 8 and info["params"]["max_rel_error"] < 1e-6


def test_truncation_is_best_rank_q_of_the_dense_update(bert_lora, tmp_path):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_lora["pre"])
    s = modelstore.add_lora_task(url, "t", bert_lora["ad1"], rank=2)
    got, full, sd0 = s.load("t"), bert_lora["merged1"], bert_lora["sd0"]
    adapted = [k for k in sd0 if not torch.equal(full[k], sd0[k])]
    assert adapted
    table = s.table("t")
    by_name = {e["name"]: e for e in table}
    for k in adapted:
        delta = (full[k].double() - sd0[k].double()).numpy()
        u, sv, vt = np.linalg.svd(delta)
        best = (u[:, :2] * sv[:2]) @ vt[:2]
        np.testing.assert_allclose(got[k].double().numpy() - sd0[k].double().numpy(), best, atol=2e-6)
        # Frobenius error equals the dropped singular values; the store records them
        err = np.linalg.norm(delta - best)
        np.testing.assert_allclose(err, np.sqrt((sv[2:8] ** 2).sum()), rtol=1e-5)
        np.testing.assert_allclose(by_name[k]["dropped"], sv[2:8], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(by_name[k]["rel_error"], err / np.linalg.norm(delta), rtol=1e-4)
    untouched = [k for k in sd0 if k not in adapted]
    assert all(torch.equal(got[k], sd0[k]) for k in untouched)


def test_energy_and_unmerged_factors(bert_lora, tmp_path):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_lora["pre"])
    s = modelstore.add_lora_task(url, "t", bert_lora["ad1"], energy=0.9)
    a = s.load("t", merged=False)
    full, sd0 = bert_lora["merged1"], bert_lora["sd0"]
    merged = s.load("t")
    for name, low in a.updates.items():
        delta = full[name].double() - sd0[name].double()
        sv = torch.linalg.svdvals(delta)
        energy = sv.square().cumsum(0) / sv.square().sum()
        q = int((energy < 0.9).sum()) + 1
        assert low.rank == q, name
        torch.testing.assert_close(sd0[name] + low.dense("cpu"), merged[name], rtol=1e-6, atol=1e-6)
    with pytest.raises(modelstore.InputError, match="LoRA"):
        modelstore.build(str(tmp_path / "f"), bert_lora["pre"], {"x": bert_lora["pre"]}).load("x", merged=False)


def test_export_peft_loads_and_matches(bert_lora, tmp_path):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_lora["pre"])
    modelstore.add_lora_task(url, "t", bert_lora["ad1"], rank=3)
    r = CliRunner().invoke(main, ["export", url, "t", str(tmp_path / "out"), "--format", "peft"])
    assert r.exit_code == 0, r.output
    pm = peft.PeftModel.from_pretrained(bert_lora["fresh"](), str(tmp_path / "out"))
    got = pm.merge_and_unload().state_dict()
    want = modelstore.open(url).load("t")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert json.load(open(tmp_path / "out" / "adapter_config.json"))["r"] == 3
    r = CliRunner().invoke(main, ["export", url, "t", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(3)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=60, n_positions=16)
    base = GPT2Model(cfg)
    base.save_pretrained(str(tmp_path / "pre"))
    sd0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    fresh = GPT2Model(cfg)
    fresh.load_state_dict(sd0)
    want = _adapter(fresh, str(tmp_path / "ad"), 4, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                    fan_in_fan_out=True)
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    got = modelstore.add_lora_task(url, "g", str(tmp_path / "ad"), rank=4).load("g")
    for k, v in want.items():
        if k in got:
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_fft_and_lora_side_by_side(bert_models, tmp_path):
    from transformers import BertModel
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]})
    base = BertModel(bert_models["cfg"])
    base.load_state_dict(bert_models["sd0"], strict=False)
    want = _adapter(base, str(tmp_path / "ad"), 7, r=4, lora_alpha=4, target_modules=["query"])
    runner = CliRunner()
    r = runner.invoke(main, ["add-task", url, "lo", "--lora", str(tmp_path / "ad"), "--rank", "4"])
    assert r.exit_code == 1 and "--pretrained" in r.output
    other = BertModel(tiny_bert_config())
    other.save_pretrained(str(tmp_path / "other"))
    r = runner.invoke(main, ["add-task", url, "lo", "--lora", str(tmp_path / "ad"),
                             "--pretrained", str(tmp_path / "other")])
    assert r.exit_code == 1 and "not the pre-trained model" in r.output
    r = runner.invoke(main, ["add-task", url, "lo", "--lora", str(tmp_path / "ad"), "--rank", "4",
                             "--pretrained", bert_models["pre"]])
    assert r.exit_code == 0, r.output
    s = modelstore.open(url)
    assert sorted(s.manifest["bases"]) == ["merged", "pretrained"]
    got = s.load("lo")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    rows = json.loads(runner.invoke(main, ["ls", url, "--json"]).output)
    assert {r["task"]: r["q"] for r in rows} == {"alpha": None, "lo": 4}
    lo = [r for r in rows if r["task"] == "lo"][0]
    # q·(d_out + d_in + 1) numbers per module against the adapter's r·(d_out + d_in): 2 layers of 32x32
    assert lo["kept"] == 2 * 4 * (32 + 32 + 1) and lo["bytes"] > 0
    assert "peru-lora" in runner.invoke(main, ["info", url, "lo"]).output


def test_unsupported_adapter_is_one_line_error(bert_lora, tmp_path):
    ad = tmp_path / "dora"
    pm = peft.get_peft_model(bert_lora["fresh"](), peft.LoraConfig(r=4, target_modules=["query"], use_dora=True))
    pm.save_pretrained(str(ad))
    url = str(tmp_path / "s")
    modelstore.init(url, bert_lora["pre"])
    r = CliRunner().invoke(main, ["add-task", url, "x", "--lora", str(ad)])
    assert r.exit_code == 1 and "DoRA" in r.output.replace("dora", "DoRA") and r.output.count("\n") == 1, r.output
    assert modelstore.open(url).tasks() == []


def test_streamed_lora_load_equals_the_cached_one(bert_lora, tmp_path):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_lora["pre"])
    modelstore.add_lora_task(url, "t", bert_lora["ad1"], rank=3)
    a = modelstore.open(url, cache_base=True).load("t")
    b = modelstore.open(url, cache_base=False).load("t", dtype=torch.float32)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_config_fields_are_an_allow_list(bert_lora, tmp_path):
    """Every field PEFT writes today is known; a field set that modelstore does not know (a newer
    PEFT's) or one that changes the weights (ensure_weight_tying) is refused by name, in one line."""
    from modelstore.kinds.lora import adapter as adapter_module
    known = adapter_module._USED_FIELDS | adapter_module._INERT_FIELDS | set(adapter_module._UNSUPPORTED_FIELDS)
    assert set(peft.LoraConfig(r=4, target_modules=["query"]).to_dict()) <= known
    url = str(tmp_path / "s")
    modelstore.init(url, bert_lora["pre"])
    for field, value, ok in [("use_hypothetical_variant", True, False), ("use_hypothetical_variant", False, True),
                             ("ensure_weight_tying", True, False), ("ensure_weight_tying", False, True)]:
        ad = tmp_path / f"{field}-{value}"
        shutil.copytree(bert_lora["ad1"], ad)
        cfg = json.loads((ad / "adapter_config.json").read_text())
        cfg[field] = value
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
        r = CliRunner().invoke(main, ["add-task", url, f"t{len(modelstore.open(url).tasks())}", "--lora", str(ad)])
        if ok:
            assert r.exit_code == 0, r.output
        else:
            assert r.exit_code == 1 and field in r.output and r.output.count("\n") == 1, r.output


def test_verify_takes_the_adapter_or_the_merged_model(bert_lora, tmp_path):
    """--lora compares against θ0 + s·B·A of the original adapter; it must agree with comparing
    against PEFT's own merge_and_unload of it, saved as a checkpoint (--original)."""
    from safetensors.torch import save_file
    url = str(tmp_path / "s")
    modelstore.init(url, bert_lora["pre"])
    modelstore.add_lora_task(url, "full", bert_lora["ad1"], rank=8)
    modelstore.add_lora_task(url, "cut", bert_lora["ad1"], rank=2)
    merged = str(tmp_path / "merged.safetensors")
    save_file({k: v.contiguous() for k, v in bert_lora["merged1"].items()}, merged)
    runner = CliRunner()
    r = json.loads(runner.invoke(main, ["verify", url, "full", "--lora", bert_lora["ad1"], "--json"]).output)
    assert r["ok"] and r["rel_error"] < 1e-6
    by_adapter = json.loads(runner.invoke(main, ["verify", url, "cut", "--lora", bert_lora["ad1"], "--json"]).output)
    by_merge = json.loads(runner.invoke(main, ["verify", url, "cut", "--original", merged, "--json"]).output)
    assert by_adapter["rel_error"] > 1e-4
    assert abs(by_adapter["rel_error"] - by_merge["rel_error"]) < 1e-6 * by_merge["rel_error"]
    for args in ([], ["--lora", bert_lora["ad1"], "--original", merged]):
        r = runner.invoke(main, ["verify", url, "cut", *args])
        assert r.exit_code == 1 and "one of them" in r.output and r.output.count("\n") == 1, r.output


def test_a_peft_adapter_of_a_vit_whose_modules_transformers_renames(tmp_path):
    """PEFT names a transformers 5 ViT's modules (`layers.0.attention.q_proj`) where its checkpoint
    keeps `encoder.layer.0.attention.attention.query`: the adapter is placed on the base tensors
    transformers renames to those modules. The stored task at full rank is PEFT's merge_and_unload
    (a ViT classifier's adapter, `vit.`-prefixed, over a bare ViTModel base); verify --lora agrees
    and load_model serves it; the PEFT export loads back into a fresh model."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    base = ViTModel(cfg, add_pooling_layer=False)
    base.save_pretrained(tmp_path / "pre")

    def fresh():
        m = ViTForImageClassification(cfg)
        m.vit.load_state_dict(base.state_dict())
        torch.manual_seed(9)
        torch.nn.init.normal_(m.classifier.weight)
        return m

    merged = _adapter(fresh(), tmp_path / "ad", 1, r=4, target_modules=["q_proj", "v_proj", "fc1"],
                      modules_to_save=["classifier"])
    keys = list(__import__("safetensors.torch").torch.load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert any(".q_proj.lora_A" in k for k in keys)
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    modelstore.add_lora_task(url, "t", str(tmp_path / "ad"), rank=4)
    stored = modelstore.load("t", url)
    renamed = {"vit.encoder.layer.1.attention.attention.query.weight": "vit.layers.1.attention.q_proj.weight",
               "vit.encoder.layer.0.intermediate.dense.weight": "vit.layers.0.mlp.fc1.weight"}
    for checkpoint_name, module_name in renamed.items():
        got = stored.get(checkpoint_name, stored.get(checkpoint_name.removeprefix("vit.")))
        assert got is not None and not torch.equal(got, base.state_dict()[module_name.removeprefix("vit.")])
        torch.testing.assert_close(got, merged[module_name], rtol=1e-5, atol=1e-6)
    r = json.loads(CliRunner().invoke(main, ["verify", url, "t", "--lora", str(tmp_path / "ad"), "--json"]).output)
    assert r["ok"] and r["rel_error"] < 1e-6
    served = modelstore.load_model("t", url, ViTForImageClassification).state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(served[k], v, rtol=1e-5, atol=1e-6, msg=k)
    r = CliRunner().invoke(main, ["export", url, "t", str(tmp_path / "out"), "--format", "peft"])
    assert r.exit_code == 0, r.output
    again = peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "out")).merge_and_unload().state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(again[k], v, rtol=1e-5, atol=1e-6, msg=k)
