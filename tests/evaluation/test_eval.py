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
                       (["--data", _data(tmp_path, ["neg", "meh"] + [0] * 6)], "label 'meh'")]:
        r = CliRunner().invoke(main, ["eval", url, "t", "--original", original, *args])
        assert r.exit_code == 1 and what in r.output and r.output.count("\n") == 1, r.output
