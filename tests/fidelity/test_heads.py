"""Calibration and `eval` for the other heads users fine-tune: classifiers of text pairs, multi-label
and regression heads, masked LMs and extractive QA models, each on small transformers models. The
record's agreement and eval's are checked against counts made here one text at a time, without
padding, from the model's own outputs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tokenizer, tiny_bert_config
from test_calibrated import _calibrated_pair, _eval_agrees, _jsonl, _perturbed, _texts

import modelstore
from modelstore.cli import main
from modelstore.fidelity.runner import MASKED


def _models(cls, tmp_path, **cfg):
    tok = make_tokenizer("bert")
    torch.manual_seed(0)
    return cls(tiny_bert_config(vocab_size=len(tok), max_position_embeddings=64, **cfg)).eval(), tok


def _ref_and_stored(cls, url: str, task: str, tmp_path):
    ref = cls.from_pretrained(tmp_path / "ft").eval()
    return ref, modelstore.load_model(task, url, dtype=torch.float32)


def _calibrated(cls, tmp_path, scale: float, task: str, rows: list, **cfg):
    """A tiny BERT `cls` fine-tuned at `scale` and calibrated on `rows` (_calibrated_pair), its
    choice lossy: (store url, calibration file, record, original, stored task, tokenizer)."""
    m, tok = _models(cls, tmp_path, **cfg)
    url, cal, f = _calibrated_pair(m, tok, tmp_path, scale, task, rows)
    _lossy(f)
    return url, cal, f, *_ref_and_stored(cls, url, task, tmp_path), tok


def _lossy(f: dict) -> None:
    """The chosen candidate is lossy, so the counts it is checked against are not trivially all."""
    assert f["setting"]["kind"] == "fft" and 0.9 <= f["agreement"] < 1, f["candidates"]


def _pair_rows(n: int) -> list[dict]:
    return [{"text": a, "text_pair": b} for a, b in zip(_texts(n, 3), _texts(n, 4))]


@pytest.mark.parametrize("arch, labels, scale", [("BertForSequenceClassification", 3, 0.01),
                                                 ("BertForNextSentencePrediction", 2, 0.15)])
def test_a_classifier_of_text_pairs_is_calibrated_and_evaluated_on_both_texts(tmp_path, arch, labels, scale):
    """An entailment-style classifier (or a next-sentence head) reads each text with its text_pair:
    the record's KL is that of the pairs (not of the first texts alone), and eval's agreement too."""
    import transformers
    rows = _pair_rows(40)
    url, cal, f, ref, stored, tok = _calibrated(getattr(transformers, arch), tmp_path, scale, "nli", rows,
                                                num_labels=labels, initializer_range=0.2)

    def counts(pairs: bool) -> tuple[int, float]:
        agree, kl = 0, 0.0
        with torch.no_grad():
            for r in rows:
                enc = tok(r["text"], r["text_pair"] if pairs else None, return_tensors="pt")
                p, q = (x(**enc).logits[0].double().log_softmax(-1) for x in (ref, stored))
                agree += int(p.argmax() == q.argmax())
                kl += float((p.exp() * (p - q)).sum())
        return agree, kl / len(rows)

    agree, kl = counts(True)
    assert f["output"] == "classification" and f["examples"] == f["predictions"] == 40
    assert f["mean_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7) != pytest.approx(counts(False)[1], rel=1e-2)
    assert abs(f["agreement"] - agree / 40) <= 1 / 40
    r = CliRunner().invoke(main, ["eval", url, "nli", "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["agreement"] == pytest.approx(agree / 40, abs=1 / 40)


def test_a_multiple_choice_model_agrees_on_the_choice_it_picks(tmp_path):
    """A multiple-choice fine-tune (SWAG, RACE, ARC: 2-4 choices a text, fewer than a batch's most
    masked out): each text's prediction is its pick among its own choices. The record and eval
    (with the rows' labels, both accuracies) count what each text run alone with its choices gives;
    data without choices, or choices for another model, are refused in one line."""
    import random

    from transformers import BertForMultipleChoice
    rng = random.Random(5)
    rows = [{"text": t, "choices": _texts(rng.randint(2, 4), 100 + i), "label": 0} for i, t in enumerate(_texts(32, 9))]
    url, cal, f, ref, stored, tok = _calibrated(BertForMultipleChoice, tmp_path, 0.03, "mc", rows,
                                                initializer_range=0.5)
    agree = right = 0
    with torch.no_grad():
        for r in rows:
            x = {k: v[None] for k, v in tok([r["text"]] * len(r["choices"]), r["choices"], return_tensors="pt",
                                            padding=True).items()}
            a, b = ref(**x).logits[0], stored(**x).logits[0]
            assert a.shape == (len(r["choices"]),)
            agree, right = agree + int(a.argmax() == b.argmax()), right + int(b.argmax() == r["label"])
    assert f["output"] == "multiple-choice" and f["predictions"] == f["examples"] == len(rows)
    assert abs(f["agreement"] - agree / len(rows)) <= 1 / len(rows)
    r = CliRunner().invoke(main, ["eval", url, "mc", "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    got = json.loads(r.output)
    assert got["kind"] == "multiple-choice" and got["agreement"] == pytest.approx(agree / len(rows), abs=1 / len(rows))
    assert got["accuracy_stored"] == pytest.approx(right / len(rows), abs=1 / len(rows))
    line = CliRunner().invoke(main, ["eval", url, "mc", "--original", str(tmp_path / "ft"), "--data", cal]).output
    assert f"agreement {got['agreement']:.2%}" in line and f"over {len(rows)} examples" in line, line
    plain = _jsonl(tmp_path / "plain.jsonl", [r["text"] for r in rows])
    r = CliRunner().invoke(main, ["add-task", url, "mc2", str(tmp_path / "ft"), "--calibration", plain])
    assert r.exit_code == 1 and "picks one of the choices after each text" in r.output and \
        r.output.count("\n") == 1, r.output


def test_a_multi_label_head_agrees_label_by_label(tmp_path):
    """Each label of a sigmoid head is a yes/no prediction; eval also counts the texts given exactly
    the original's set of labels."""
    from transformers import BertForSequenceClassification
    texts = _texts(30, 3)
    url, cal, f, ref, stored, tok = _calibrated(BertForSequenceClassification, tmp_path, 0.02, "tags", texts,
                                                num_labels=4, initializer_range=0.2,
                                                problem_type="multi_label_classification")
    agree = same = 0
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            hit = (ref(**enc).logits[0] > 0) == (stored(**enc).logits[0] > 0)
            agree, same = agree + int(hit.sum()), same + int(hit.all())
    assert f["output"] == "multi-label" and f["predictions"] == 120
    got = _eval_agrees(url, "tags", tmp_path, cal, f, agree, 120)
    assert got["same_labels"] == pytest.approx(same / 30, abs=1 / 30)
    # labels, a list of 0/1 per label (transformers' multi-label targets): accuracy per label and
    # texts given every label right, of both models, counted one text at a time
    rng = torch.Generator().manual_seed(4)
    targets = torch.randint(0, 2, (30, 4), generator=rng)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": t, "label": y.tolist()}) + "\n" for t, y in zip(texts, targets)))
    right = {"original": 0, "stored": 0}
    whole = {"original": 0, "stored": 0}
    with torch.no_grad():
        for t, y in zip(texts, targets):
            enc = tok(t, return_tensors="pt")
            for name, m in (("original", ref), ("stored", stored)):
                hit = (m(**enc).logits[0] > 0).long() == y
                right[name], whole[name] = right[name] + int(hit.sum()), whole[name] + int(hit.all())
    r = CliRunner().invoke(main, ["eval", url, "tags", "--original", str(tmp_path / "ft"), "--data", str(labelled),
                                  "--json"])
    got = json.loads(r.stdout)
    for name in ("original", "stored"):
        assert got[f"accuracy_{name}"] == pytest.approx(right[name] / 120, abs=1 / 120)
        assert got[f"exact_match_{name}"] == pytest.approx(whole[name] / 30, abs=1 / 30)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": texts[0], "label": [1, 2, 0, 0]}) + "\n")
    r = CliRunner().invoke(main, ["eval", url, "tags", "--original", str(tmp_path / "ft"), "--data", str(bad)])
    assert r.exit_code == 1 and "a list of 4 values 0 or 1" in r.output and r.output.count("\n") == 1, r.output


def test_a_regression_head_is_refused_by_calibration_and_measured_by_eval(tmp_path):
    """One output (num_labels=1) is no class: a promise of agreement would be empty, so calibration
    refuses it in one line and stores nothing; eval reports how far the outputs moved."""
    from transformers import BertForSequenceClassification
    m, tok = _models(BertForSequenceClassification, tmp_path, num_labels=1)
    texts = _texts(20, 3)
    with pytest.raises(modelstore.InputError, match="regression head"):
        _calibrated_pair(m, tok, tmp_path, 0.1, "score", texts)
    url = str(tmp_path / "s")
    assert modelstore.open(url).tasks() == []
    r = CliRunner().invoke(main, ["add-task", url, "score", str(tmp_path / "ft"), "--calibration",
                                  str(tmp_path / "c.jsonl")])
    assert r.exit_code == 1 and "regression head" in r.output and r.output.count("\n") == 1, r.output
    modelstore.open(url, mode="a").add_task("score", str(tmp_path / "ft"))
    ref, stored = _ref_and_stored(BertForSequenceClassification, url, "score", tmp_path)
    with torch.no_grad():
        moved = [abs(float(ref(**tok(t, return_tensors="pt")).logits - stored(**tok(t, return_tensors="pt")).logits))
                 for t in texts]
    args = ["eval", url, "score", "--original", str(tmp_path / "ft"), "--data", str(tmp_path / "c.jsonl")]
    got = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert got["kind"] == "regression" and got["predictions"] == 20 and "top1_agreement" not in got
    assert got["mean_abs_difference"] == pytest.approx(sum(moved) / 20, rel=1e-3, abs=1e-6)
    assert got["max_abs_difference"] == pytest.approx(max(moved), rel=1e-3, abs=1e-6)
    r = CliRunner().invoke(main, [*args, "--min-agreement", "0.9"])
    assert r.exit_code == 1 and "regression head" in r.output and r.output.count("\n") == 1, r.output


def test_a_model_of_neither_text_images_nor_sound_is_refused_in_one_line(tmp_path):
    """A Perceiver classifier reads `inputs` (any modality, prepared outside transformers' auto
    classes): calibration and eval say so in one line (not a TypeError from its forward) and store
    nothing."""
    from transformers import PerceiverConfig, PerceiverForSequenceClassification
    torch.manual_seed(0)
    PerceiverForSequenceClassification(PerceiverConfig(
        num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
        num_self_attention_heads=1, num_cross_attention_heads=1, vocab_size=32, max_position_embeddings=64,
        num_labels=2)).save_pretrained(tmp_path / "pre")
    url, cal = str(tmp_path / "s"), _jsonl(tmp_path / "c.jsonl", _texts(4, 1))
    modelstore.init(url, str(tmp_path / "pre"))
    for args in (["add-task", url, "p", str(tmp_path / "pre"), "--calibration", cal],
                 ["eval", url, "p", "--original", str(tmp_path / "pre"), "--data", cal]):
        if args[0] == "eval":
            modelstore.open(url, mode="a").add_task("p", str(tmp_path / "pre"))
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and "reads inputs, neither text" in r.output and r.output.count("\n") == 1, r.output
        assert modelstore.open(url).tasks() == ([] if args[0] == "add-task" else ["p"])


def test_a_sentence_embedding_model_agrees_on_each_texts_nearest_neighbour(tmp_path):
    """A bare encoder fine-tuned as a sentence-transformers model (its 1_Pooling/config.json asks
    for the CLS token): each text's prediction is its nearest neighbour among the original's
    embeddings of the other texts. The record and eval count what embeddings made here one text at a
    time give; eval also says how far the embeddings moved (cosine to the original's)."""
    from transformers import BertModel
    m, tok = _models(BertModel, tmp_path, initializer_range=0.5)  # texts' embeddings far enough apart
    (tmp_path / "ft" / "1_Pooling").mkdir(parents=True)
    (tmp_path / "ft" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    texts = _texts(40, 8)
    url, cal, f = _calibrated_pair(m, tok, tmp_path, 0.003, "emb", texts)
    _lossy(f)
    ref, stored = _ref_and_stored(BertModel, url, "emb", tmp_path)
    with torch.no_grad():
        e, s = (torch.stack([torch.nn.functional.normalize(x(**tok(t, return_tensors="pt")).last_hidden_state[0, 0]
                                                           .double(), dim=0) for t in texts]) for x in (ref, stored))
    own = torch.eye(len(texts), dtype=torch.bool)
    agree = int(((e @ e.T).masked_fill(own, -2).argmax(1) == (s @ e.T).masked_fill(own, -2).argmax(1)).sum())
    assert f["output"] == "embedding" and f["examples"] == f["predictions"] == len(texts)
    assert abs(f["agreement"] - agree / len(texts)) <= 1 / len(texts)
    got = _eval_agrees(url, "emb", tmp_path, cal, f, agree, len(texts))
    assert got["mean_cosine"] == pytest.approx(float((e * s).sum(1).mean()), abs=1e-5)
    assert got["min_cosine"] == pytest.approx(float((e * s).sum(1).min()), abs=1e-5)


def test_a_bare_image_encoder_agrees_on_each_images_nearest_neighbour(tmp_path):
    """A bare ViT (no sentence-transformers pooling file: the mean of all its tokens) is an image
    embedding model: the record and eval count the nearest neighbours embeddings made here one
    image at a time give."""
    from PIL import Image
    from transformers import ViTModel
    m, proc, rows = _vit(tmp_path, cls=ViTModel)
    url, cal, f = _calibrated_pair(m, proc, tmp_path, 0.003, "vemb", rows)
    _lossy(f)
    ref, stored = _ref_and_stored(ViTModel, url, "vemb", tmp_path)
    with torch.no_grad():
        e, s = (torch.stack([torch.nn.functional.normalize(x(**proc(images=Image.open(tmp_path / r["image"]).convert(
            "RGB"), return_tensors="pt")).last_hidden_state[0].double().mean(0), dim=0) for r in rows])
            for x in (ref, stored))
    own = torch.eye(len(rows), dtype=torch.bool)
    agree = int(((e @ e.T).masked_fill(own, -2).argmax(1) == (s @ e.T).masked_fill(own, -2).argmax(1)).sum())
    assert f["output"] == "embedding" and f["predictions"] == len(rows)
    assert _eval_agrees(url, "vemb", tmp_path, cal, f, agree, len(rows))["inputs"] == "image"


def _mask_positions(tok, text: str, index: int) -> tuple[dict, list[int]]:
    """`text` tokenized alone with the tokens calibration masks of the text at `index` of its file
    masked: MASKED of its non-special tokens, drawn by a generator seeded with `index`."""
    enc = tok(text, return_tensors="pt", return_special_tokens_mask=True)
    free = [i for i, s in enumerate(enc.pop("special_tokens_mask")[0].tolist()) if not s]
    draw = torch.randperm(len(free), generator=torch.Generator().manual_seed(index)).tolist()
    picked = [free[j] for j in draw[:max(1, round(MASKED * len(free)))]]
    enc["input_ids"][0, picked] = tok.mask_token_id
    return dict(enc), picked


def test_a_masked_lm_is_calibrated_on_the_tokens_it_is_given_masked(tmp_path):
    """The same tokens of each text are masked in every run and at any batch size; the record's
    agreement, eval's, and both models' accuracy at the masked tokens are counted here text by text."""
    from transformers import BertForMaskedLM
    texts = _texts(40, 3)
    url, cal, f, ref, stored, tok = _calibrated(BertForMaskedLM, tmp_path, 0.005, "mlm", texts)
    agree = masked = right_ref = right_stored = 0
    with torch.no_grad():
        for i, t in enumerate(texts):
            truth = tok(t, return_tensors="pt")["input_ids"][0]
            enc, picked = _mask_positions(tok, t, i)
            a, b = (x(**enc).logits[0, picked].argmax(-1) for x in (ref, stored))
            agree, masked = agree + int((a == b).sum()), masked + len(picked)
            right_ref += int((a == truth[picked]).sum())
            right_stored += int((b == truth[picked]).sum())
    assert f["output"] == "masked-lm" and f["predictions"] == masked < 0.3 * len(" ".join(texts).split())
    got = _eval_agrees(url, "mlm", tmp_path, cal, f, agree, masked)
    assert got["accuracy_original"] == pytest.approx(right_ref / masked, abs=1 / masked)
    assert got["accuracy_stored"] == pytest.approx(right_stored / masked, abs=1 / masked)
    one = CliRunner().invoke(main, ["eval", url, "mlm", "--original", str(tmp_path / "ft"), "--data", cal,
                                    "--batch-size", "1", "--json"])
    assert {k: v for k, v in json.loads(one.output).items() if k != "mean_kl"} == {
        k: v for k, v in got.items() if k != "mean_kl"}


def test_an_extractive_qa_model_agrees_on_answer_starts_and_ends(tmp_path):
    """Rows in SQuAD's names: a question and its context. The answer's start and its end are one
    prediction each; eval counts the texts whose span is the original's. Data without contexts is
    refused in one line."""
    from transformers import BertForQuestionAnswering
    rows = [{"question": q, "context": c} for q, c in zip(_texts(30, 3), _texts(30, 5))]
    url, cal, f, ref, stored, tok = _calibrated(BertForQuestionAnswering, tmp_path, 0.01, "qa", rows)
    agree = same = 0
    with torch.no_grad():
        for r in rows:
            enc = tok(r["question"], r["context"], return_tensors="pt")
            a, b = ref(**enc), stored(**enc)
            hit = [int(x.argmax() == y.argmax()) for x, y in ((a.start_logits, b.start_logits),
                                                              (a.end_logits, b.end_logits))]
            agree, same = agree + sum(hit), same + int(all(hit))
    assert f["output"] == "question-answering" and f["predictions"] == 60
    got = _eval_agrees(url, "qa", tmp_path, cal, f, agree, 60)
    assert got["same_answer"] == pytest.approx(same / 30, abs=1 / 30)
    alone = _jsonl(tmp_path / "q.jsonl", [r["question"] for r in rows])
    r = CliRunner().invoke(main, ["add-task", url, "qa2", str(tmp_path / "ft"), "--calibration", alone])
    assert r.exit_code == 1 and '"question" and "context"' in r.output and r.output.count("\n") == 1, r.output
    r = CliRunner().invoke(main, ["eval", url, "qa", "--original", str(tmp_path / "ft"), "--data", alone])
    assert r.exit_code == 1 and '"question" and "context"' in r.output, r.output
    assert modelstore.open(url).tasks() == ["qa"]


def _qa_windows(tok, question: str, context: str, max_length: int) -> list[dict]:
    """The windows of one example, made here by hand: [CLS] question [SEP] part of the context
    [SEP], each part max_length's room long, neighbours sharing a quarter of max_length."""
    q = tok(question, add_special_tokens=False)["input_ids"]
    c = tok(context, add_special_tokens=False)["input_ids"]
    room, stride, start, out = max_length - 3 - len(q), max_length // 4, 0, []
    while True:
        part = c[start:start + room]
        ids = [tok.cls_token_id, *q, tok.sep_token_id, *part, tok.sep_token_id]
        out.append({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                    "token_type_ids": torch.tensor([[0] * (len(q) + 2) + [1] * (len(part) + 1)])})
        if start + room >= len(c):
            return out
        start += room - stride


def test_a_qa_context_longer_than_the_model_reads_is_read_in_overlapping_windows(tmp_path):
    """A context longer than the model's 64 positions is not cut at them: it is read in windows, as
    transformers' QA pipeline reads it, each window's start and end one prediction each. The record
    and eval (at its default --max-length, more than the model has) count what the windows made
    here by hand give; a question leaving the context no room is refused in one line."""
    from transformers import BertForQuestionAnswering
    rows = [{"question": q, "context": " ".join(_texts(14, 7 + i))} for i, q in enumerate(_texts(16, 3))]
    url, cal, f, ref, stored, tok = _calibrated(BertForQuestionAnswering, tmp_path, 0.002, "qa", rows)
    predictions = agree = same = 0
    windows = []
    with torch.no_grad():
        for r in rows:
            windows.append(len(_qa_windows(tok, r["question"], r["context"], 64)))
            hits = []
            for enc in _qa_windows(tok, r["question"], r["context"], 64):
                a, b = ref(**enc), stored(**enc)
                hits += [int(a.start_logits.argmax() == b.start_logits.argmax()),
                         int(a.end_logits.argmax() == b.end_logits.argmax())]
            predictions, agree, same = predictions + len(hits), agree + sum(hits), same + int(all(hits))
    assert min(windows) >= 2 and max(windows) >= 3, windows  # every context overflows 64 tokens
    assert f["predictions"] == predictions == 2 * sum(windows)
    got = _eval_agrees(url, "qa", tmp_path, cal, f, agree, predictions)
    assert got["same_answer"] == pytest.approx(same / len(rows), abs=1 / len(rows))
    long = _jsonl(tmp_path / "long.jsonl", [{"question": " ".join(_texts(12, 1)), "context": "a b c"}])
    r = CliRunner().invoke(main, ["add-task", url, "qa2", str(tmp_path / "ft"), "--calibration", long])
    assert r.exit_code == 1 and "raise --max-length" in r.output and r.output.count("\n") == 1, r.output
    assert modelstore.open(url).tasks() == ["qa"]


def _images(tmp_path, n: int) -> list[dict]:
    """`n` PNG images of noise of assorted sizes under tmp_path/imgs; rows naming them, labelled."""
    import numpy as np
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pixels = (rng.random((int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "label": i % 3})
    return rows


def _each_image(tmp_path, proc, rows: list[dict], *models):
    """(row, each model's logits) for each row's image, prepared alone by image processor `proc`."""
    from PIL import Image
    with torch.no_grad():
        for r in rows:
            x = proc(images=Image.open(tmp_path / r["image"]).convert("RGB"), return_tensors="pt")
            yield r, *(m(**x).logits for m in models)


def _vit(tmp_path, **cfg):
    """A tiny ViT (32-pixel images, 8-pixel patches) and its image processor, and 24 _images;
    returns (model, processor, rows naming the images)."""
    from transformers import ViTConfig, ViTImageProcessor
    torch.manual_seed(0)
    m = cfg.pop("cls")(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, initializer_range=0.2, **cfg)).eval()
    return m, ViTImageProcessor(size={"height": 32, "width": 32}), _images(tmp_path, 24)


def test_an_image_classifier_is_calibrated_and_evaluated_on_its_images(tmp_path):
    """A ViT fine-tune's data rows name image files beside the data; the record's agreement and
    eval's (with the rows' labels, both accuracies) are counted here image by image. Texts for it,
    or a missing image, are refused in one line; the record's hash covers the images' bytes."""
    from PIL import Image
    from transformers import ViTForImageClassification
    m, proc, rows = _vit(tmp_path, cls=ViTForImageClassification, num_labels=3)
    url, cal, f = _calibrated_pair(m, proc, tmp_path, 0.01, "vit", rows)
    _lossy(f)
    ref, stored = _ref_and_stored(ViTForImageClassification, url, "vit", tmp_path)
    agree = right = 0
    for r, a, b in _each_image(tmp_path, proc, rows, ref, stored):
        agree, right = agree + int(a.argmax() == b.argmax()), right + int(b.argmax() == r["label"])
    assert f["output"] == "classification" and f["examples"] == f["predictions"] == 24
    assert abs(f["agreement"] - agree / 24) <= 1 / 24
    r = CliRunner().invoke(main, ["eval", url, "vit", "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["agreement"] == pytest.approx(agree / 24, abs=1 / 24) and got["examples"] == 24
    assert got["accuracy_stored"] == pytest.approx(right / 24, abs=1 / 24)
    before = modelstore.Calibration.from_file(cal).sha256
    Image.new("RGB", (30, 30)).save(tmp_path / "imgs" / "3.png")
    assert modelstore.Calibration.from_file(cal).sha256 != before
    texts = _jsonl(tmp_path / "t.jsonl", ["a cat"])
    missing = _jsonl(tmp_path / "m.jsonl", [{"image": "imgs/none.png"}])
    for data, what in [(texts, 'give its rows "image" paths'), (missing, "none.png")]:
        r = CliRunner().invoke(main, ["add-task", url, "vit2", str(tmp_path / "ft"), "--calibration", data])
        assert r.exit_code == 1 and what in r.output and r.output.count("\n") == 1, r.output
    assert modelstore.open(url).tasks() == ["vit"]


def test_a_distilled_deit_is_an_image_classifier(tmp_path):
    """A DeiT fine-tuned with its distillation token (`...ForImageClassificationWithTeacher`): its
    logits, the mean of both heads', are one prediction per image, as the record counts them here."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTImageProcessor
    torch.manual_seed(0)
    m = DeiTForImageClassificationWithTeacher(DeiTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        initializer_range=0.2, num_labels=3)).eval()
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    rows = _images(tmp_path, 24)
    url, cal, f = _calibrated_pair(m, proc, tmp_path, 0.01, "deit", rows)
    _lossy(f)
    ref, stored = _ref_and_stored(DeiTForImageClassificationWithTeacher, url, "deit", tmp_path)
    agree = sum(int(a.argmax() == b.argmax()) for _, a, b in _each_image(tmp_path, proc, rows, ref, stored))
    assert f["output"] == "classification" and abs(f["agreement"] - agree / 24) <= 1 / 24


def test_a_segmentation_model_agrees_pixel_by_pixel_on_a_grid_of_its_label_map(tmp_path):
    """A SegFormer's label map (64 x 64 for 256-pixel images) is compared on every other row and
    column (GRID: at most 32 of each), one prediction per pixel there; the record and eval count
    what each image run alone gives."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor
    rows = _images(tmp_path, 12)
    torch.manual_seed(0)
    m = SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=5,
        initializer_range=0.2)).eval()
    proc = SegformerImageProcessor(size={"height": 256, "width": 256})
    url, cal, f = _calibrated_pair(m, proc, tmp_path, 0.01, "seg", rows)
    _lossy(f)
    ref, stored = _ref_and_stored(SegformerForSemanticSegmentation, url, "seg", tmp_path)
    agree = pixels = 0
    for _, a, b in _each_image(tmp_path, proc, rows, ref, stored):
        a, b = (x[0, :, ::2, ::2].argmax(0) for x in (a, b))
        assert a.shape == (32, 32)
        agree, pixels = agree + int((a == b).sum()), pixels + a.numel()
    assert f["output"] == "segmentation" and f["predictions"] == pixels
    _eval_agrees(url, "seg", tmp_path, cal, f, agree, pixels)


def _llava(tmp_path):
    """A tiny LLaVA (a CLIP vision tower of 16-pixel images, 8-pixel patches, under a Llama) and
    its processor, its tokenizer holding the image token."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    tok = make_tokenizer("gpt2")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = tok.eos_token
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                                  image_token_index=tok.convert_tokens_to_ids("<image>"))).eval()
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)
    return m, proc


def test_a_model_of_images_with_text_agrees_on_the_next_tokens_of_its_prompts(tmp_path):
    """A LLaVA fine-tune: rows give an image and its prompt; every token of the prompt after the
    first is a prediction, the positions standing for the image are not. The record and eval count
    what each image with its prompt run alone gives; a prompt without the image token is refused in
    one line."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration
    m, proc = _llava(tmp_path)
    rows = [{**r, "text": "<image> " + t} for r, t in zip(_images(tmp_path, 16), _texts(16, 6))]
    url, cal, f = _calibrated_pair(m, proc, tmp_path, 0.003, "vlm", rows)
    _lossy(f)
    ref, stored = _ref_and_stored(LlavaForConditionalGeneration, url, "vlm", tmp_path)
    image = ref.config.image_token_index
    agree = tokens = 0
    with torch.no_grad():
        for r in rows:
            x = proc(images=Image.open(tmp_path / r["image"]).convert("RGB"), text=r["text"], return_tensors="pt")
            a, b = (model(**x).logits[0, :-1].argmax(-1) for model in (ref, stored))
            text = x["input_ids"][0, 1:] != image
            assert 0 < int(text.sum()) < len(text)  # image positions left out, the prompt's kept
            agree, tokens = agree + int((a == b)[text].sum()), tokens + int(text.sum())
    assert f["output"] == "causal-lm" and f["predictions"] == tokens
    assert abs(f["agreement"] - agree / tokens) <= 1 / tokens
    r = CliRunner().invoke(main, ["eval", url, "vlm", "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    got = json.loads(r.output)
    assert got["tokens"] == tokens and got["top1_agreement"] == pytest.approx(agree / tokens, abs=1 / tokens)
    bare = _jsonl(tmp_path / "bare.jsonl", [{"image": rows[0]["image"], "text": "no token here"}])
    r = CliRunner().invoke(main, ["add-task", url, "vlm2", str(tmp_path / "ft"), "--calibration", bare])
    assert r.exit_code == 1 and "has no <image> where its image goes" in r.output and r.output.count("\n") == 1, \
        r.output


def test_a_vision_encoder_with_a_head_outside_it_is_calibrated_on_pil_images(tmp_path):
    """BYOM's CLIP setting: a bare ViT fine-tune whose classifier is a frozen head kept outside
    the checkpoint, calibrated in Python on PIL images with `outputs=`."""
    from PIL import Image
    from transformers import ViTModel
    m, proc, rows = _vit(tmp_path, cls=ViTModel)
    head = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))

    def outputs(model, batch):
        return model(**batch).pooler_output @ head

    images = [Image.open(tmp_path / r["image"]) for r in rows]
    cal = modelstore.Calibration(images=images, outputs=outputs, batch_size=8)
    for name in ("pre", "ft"):
        if name == "ft":
            _perturbed(m, 2, 0.01)
        m.save_pretrained(tmp_path / name)
        proc.save_pretrained(tmp_path / name)
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    f = modelstore.open(url, mode="a").add_task("clip", str(tmp_path / "ft"), calibration=cal,
                                                min_agreement=0.9)["fidelity"]
    _lossy(f)
    ref = ViTModel.from_pretrained(tmp_path / "ft").eval()
    stored = modelstore.load_model("clip", url, dtype=torch.float32)
    with torch.no_grad():
        agree = sum(int(outputs(ref, x).argmax() == outputs(stored, x).argmax())
                    for x in (proc(images=im.convert("RGB"), return_tensors="pt") for im in images))
    assert f["output"] == "custom" and f["examples"] == 24 and abs(f["agreement"] - agree / 24) <= 1 / 24
