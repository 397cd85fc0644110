"""Fine-tunes as the ecosystem saves them: a classification model over a bare base (keys prefixed
`bert.`, a new head), and a buffer (position_ids) that one transformers version saves and another
does not."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import finetuned_copy, tiny_bert_config
from safetensors.torch import load_file, save_file
from spec_reader import read_task

import modelstore
from modelstore.evaluation.weights import verify


@pytest.fixture(scope="module")
def classifier(bert_models, tmp_path_factory):
    """A BertForSequenceClassification fine-tuned from the tiny BertModel base, saved by transformers."""
    from transformers import BertForSequenceClassification
    root = tmp_path_factory.mktemp("cls")
    m = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    m.bert.load_state_dict(bert_models["sd0"], strict=True)
    sd = finetuned_copy({k: v.detach().clone() for k, v in m.state_dict().items()}, seed=7)
    m.load_state_dict(sd)
    m.save_pretrained(str(root / "cls"))
    return str(root / "cls"), load_file(os.path.join(root, "cls", "model.safetensors"))


def test_prefixed_fine_tune_is_a_sparse_delta_over_the_bare_base(bert_models, classifier, tmp_path):
    path, want = classifier
    assert all(k.startswith("bert.") or k.startswith("classifier.") for k in want)
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]})
    s.add_task("cls", path, keep=1.0, value_dtype="float32")
    table = {t["name"]: t for t in s.table("cls")}
    assert table["bert.encoder.layer.0.attention.self.query.weight"]["kind"] == "sparse"
    query = "encoder.layer.0.attention.self.query.weight"
    assert table[f"bert.{query}"]["base"] == query
    assert table["classifier.weight"]["kind"] == "dense"  # the head has no base tensor: stored whole
    got = modelstore.open(str(tmp_path / "s"), cache_base=False).load("cls")
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    s.load_into(model, "cls")
    x = torch.randint(0, 97, (2, 7))
    ref = BertForSequenceClassification.from_pretrained(path).eval()
    torch.testing.assert_close(model.eval()(x).logits, ref(x).logits, rtol=0, atol=1e-5)
    assert verify(s, "cls", path)["rel_error"] < 1e-6


def test_prefixed_fine_tunes_merge_into_the_base(bert_models, classifier, tmp_path):
    """build matches names too: the merged base is θ0 + λ·Σ(θt − θ0) over the base's tensors."""
    path, want = classifier
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], {"cls": path, "alpha": bert_models["tasks"]["alpha"]},
                         merge_options={"lam": 0.5})
    base, sd0, alpha = s.base("merged"), bert_models["sd0"], bert_models["sds"]["alpha"]
    for k, v0 in sd0.items():
        if v0.dtype.is_floating_point:
            ref = v0.double() + 0.5 * ((want["bert." + k].double() - v0.double()) + (alpha[k].double() - v0.double()))
            torch.testing.assert_close(base[k].double(), ref, rtol=1e-6, atol=1e-6, msg=k)
    assert set(s.load("cls")) == set(want)


def test_a_buffer_the_task_lacks_comes_from_the_base(bert_models, tmp_path):
    """A base saved with embeddings.position_ids (transformers 4.x) and a task saved without it (5.x)."""
    sd0 = dict(bert_models["sd0"])
    sd0["embeddings.position_ids"] = torch.arange(24).unsqueeze(0)
    save_file(sd0, str(tmp_path / "pre.safetensors"))
    task = {k: v for k, v in bert_models["sds"]["alpha"].items()}
    save_file(task, str(tmp_path / "alpha.safetensors"))
    s = modelstore.build(str(tmp_path / "s"), str(tmp_path / "pre.safetensors"),
                         {"alpha": str(tmp_path / "alpha.safetensors")}, keep=1.0, value_dtype="float32")
    got = s.load("alpha")
    assert torch.equal(got["embeddings.position_ids"], sd0["embeddings.position_ids"])
    assert verify(s, "alpha", str(tmp_path / "alpha.safetensors"))["rel_error"] < 1e-6
    s.add_task("again", str(tmp_path / "alpha.safetensors"))
    assert torch.equal(s.load("again")["embeddings.position_ids"], sd0["embeddings.position_ids"])
    # a floating tensor the task lacks is still refused, naming it
    del task["pooler.dense.bias"]
    save_file(task, str(tmp_path / "broken.safetensors"))
    with pytest.raises(modelstore.InputError, match="lacks tensor 'pooler.dense.bias'"):
        s.add_task("broken", str(tmp_path / "broken.safetensors"))


@pytest.mark.parametrize("kind", ["fft", "tall-mask", "exact"])
def test_a_class_without_a_base_tensor_is_stored_without_it(bert_models, tmp_path, kind):
    """A token classifier has no pooler, its BertModel base has one: the fine-tune (config.json
    naming its class) is stored as it is, loads with its own tensors only and builds its class;
    a BertModel checkpoint that lost its pooler, whose class has one, is still refused."""
    from transformers import BertForTokenClassification
    m = BertForTokenClassification(tiny_bert_config(num_labels=4))
    m.bert.load_state_dict({k: v for k, v in bert_models["sd0"].items() if not k.startswith("pooler.")}, strict=True)
    m.load_state_dict(finetuned_copy({k: v.detach().clone() for k, v in m.state_dict().items()}, seed=9))
    m.save_pretrained(str(tmp_path / "tok"))
    want = load_file(str(tmp_path / "tok" / "model.safetensors"))
    assert "bert.pooler.dense.weight" not in want and "pooler.dense.weight" in bert_models["sd0"]
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"],
                                                                   "beta": bert_models["tasks"]["beta"]}, kind=kind)
    options = {"keep": 1.0, "value_dtype": "float32"} if kind == "fft" else {}
    s.add_task("tok", str(tmp_path / "tok"), kind=kind, **options)
    got = s.load("tok")
    assert sorted(got) == sorted(want)
    if kind == "exact":
        assert [k for k in want if not torch.equal(got[k], want[k])] == []
    elif kind == "fft":  # every delta kept in float32, over the merged base: to float32 rounding
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    spec = read_task(s.url, "tok")  # the spec's reader (numpy and zarr alone) makes the same tensors
    assert sorted(spec) == sorted(want)
    for k, (a, _) in spec.items():
        np.testing.assert_array_equal(a, got[k].numpy(), err_msg=k)
    model = modelstore.load_model("tok", s.url, dtype=torch.float32)
    assert type(model).__name__ == "BertForTokenClassification"
    # a checkpoint of the base's own class without its pooler lost a tensor its class has
    lost = {k: v for k, v in bert_models["sd0"].items() if k != "pooler.dense.bias"}
    os.makedirs(tmp_path / "lost")
    save_file(lost, str(tmp_path / "lost" / "model.safetensors"))
    bert_models["cfg"].save_pretrained(str(tmp_path / "lost"))
    with pytest.raises(modelstore.InputError, match="lacks tensor 'pooler.dense.bias' that the base has and its "
                                                    "architecture"):
        s.add_task("lost", str(tmp_path / "lost"))
    assert sorted(modelstore.open(s.url).tasks()) == ["alpha", "beta", "tok"]
