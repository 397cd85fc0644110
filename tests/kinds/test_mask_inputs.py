"""The 1-bit kinds (tall-mask, emr, bitdelta) take every fine-tune fft takes: one saved without a
buffer its base has (transformers 5 no longer saves embeddings.position_ids), and a classifier saved
over a bare base (`bert.` names, a new head). Each load is checked against the kind's formula
computed here in numpy from the original tensors and the store's bases; a head comes back bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import finetuned_copy, np_f32, tiny_bert_config
from safetensors.torch import load_file, save_file

import modelstore
from modelstore.cli import main

KINDS = ["tall-mask", "emr", "bitdelta"]
LAMBDA = 0.5


def base_of(name: str, base: dict[str, torch.Tensor]) -> str | None:
    """The base tensor a task tensor stands for: its own name, or without a model prefix (`bert.`)."""
    if name in base:
        return name
    tail = name.partition(".")[2]
    return tail if tail in base else None


def expected(store: modelstore.Store, task: str, original: dict[str, torch.Tensor], prefix: str = "") \
        -> dict[str, np.ndarray]:
    """What `load(task)` must give, from the kind's formula (spec/FORMAT.md, section 10): compressed
    tensors (floating, of the base's shape; bitdelta: matrices) rebuilt from their bits computed
    here, the others as the original has them, and a buffer the original lacks from the base."""
    e = store.entry(task)
    kind, base = e["kind"], store.base(e["base"])
    b0 = store.base("pretrained") if kind != "bitdelta" else None
    packed = {}
    for k, v in original.items():
        b = base_of(k, base)
        if b is not None and v.dtype.is_floating_point and tuple(v.shape) == tuple(base[b].shape) \
                and (kind != "bitdelta" or v.dim() == 2):
            packed[k] = b
    want = {k: np_f32(v) for k, v in original.items() if k not in packed}
    want.update({prefix + b: np_f32(t) for b, t in base.items() if prefix + b not in original})
    rows = {k: (np_f32(original[k]), np_f32(base[b]), None if b0 is None else np_f32(b0[b])) for k, b in packed.items()}
    if kind == "tall-mask":
        for k, (t, merged, p) in rows.items():
            m = np.abs(t - p) >= np.float32(LAMBDA) * np.abs((merged - p) - (t - p))
            want[k] = np.where(m, merged, p)
    elif kind == "emr":
        masks = {k: (t - p) * (merged - p) > 0 for k, (t, merged, p) in rows.items()}
        scale = np.float32(sum(np.abs(t - p).astype(np.float64).sum() for t, _, p in rows.values())
                           / sum(np.abs(np.where(masks[k], merged - p, 0)).astype(np.float64).sum()
                                 for k, (_, merged, p) in rows.items()))
        assert e["params"]["scale"] == float(scale)
        for k, (_, merged, p) in rows.items():
            want[k] = np.where(masks[k], p + scale * (merged - p), p)
    else:
        for k, (t, b, _) in rows.items():
            d = t - b
            s = np.float32(np.abs(d).astype(np.float64).sum() / d.size)
            want[k] = b + np.where(d >= 0, s, -s)
    assert packed and all(t["kind"] == "bits" for t in store.table(task) if t["name"] in packed)
    return want


def check(store: modelstore.Store, task: str, original: dict[str, torch.Tensor], prefix: str = "") -> None:
    got, want = store.load(task), expected(store, task, original, prefix)
    assert set(got) == set(want), task
    for k, w in want.items():
        np.testing.assert_array_equal(np_f32(got[k]), w.astype(np.float32), err_msg=f"{task}/{k}")


@pytest.fixture(scope="module")
def v4_base(bert_models, tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """The pre-trained model as transformers 4 saved it: with embeddings.position_ids."""
    sd0 = dict(bert_models["sd0"])
    assert "embeddings.position_ids" not in sd0 and "embeddings.position_ids" not in bert_models["sds"]["alpha"]
    sd0["embeddings.position_ids"] = torch.arange(24).unsqueeze(0)
    path = str(tmp_path_factory.mktemp("v4") / "pre.safetensors")
    save_file(sd0, path)
    return path, sd0


@pytest.mark.parametrize("kind", KINDS)
def test_a_fine_tune_without_a_buffer_the_base_has(bert_models, v4_base, tmp_path, kind):
    pre, sd0 = v4_base
    t, sds = bert_models["tasks"], bert_models["sds"]
    opts = {"tall_lambda": LAMBDA} if kind == "tall-mask" else {}
    s = modelstore.build(str(tmp_path / "s"), pre, {"alpha": t["alpha"], "beta": t["beta"]}, kind=kind,
                         kind_options=opts)
    assert s.entry("alpha")["kind"] == kind
    for task in ("alpha", "beta"):
        check(s, task, sds[task])
        assert torch.equal(s.load(task)["embeddings.position_ids"], sd0["embeddings.position_ids"])
    # add-task, through the CLI, takes it as well
    extra = ["--tall-lambda", str(LAMBDA)] if kind == "tall-mask" else []
    r = CliRunner().invoke(main, ["add-task", s.url, "gamma", t["gamma"], "--kind", kind, *extra])
    assert r.exit_code == 0, r.output
    check(modelstore.open(s.url), "gamma", sds["gamma"])


@pytest.fixture(scope="module")
def classifier(bert_models, tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A BertForSequenceClassification fine-tuned from the tiny BertModel base, saved by transformers."""
    from transformers import BertForSequenceClassification
    root = tmp_path_factory.mktemp("cls")
    m = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    m.bert.load_state_dict(bert_models["sd0"], strict=True)
    m.load_state_dict(finetuned_copy({k: v.detach().clone() for k, v in m.state_dict().items()}, seed=21))
    m.save_pretrained(str(root / "cls"))
    sd = load_file(os.path.join(root, "cls", "model.safetensors"))
    assert "classifier.weight" in sd and all(k.startswith(("bert.", "classifier.")) for k in sd)
    return str(root / "cls"), sd


@pytest.mark.parametrize("kind", KINDS)
def test_a_classifier_over_a_bare_base(bert_models, classifier, tmp_path, kind):
    path, sd = classifier
    opts = {"tall_lambda": LAMBDA} if kind == "tall-mask" else {}
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], {"cls": path, "alpha": bert_models["tasks"]["alpha"]},
                         kind=kind, kind_options=opts)
    table = {t["name"]: t for t in s.table("cls")}
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert table[q]["kind"] == "bits" and table[q]["base"] == q.removeprefix("bert.")
    assert table["classifier.weight"]["kind"] == "dense"  # no base tensor: stored whole
    check(s, "cls", sd, prefix="bert.")
    check(s, "alpha", bert_models["sds"]["alpha"])
    got = modelstore.open(s.url, cache_base=False).load("cls")  # the base streamed, not cached
    for k in ("classifier.weight", "classifier.bias"):
        assert torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype
    # it fits the model it came from, and switching to it gives what a load gives
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    s.load_into(model, "cls")
    assert all(torch.equal(v, got[k]) for k, v in model.state_dict().items() if k in got)
    s.switch(model, "cls")
    assert all(torch.equal(v, got[k]) for k, v in model.state_dict().items() if k in got)


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_float_tensor_is_refused_as_fft_refuses_it(bert_models, tmp_path, kind):
    t = bert_models["tasks"]
    s = modelstore.build(str(tmp_path / "s"), bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]},
                         kind=kind)
    broken = {k: v for k, v in bert_models["sds"]["gamma"].items() if k != "pooler.dense.weight"}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    r = CliRunner().invoke(main, ["add-task", s.url, "broken", str(tmp_path / "broken.safetensors"), "--kind", kind])
    assert r.exit_code == 1 and "lacks tensor 'pooler.dense.weight'" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert modelstore.open(s.url).tasks() == ["alpha", "beta"]
