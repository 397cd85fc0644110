"""Calibration and `eval` of CLIP-like models, the papers' own: a dual encoder given images with
texts agrees on which of the data's texts each image matches (its zero-shot classification, its
retrieval); alone, its towers and projection models agree on each example's nearest neighbour by
the embedding their users take. Every count is checked against one made here an image and a text
at a time, from the model's own feature functions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tokenizer
from test_calibrated import _calibrated_pair, _eval_agrees, _jsonl, _texts

import modelstore
from modelstore.cli import main


def _lossy(f: dict) -> None:
    """The chosen candidate is lossy (any kind but exact), so the counts are not trivially all."""
    assert f["setting"]["kind"] != "exact" and 0.9 <= f["agreement"] < 1, f["candidates"]


TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _clip(tmp_path, texts: list[str]):
    """A tiny CLIP (32-pixel images, a text tower of 32 positions) with its processor, and
    _images for `texts`."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    tok = make_tokenizer("gpt2")
    # CLIP's text embedding is its end-of-text token's state: every text ends with one
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>",
                                                                  special_tokens=[("<eos>", tok.eos_token_id)])
    tok.pad_token = "<unk>"
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = CLIPConfig(text_config=dict(TOWER, vocab_size=len(tok), max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(TOWER, image_size=32, patch_size=8), projection_dim=16)
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    return CLIPModel(cfg).eval(), proc, _images(tmp_path, texts)


def _images(tmp_path, texts: list[str]) -> list[dict]:
    """Images of coloured blocks under tmp_path/imgs, one a text: rows of each with its text."""
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(texts):
        a = np.zeros((32, 32, 3))
        a[:] = rng.random(3) * 255
        a[:int(rng.integers(4, 28)), :, int(rng.integers(3))] = 255 * rng.random()
        Image.fromarray(a.astype("uint8")).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "text": text})
    return rows


def _features(model, proc, tmp_path, rows: list[dict], texts: list[str],
              **padding) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image features of each row's image and text features of each of `texts` (tokenized
    with `padding`), one at a time."""
    from PIL import Image

    def unit(x) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else x.pooler_output
        return torch.nn.functional.normalize(x[0].double(), dim=0)

    with torch.no_grad():
        images = [unit(model.get_image_features(**proc(images=Image.open(tmp_path / r["image"]).convert("RGB"),
                                                               return_tensors="pt"))) for r in rows]
        words = [unit(model.get_text_features(**proc.tokenizer(t, return_tensors="pt", **padding))) for t in texts]
    return torch.stack(images), torch.stack(words)


def test_a_dual_encoder_matches_each_image_with_the_same_of_the_datas_texts(tmp_path):
    """CLIP given images with texts (12 texts, each of two rows: class prompts): each image's
    prediction is its match among the data's distinct texts, scored as CLIP scores them (cosine
    times its logit scale). The record's agreement and KL, and eval's, are what features made here
    one image and one text at a time give; eval also counts how often each model matches an image
    with its own row's text. The same model on images alone (or texts alone) is an embedding
    model of its features."""
    from transformers import CLIPModel
    prompts = _texts(12, 6)
    m, proc, rows = _clip(tmp_path, prompts * 2)
    url, cal, f = _calibrated_pair(m, proc, tmp_path, 0.001, "clip", rows)
    _lossy(f)
    ref = CLIPModel.from_pretrained(tmp_path / "ft").eval()
    stored = modelstore.load_model("clip", url, dtype=torch.float32)
    (ei, et), (si, st) = (_features(x, proc, tmp_path, rows, prompts) for x in (ref, stored))
    a, b = ((i @ t.T) * x.logit_scale.double().exp() for (i, t), x in (((ei, et), ref), ((si, st), stored)))
    agree = int((a.argmax(1) == b.argmax(1)).sum())
    p, q = a.log_softmax(1), b.log_softmax(1)
    assert f["output"] == "zero-shot" and f["examples"] == f["predictions"] == 24 and f["max_length"] == 32
    assert f["agreement"] == agree / 24 and f["mean_kl"] == pytest.approx(float((p.exp() * (p - q)).sum(1).mean()),
                                                                          rel=1e-4)
    got = _eval_agrees(url, "clip", tmp_path, cal, f, agree, 24)
    own = torch.arange(24) % 12
    assert got["texts"] == 12 and got["inputs"] == "image-text"
    assert got["matched_original"] == int((a.argmax(1) == own).sum()) / 24
    assert got["matched_stored"] == int((b.argmax(1) == own).sum()) / 24
    line = CliRunner().invoke(main, ["eval", url, "clip", "--original", str(tmp_path / "ft"), "--data", cal]).output
    assert f"the same text for {agree / 24:.2%} of 24 images among the data's 12 texts" in line, line
    # images alone: an image embedding model of CLIP's image features; texts alone: of its text features
    for data, e, s in (([{"image": r["image"]} for r in rows], ei, si), ([{"text": t} for t in prompts], et, st)):
        r = CliRunner().invoke(main, ["eval", url, "clip", "--original", str(tmp_path / "ft"), "--data",
                                      _jsonl(tmp_path / "alone.jsonl", data), "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        assert out["kind"] == "embedding" and out["mean_cosine"] == pytest.approx(float((e * s).sum(1).mean()),
                                                                                  abs=1e-6)


@pytest.mark.parametrize("cls, embedding", [("CLIPVisionModel", "pooler_output"),
                                            ("CLIPVisionModelWithProjection", "image_embeds")])
def test_a_dual_encoders_vision_tower_agrees_on_the_embedding_its_users_take(tmp_path, cls, embedding):
    """A CLIP vision tower fine-tuned alone (the papers' checkpoints) embeds an image as CLIP does,
    its pooled output (or, with its projection, its image_embeds), not a mean of its patches: the
    record counts the nearest neighbours those make here one image at a time."""
    import transformers
    from PIL import Image
    model, proc, rows = _clip(tmp_path, _texts(24, 6))
    tower = getattr(transformers, cls)(model.config.vision_config).eval()
    getattr(tower, "vision_model", tower).load_state_dict(model.vision_model.state_dict())  # transformers 5: the tower
    rows = [{"image": r["image"]} for r in rows]
    url, _, f = _calibrated_pair(tower, proc.image_processor, tmp_path, 0.01, "tower", rows)
    _lossy(f)
    ref = getattr(transformers, cls).from_pretrained(tmp_path / "ft").eval()
    stored = modelstore.load_model("tower", url, dtype=torch.float32)
    with torch.no_grad():
        e, s = (torch.stack([torch.nn.functional.normalize(getattr(x(**proc.image_processor(
            images=Image.open(tmp_path / r["image"]).convert("RGB"), return_tensors="pt")), embedding)[0].double(),
            dim=0) for r in rows]) for x in (ref, stored))
    own = torch.eye(len(rows), dtype=torch.bool)
    agree = int(((e @ e.T).masked_fill(own, -2).argmax(1) == (s @ e.T).masked_fill(own, -2).argmax(1)).sum())
    assert f["output"] == "embedding" and f["agreement"] == agree / len(rows)


def test_a_peft_lora_of_a_dual_encoder_is_calibrated_against_the_model_peft_merges(tmp_path):
    """A LoRA adapter of CLIP's attention (PEFT): the rank kept is measured on zero-shot matches
    against the model PEFT's merge_and_unload makes; the record and `eval --lora` are what that
    model's and the stored task's features give here one image and text at a time."""
    peft = pytest.importorskip("peft")
    from transformers import CLIPModel
    prompts = _texts(12, 6)
    m, proc, rows = _clip(tmp_path, prompts * 2)
    m.save_pretrained(tmp_path / "pre")
    proc.save_pretrained(tmp_path / "pre")
    torch.manual_seed(3)
    adapted = peft.get_peft_model(m, peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=0.25,
                                                     target_modules=["q_proj", "v_proj"]))
    adapted.save_pretrained(str(tmp_path / "lora"))
    merged = adapted.merge_and_unload().eval()
    cal = _jsonl(tmp_path / "c.jsonl", rows)
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    f = modelstore.open(url, mode="a").add_lora_task("clip", str(tmp_path / "lora"), calibration=cal,
                                                     min_agreement=0.9)["fidelity"]
    stored = modelstore.load_model("clip", url, dtype=torch.float32)
    assert isinstance(stored, CLIPModel) and f["output"] == "zero-shot" and f["met"], f
    assert f["setting"]["rank"] < 4 and f["agreement"] < 1  # a lower rank, lossy: the counts can differ
    (ei, et), (si, st) = (_features(x, proc, tmp_path, rows, prompts) for x in (merged, stored))
    agree = int(((ei @ et.T).argmax(1) == (si @ st.T).argmax(1)).sum())
    assert f["agreement"] == agree / 24
    r = CliRunner().invoke(main, ["eval", url, "clip", "--lora", str(tmp_path / "lora"), "--data", cal, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["top1_agreement"] == agree / 24


def test_a_siglip_matches_with_its_texts_padded_as_it_reads_them(tmp_path):
    """SigLIP pools its text at the last position, so transformers pads its texts to their whole
    length: the record's matches (its logits, cosine times its scale, compared as a softmax over the
    data's texts: its bias, one for all, moves none) are what each text padded so, and each image,
    give run alone."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor
    tok = make_tokenizer("gpt2")
    tok.pad_token = "<unk>"
    proc = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = SiglipConfig(text_config=dict(TOWER, vocab_size=len(tok), max_position_embeddings=16),
                       vision_config=dict(TOWER, image_size=32, patch_size=8))
    torch.manual_seed(0)
    m = SiglipModel(cfg).eval()
    with torch.no_grad():
        m.logit_scale.fill_(2.0)
    prompts = _texts(12, 6)
    rows = _images(tmp_path, prompts * 2)
    url, cal, f = _calibrated_pair(m, proc, tmp_path, 0.01, "sig", rows)
    _lossy(f)
    ref = SiglipModel.from_pretrained(tmp_path / "ft").eval()
    stored = modelstore.load_model("sig", url, dtype=torch.float32)
    (ei, et), (si, st) = (_features(x, proc, tmp_path, rows, prompts, padding="max_length", max_length=16)
                          for x in (ref, stored))
    a, b = ((i @ t.T) * x.logit_scale.double().exp() for (i, t), x in (((ei, et), ref), ((si, st), stored)))
    p, q = a.log_softmax(1), b.log_softmax(1)
    assert f["output"] == "zero-shot" and f["max_length"] == 16
    assert f["agreement"] == int((a.argmax(1) == b.argmax(1)).sum()) / 24
    assert f["mean_kl"] == pytest.approx(float((p.exp() * (p - q)).sum(1).mean()), rel=1e-4)
