"""`modelstore eval`: a stored task against its original on data, for a BERT classifier with
labels and a GPT-2 LM, each metric recomputed here one example at a time (no padding, no batching)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import TEXTS, finetuned_copy, make_tokenizer, tiny_bert_config

import modelstore
from modelstore.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(store url, original dir) for a BERT classifier task and a GPT-2 LM task, kept at 5%."""
    from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    out = {}
    for kind in ("bert", "gpt2"):
        tok = make_tokenizer(kind)
        if kind == "bert":
            cfg = tiny_bert_config(vocab_size=len(tok), num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                                   label2id={"neg": 0, "neu": 1, "pos": 2})
            m = BertForSequenceClassification(cfg)
        else:
            m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=32))
        pre, ft = root / f"{kind}-pre", root / f"{kind}-ft"
        m.save_pretrained(pre)
        tok.save_pretrained(pre)
        sd = finetuned_copy({k: v.detach().clone() for k, v in m.state_dict().items()}, seed=3, scale=0.2)
        m.load_state_dict(sd)
        m.save_pretrained(ft)
        tok.save_pretrained(ft)
        url = str(root / f"{kind}-store")
        modelstore.build(url, str(pre), {"t": str(ft)}, keep=0.05)
        out[kind] = (url, str(ft))
    return out


def _data(tmp_path, labels=None) -> str:
    path = tmp_path / "data.jsonl"
    with open(path, "w") as fh:
        for i, t in enumerate(TEXTS):
            fh.write(json.dumps({"text": t, **({"label": labels[i]} if labels else {})}) + "\n")
    return str(path)


def _dir(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def _pair(url, original, cls):
    ref = cls.from_pretrained(original).eval()
    mine = cls.from_pretrained(original).eval()
    modelstore.open(url).load_into(mine, "t")
    return ref, mine


def test_classifier_accuracy_agreement_and_kl(models, tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification
    url, original = models["bert"]
    labels = ["neg", "pos", 1, 0, "neu", 2, 1, 0]
    res = CliRunner().invoke(main, ["eval", url, "t", "--original", original, "--data", _data(tmp_path, labels),
                                    "--batch-size", "3", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    ref, mine = _pair(url, original, BertForSequenceClassification)
    tok = AutoTokenizer.from_pretrained(original)
    ids = [{"neg": 0, "neu": 1, "pos": 2}.get(y, y) for y in labels]
    right_ref = right_mine = agree = 0
    kl = 0.0
    with torch.no_grad():
        for text, y in zip(TEXTS, ids):
            enc = tok(text, return_tensors="pt")
            a, b = ref(**enc).logits[0].double(), mine(**enc).logits[0].double()
            right_ref += int(a.argmax()) == y
            right_mine += int(b.argmax()) == y
            agree += int(a.argmax()) == int(b.argmax())
            pa = a.softmax(-1)
            kl += float((pa * (pa.log() - b.log_softmax(-1))).sum())
    n = len(TEXTS)
    assert r["kind"] == "classification" and r["examples"] == n
    assert r["accuracy_original"] == right_ref / n and r["accuracy_stored"] == right_mine / n
    assert r["accuracy_difference"] == (right_mine - right_ref) / n
    assert r["agreement"] == agree / n
    assert r["mean_kl"] == pytest.approx(kl / n, rel=1e-6, abs=1e-9) and r["mean_kl"] > 0


def test_causal_lm_perplexity_and_agreement(models, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    url, original = models["gpt2"]
    res = CliRunner().invoke(main, ["eval", url, "t", "--original", original, "--data", _data(tmp_path),
                                    "--batch-size", "4", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    ref, mine = _pair(url, original, GPT2LMHeadModel)
    tok = AutoTokenizer.from_pretrained(original)
    nll_ref = nll_mine = 0.0
    tokens = agree = 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                continue
            a = ref(ids).logits[0, :-1].double().log_softmax(-1)
            b = mine(ids).logits[0, :-1].double().log_softmax(-1)
            target = ids[0, 1:]
            nll_ref -= float(a[torch.arange(len(target)), target].sum())
            nll_mine -= float(b[torch.arange(len(target)), target].sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            tokens += len(target)
    assert r["kind"] == "causal-lm" and r["tokens"] == tokens
    assert r["perplexity_original"] == pytest.approx(math.exp(nll_ref / tokens), rel=1e-6)
    assert r["perplexity_stored"] == pytest.approx(math.exp(nll_mine / tokens), rel=1e-6)
    assert r["top1_agreement"] == agree / tokens and r["perplexity_stored"] != r["perplexity_original"]


def test_bad_eval_inputs_are_one_line_errors(models, tmp_path):
    url, original = models["bert"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a cat"}\n{"txt": "no"}\n')
    for args, what in [(["--data", str(bad)], 'line 2 is not a JSON object with a "text"'),
                       (["--data", str(tmp_path / "none.jsonl")], "--data"),
                       (["--data", _data(tmp_path, ["neg", "meh"] + [0] * 6)], "label 'meh'"),
                       (["--data", _data(_dir(tmp_path, "7"), [0, 1, 7] + [0] * 5)],
                        "example 3 has label 7, and the model has 3 classes (0 to 2)"),
                       (["--data", _data(_dir(tmp_path, "-1"), [-1] + [0] * 7)], "example 1 has label -1")]:
        r = CliRunner().invoke(main, ["eval", url, "t", "--original", original, *args])
        assert r.exit_code == 1 and what in r.output and r.output.count("\n") == 1, r.output


def test_eval_against_an_adapter_runs_the_adapters_own_head(tmp_path):
    """`eval --lora`: the original is θ0 with the adapter's updates and the head it saves whole
    (PEFT's modules_to_save), not the stored task's head: an adapter whose head was negated
    agrees as PEFT's merged model of it does (an independent computation), and another task's
    adapter, with a head of another shape, is refused in one line."""
    import shutil

    import peft
    from safetensors.torch import load_file, save_file
    from transformers import BertForSequenceClassification, BertModel
    tok = make_tokenizer("bert")
    torch.manual_seed(0)
    base = BertModel(tiny_bert_config(vocab_size=len(tok)))
    base.save_pretrained(tmp_path / "pre")
    tok.save_pretrained(tmp_path / "pre")

    def classifier(labels: int) -> BertForSequenceClassification:
        m = BertForSequenceClassification(tiny_bert_config(vocab_size=len(tok), num_labels=labels))
        m.bert.load_state_dict(base.state_dict())
        return m

    for name, labels in (("ad", 2), ("three", 3)):
        torch.manual_seed(labels)
        pm = peft.get_peft_model(classifier(labels), peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                                     target_modules=["query", "value"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "classifier" in n:
                    p.normal_(0, 0.5)
        pm.save_pretrained(tmp_path / name)
    shutil.copytree(tmp_path / "ad", tmp_path / "flip")
    weights = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert any("classifier" in k for k in weights)
    save_file({k: -v if "classifier" in k else v for k, v in weights.items()},
              str(tmp_path / "flip" / "adapter_model.safetensors"))
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    modelstore.add_lora_task(url, "t", str(tmp_path / "ad"), rank=4)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    def evaluated(adapter: str, code: int = 0) -> dict:
        r = CliRunner().invoke(main, ["eval", url, "t", "--lora", str(tmp_path / adapter), "--data", str(data),
                                      "--json"])
        assert r.exit_code == code, r.output
        return json.loads(r.stdout) if code == 0 else {"error": r.output}

    assert evaluated("ad")["agreement"] == 1
    ref = peft.PeftModel.from_pretrained(classifier(2), str(tmp_path / "flip")).merge_and_unload().eval()
    mine = modelstore.load_model("t", url, dtype=torch.float32)
    with torch.no_grad():
        enc = tok(TEXTS, return_tensors="pt", padding=True)
        agree = (ref(**enc).logits.argmax(-1) == mine(**enc).logits.argmax(-1)).double().mean().item()
    assert agree < 0.9 and evaluated("flip")["agreement"] == pytest.approx(agree)
    error = evaluated("three", code=1)["error"]
    assert "saves 'classifier." in error and "give the adapter this task was added from" in error
    assert error.count("\n") == 1
