"""Real classifiers end to end: BertForSequenceClassification fine-tunes saved by transformers 5
(`bert.…` names, no position_ids) over a bare BertModel base saved with `embeddings.position_ids`
(as transformers 4 saved it), served through load_model, switch, load_into, eval and export, each
checked against the original fine-tune or a fresh load."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import TEXTS, finetuned_copy, make_tokenizer, tiny_bert_config
from safetensors.torch import load_file, save_file

import modelstore
from modelstore.cli import main
from modelstore.serving.export import export

HELD_OUT = ["a mat ran in the cat", "park park dog", "on the dog a cat sat", "the in a", "mat", "dog ran on a park"]
#: task -> its labels; sst and spam have the same head shape, so a model switches between them
LABELS = {"sst": ["negative", "positive"], "spam": ["ham", "spam"], "nli": ["entail", "neutral", "contradict"]}


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """A store of three classifier tasks (stored exactly: keep 1.0 in float32) on a task-arithmetic
    base, one lossy task, one task added from a bare safetensors file (no config.json), and the
    original fine-tune directories (with the tokenizer, as a fine-tune ships)."""
    from transformers import BertForSequenceClassification, BertModel
    root = tmp_path_factory.mktemp("classifiers")
    tok = make_tokenizer("bert")  # a WordPiece vocabulary trained here (offline), as test_eval makes it
    torch.manual_seed(0)
    cfg = tiny_bert_config(vocab_size=len(tok), architectures=["BertModel"])
    sd0 = {k: v.detach().clone() for k, v in BertModel(cfg).state_dict().items()}
    pre = root / "pre"
    pre.mkdir()
    save_file({**sd0, "embeddings.position_ids": torch.arange(cfg.max_position_embeddings)[None]},
              str(pre / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(pre)
    tok.save_pretrained(pre)
    originals = {}
    for i, (name, labels) in enumerate(LABELS.items()):
        c = tiny_bert_config(vocab_size=len(tok), num_labels=len(labels), id2label=dict(enumerate(labels)),
                             label2id={lab: j for j, lab in enumerate(labels)},
                             problem_type="single_label_classification")
        m = BertForSequenceClassification(c)
        m.bert.load_state_dict(sd0)
        m.load_state_dict(finetuned_copy(m.state_dict(), seed=20 + i, scale=0.5))
        with torch.no_grad():  # a head that tells texts apart (an untrained one says the same for all)
            m.eval().classifier.weight.normal_(0, 20, generator=torch.Generator().manual_seed(i))
            pooled = m.bert(**tok(TEXTS, return_tensors="pt", padding=True)).pooler_output
            m.classifier.bias.sub_(m.classifier(pooled).mean(0))
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        originals[name] = str(root / name)
    saved = load_file(os.path.join(originals["sst"], "model.safetensors"))
    assert "bert.embeddings.word_embeddings.weight" in saved and not any("position_ids" in k for k in saved)
    assert "embeddings.position_ids" in load_file(str(pre / "model.safetensors"))
    url = str(root / "s")
    modelstore.build(url, str(pre), originals, keep=1.0, value_dtype="float32")
    s = modelstore.open(url, mode="a")
    s.add_task("sst-lossy", originals["sst"], keep=0.2)
    bare = str(root / "spam.safetensors")
    shutil.copy(os.path.join(originals["spam"], "model.safetensors"), bare)
    s.add_task("bare", bare, keep=0.5)
    return {"url": url, "pre": str(pre), "originals": originals, "root": root}


def _run(model, tok, texts=HELD_OUT) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


def _assert_same_tensors(got: torch.nn.Module, want: torch.nn.Module, what: str) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def test_load_model_builds_each_task_with_its_own_labels(clf):
    from transformers import AutoTokenizer, BertForSequenceClassification
    store = modelstore.open(clf["url"])
    tok = AutoTokenizer.from_pretrained(clf["pre"])
    for name, labels in LABELS.items():
        original = BertForSequenceClassification.from_pretrained(clf["originals"][name]).eval()
        for cls in (None, "BertForSequenceClassification", BertForSequenceClassification):
            m = modelstore.load_model(name, store, cls)
            assert type(m) is BertForSequenceClassification and m.config.num_labels == len(labels)
            assert m.config.id2label == dict(enumerate(labels)) and m.config.label2id == original.config.label2id
            assert m.config.problem_type == "single_label_classification"
            want = original.state_dict()
            assert m.state_dict().keys() == want.keys()
            for k, v in m.state_dict().items():  # kept exactly but for float32 rounding of base + delta
                torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7, msg=f"{name} {k}")
            assert torch.equal(_run(m, tok).argmax(-1), _run(original, tok).argmax(-1))
        assert json.loads(store.task_config(name))["architectures"] == ["BertForSequenceClassification"]
    # a task added without a config.json takes its base's: the architecture must then be named
    assert store.task_config("bare") == store.manifest["bases"]["merged"]["config_json"]
    m = modelstore.load_model("bare", store, "BertForSequenceClassification")
    assert m.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    torch.testing.assert_close(m.classifier.weight, store.load("bare")["classifier.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_back_and_forth_equals_fresh_loads(clf, dtype):
    """The issue's case: a model loaded as one task and switched to another held the old task's
    weights plus the new one's delta; every tensor, the head included, must equal a fresh load."""
    from transformers import BertForSequenceClassification
    store = modelstore.open(clf["url"])
    two_labels = ["sst", "spam", "sst-lossy", "bare"]
    fresh = {t: modelstore.load_model(t, store, BertForSequenceClassification, dtype=dtype) for t in two_labels}
    rng = random.Random(3)
    order = ["spam", "sst", "spam", "sst-lossy", "bare", "sst"] + [rng.choice(two_labels) for _ in range(6)]
    for resident in (0, "1GB"):
        model = modelstore.load_model("sst", store, dtype=dtype)
        for task in order:
            assert store.switch(model, task, resident=resident) is model
            _assert_same_tensors(model, fresh[task], f"switch to {task} (resident {resident})")
    model = BertForSequenceClassification(fresh["sst"].config).to(dtype).eval()  # not from the store: written whole
    for task in ("spam", "sst"):
        store.switch(model, task)
        _assert_same_tensors(model, fresh[task], f"first switch to {task}")


def test_load_into_and_eval_take_the_task_into_its_original_architecture(clf, tmp_path):
    from transformers import BertForSequenceClassification
    store = modelstore.open(clf["url"])
    for name in LABELS:
        model = BertForSequenceClassification.from_pretrained(clf["originals"][name]).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        store.load_into(model, name)  # position_ids, taken from the base, is the model's own buffer
        _assert_same_tensors(model, modelstore.load_model(name, store), f"load_into {name}")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(HELD_OUT)))
    r = CliRunner().invoke(main, ["eval", clf["url"], "nli", "--original", clf["originals"]["nli"],
                                  "--data", str(data), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "classification" and out["examples"] == len(HELD_OUT)
    assert out["agreement"] == 1.0 and out["mean_kl"] < 1e-9 and out["accuracy_difference"] == 0


def _pipeline_predictions(model_dir: str) -> list[dict]:
    from transformers import pipeline
    return pipeline("text-classification", model=model_dir)(HELD_OUT)


def test_export_serves_a_text_classification_pipeline(clf, tmp_path):
    store = modelstore.open(clf["url"])
    kept = set(store.model_files("merged"))
    for name, labels in LABELS.items():
        out = tmp_path / name
        r = CliRunner().invoke(main, ["export", clf["url"], name, str(out)])
        assert r.exit_code == 0, r.output
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"]
        assert config["id2label"] == {str(i): lab for i, lab in enumerate(labels)}
        assert kept <= set(os.listdir(out)) and "tokenizer.json" in kept
        weights = load_file(str(out / "model.safetensors"))
        assert set(weights) == set(load_file(os.path.join(clf["originals"][name], "model.safetensors")))
        got, want = _pipeline_predictions(str(out)), _pipeline_predictions(clf["originals"][name])
        assert [p["label"] for p in got] == [p["label"] for p in want] and {p["label"] for p in got} <= set(labels)
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-5)
    assert len({p["label"] for p in _pipeline_predictions(str(tmp_path / "nli"))}) > 1  # the check can fail


def test_the_task_config_is_checked_and_travels(clf, tmp_path):
    url = str(tmp_path / "s")
    shutil.copytree(clf["url"], url)
    store = modelstore.open(url)
    copy = str(tmp_path / "copy")
    store.sync_to(copy)
    assert modelstore.open(copy).task_config("nli") == store.task_config("nli")
    path = os.path.join(url, store.entry("nli")["path"], "files", "config.json")
    with open(path, "r+b") as fh:
        fh.write(b" ")
    assert "task 'nli'" in modelstore.open(url).check().damaged
    with pytest.raises(modelstore.CorruptStoreError, match="model file 'config.json' is damaged"):
        modelstore.load_model("nli", url)
    os.remove(path)
    with pytest.raises(modelstore.CorruptStoreError, match="'config.json' is missing"):
        modelstore.open(url).task_config("nli")
    bad = tmp_path / "bad"
    shutil.copytree(clf["originals"]["sst"], bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(modelstore.InputError, match="config.json is not a JSON object") as e:
        modelstore.open(url, mode="a").add_task("bad", str(bad))
    assert "\n" not in str(e.value) and "bad" not in modelstore.open(url).tasks()
    assert not os.path.exists(os.path.join(url, "tasks", "bad"))  # refused before anything was written


def test_a_task_that_cannot_be_placed_is_a_one_line_error_and_writes_nothing(clf):
    from transformers import (
        BertForSequenceClassification,
        BertModel,
        GPT2Config,
        GPT2Model,
    )
    store = modelstore.open(clf["url"])
    cfg = modelstore.load_model("sst", store).config
    models = {"GPT2Model": GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)),
              "bare BertModel": BertModel(cfg)}  # the head has no place in it
    for what, model in models.items():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for write in (store.switch, store.load_into, lambda m, t: store.load_into(m, t, strict=False)):
            with pytest.raises(modelstore.InputError, match="task 'sst' does not fit this model: unexpected") as e:
                write(model, "sst")
            assert "\n" not in str(e.value), what
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), what
    model = BertForSequenceClassification(cfg).eval()  # two labels: nli's three do not fit, found up front
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for write in (store.switch, store.load_into):
        wrong_head = "classifier.(weight|bias) has shape \\[3.*in the task and \\[2"
        with pytest.raises(modelstore.InputError, match=wrong_head) as e:
            write(model, "nli")
        assert "\n" not in str(e.value)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing written
    with pytest.raises(modelstore.InputError, match="does not fit BertModel: unexpected.*classifier"):
        modelstore.load_model("sst", store, BertModel)


@pytest.mark.parametrize("kind", ["tall-mask", "emr", "bitdelta"])
def test_one_bit_kinds_serve_classifiers(clf, kind, tmp_path):
    """The 1-bit kinds keep a head fine-tune where they accept one: labels, switching and export
    as for fft (lossy, so the export is compared with the stored task, not the original)."""
    from transformers import BertForSequenceClassification
    url = str(tmp_path / "s")
    shutil.copytree(clf["url"], url)
    store = modelstore.open(url, mode="a")
    try:
        store.add_task("one-bit", clf["originals"]["spam"], kind=kind, pretrained=clf["pre"])
    except modelstore.InputError as e:
        pytest.skip(f"{kind} tasks refuse head fine-tunes on this branch ({e})")
    m = modelstore.load_model("one-bit", store)
    assert m.config.id2label == {0: "ham", 1: "spam"}
    fresh = {t: modelstore.load_model(t, store, BertForSequenceClassification) for t in ("sst", "one-bit")}
    for task in ("sst", "one-bit", "sst", "one-bit"):
        store.switch(m, task)
        _assert_same_tensors(m, fresh[task], f"switch to {task}")
    out = str(tmp_path / "out")
    export(store, "one-bit", out)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    predicted = _run(fresh["one-bit"], tok).softmax(-1).max(-1)
    got = _pipeline_predictions(out)
    assert [p["label"] for p in got] == [m.config.id2label[int(i)] for i in predicted.indices]
    assert [p["score"] for p in got] == pytest.approx(predicted.values.tolist(), abs=1e-5)


def test_a_switch_writes_the_base_where_an_earlier_task_left_it_out(clf, tmp_path):
    """A task without the pooler (excluded from the store's selection) leaves a non-strict model's
    pooler alone; the next task, whose pooler is the base's (frozen while fine-tuning: stored as
    "the base's"), gets the base's pooler written first."""
    from transformers import BertForSequenceClassification
    base = load_file(os.path.join(clf["pre"], "model.safetensors"))
    full = load_file(os.path.join(clf["originals"]["sst"], "model.safetensors"))
    frozen, partial = str(tmp_path / "frozen.safetensors"), str(tmp_path / "no-pooler.safetensors")
    save_file({**full, **{f"bert.{k}": v for k, v in base.items() if k.startswith("pooler.")}}, frozen)
    save_file({k: v for k, v in full.items() if ".pooler." not in k}, partial)
    url = str(tmp_path / "s")
    modelstore.build(url, clf["pre"], {"frozen": frozen, "no-pooler": partial}, merge="none", exclude="pooler",
                     keep=0.3)
    store = modelstore.open(url)
    assert {t["count"] for t in store.table("frozen") if ".pooler." in t["name"]} == {0}
    fresh = modelstore.load_model("frozen", store, BertForSequenceClassification)
    model = BertForSequenceClassification(fresh.config).eval()
    with pytest.raises(modelstore.InputError, match="does not fit this model: missing \\['bert.pooler"):
        store.switch(model, "no-pooler")
    pooler = model.bert.pooler.dense.weight.clone()
    assert not torch.equal(pooler, fresh.bert.pooler.dense.weight)
    for i, task in enumerate(("no-pooler", "frozen", "no-pooler", "frozen")):
        store.switch(model, task, strict=False)
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in store.load(task).items() if k in got), task
        if i == 0:
            assert torch.equal(model.bert.pooler.dense.weight, pooler)  # not the task's: left alone
        if task == "frozen":
            _assert_same_tensors(model, fresh, task)



def test_an_image_classifier_whose_modules_transformers_renames_is_served(tmp_path):
    """transformers 5 builds ViT with renamed modules (`layers.0.attention.q_proj`) and keeps its
    checkpoints' names (`encoder.layer.0.attention.attention.query`), renaming as it loads: load_model,
    switch and export of ViT classifiers over a bare ViTModel base equal the originals, and the
    export serves an image-classification pipeline."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel, pipeline
    cfg = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64)
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    torch.manual_seed(0)
    base = ViTModel(ViTConfig(**cfg), add_pooling_layer=False)
    base.save_pretrained(tmp_path / "pre")
    proc.save_pretrained(tmp_path / "pre")
    assert "encoder.layer.0.attention.attention.query.weight" in load_file(str(tmp_path / "pre" / "model.safetensors"))
    originals = {}
    for i, labels in enumerate((["cat", "dog"], ["day", "night"])):
        m = ViTForImageClassification(ViTConfig(**cfg, num_labels=2, id2label=dict(enumerate(labels)),
                                                label2id={lab: j for j, lab in enumerate(labels)}))
        m.vit.load_state_dict(base.state_dict())
        m.load_state_dict(finetuned_copy(m.state_dict(), seed=40 + i, scale=0.5))
        m.save_pretrained(tmp_path / f"t{i}")
        originals[f"t{i}"] = ViTForImageClassification.from_pretrained(tmp_path / f"t{i}").eval()
    url = str(tmp_path / "s")
    modelstore.build(url, str(tmp_path / "pre"), {t: str(tmp_path / t) for t in originals}, keep=1.0,
                     value_dtype="float32")
    store = modelstore.open(url)
    for t, want in originals.items():
        got = modelstore.load_model(t, store)
        assert type(got) is ViTForImageClassification
        for k, v in got.state_dict().items():
            torch.testing.assert_close(v, want.state_dict()[k], rtol=1e-6, atol=1e-7, msg=f"{t} {k}")
    model = modelstore.load_model("t0", store)
    for t in ("t1", "t0", "t1"):
        store.switch(model, t)
        _assert_same_tensors(model, modelstore.load_model(t, store), f"switch to {t}")
    CliRunner().invoke(main, ["export", url, "t1", str(tmp_path / "out")], catch_exceptions=False)
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    got = pipeline("image-classification", model=str(tmp_path / "out"))(image)
    with torch.no_grad():
        want = originals["t1"](**proc(images=image, return_tensors="pt")).logits.softmax(-1)[0]
    assert {p["label"]: p["score"] for p in got} == pytest.approx({"day": float(want[0]), "night": float(want[1])},
                                                                  abs=1e-5)
