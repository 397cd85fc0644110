"""Bad inputs are one-line errors naming the problem, and leave the store as it was: NaN/Inf in a
LoRA adapter or a full fine-tune, a task name that looks like an option, and safetensors files
whose header lays tensors over each other or outside the data."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_bert_config
from safetensors.torch import save_file

import modelstore
from modelstore.cli import main
from modelstore.inputs.sources import open_checkpoint
from modelstore.kinds.lora.adapter import LoraError


def one_line(args: list, match: str, code: int = 1) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    out = r.output.strip()
    assert r.exit_code == code and len(out.splitlines()) == 1 and "Traceback" not in out, r.output
    assert match in out, out
    return out


def tree(url: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), url) for d, _, fs in os.walk(url) for f in fs)


@pytest.fixture()
def store(bert_models, tmp_path) -> str:
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]})
    return url


# ---- NaN / Inf ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_lora_adapter(bert_models, tmp_path, bad):
    peft = pytest.importorskip("peft")
    from transformers import BertModel
    model = BertModel(tiny_bert_config())
    model.load_state_dict(bert_models["sd0"])
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query"], init_lora_weights=False))
    key = "base_model.model.encoder.layer.1.attention.self.query.lora_B.weight"
    with torch.no_grad():
        pm.get_parameter(key.replace(".weight", ".default.weight"))[2, 1] = bad
    ad = str(tmp_path / "ad")
    pm.save_pretrained(ad)
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    before = tree(url)
    one_line(["add-task", url, "x", "--lora", ad], f"tensor {key!r} has NaN or Inf values")
    with pytest.raises(LoraError, match="NaN or Inf"):
        modelstore.open(url, mode="a").add_lora_task("x", ad)
    assert tree(url) == before


@pytest.mark.parametrize("where", ["encoder.layer.1.output.dense.weight", "pooler.dense.bias"])
@pytest.mark.parametrize("args", [[], ["--sparsify", "dare"], ["--budget", "3"], ["--kind", "bitdelta"]])
def test_nan_or_inf_in_a_full_fine_tune(bert_models, store, tmp_path, where, args):
    """Refused, never stored: a NaN would otherwise be a kept delta (or a sign bit) like any other value."""
    for bad in (float("nan"), float("-inf")):
        sd = {k: v.clone() for k, v in bert_models["sds"]["beta"].items()}
        sd[where].view(-1)[5] = bad
        save_file(sd, str(tmp_path / "bad.safetensors"))
        before = tree(store)
        one_line(["add-task", store, "bad", tmp_path / "bad.safetensors", *args],
                 f"tensor {where!r} has NaN or Inf values")
        assert tree(store) == before


def test_nan_in_a_head_the_base_lacks(bert_models, tmp_path):
    from transformers import BertForSequenceClassification
    m = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    m.bert.load_state_dict(bert_models["sd0"])
    with torch.no_grad():
        m.classifier.weight[0, 0] = float("nan")
    m.save_pretrained(str(tmp_path / "cls"))
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]}, kind="tall-mask")
    one_line(["add-task", url, "cls", tmp_path / "cls", "--kind", "tall-mask"],
             "tensor 'classifier.weight' has NaN or Inf values")
    assert modelstore.open(url).tasks() == ["alpha"]


# ---- task names ----------------------------------------------------------------------------------

def test_a_task_name_like_an_option(bert_models, store):
    alpha = bert_models["tasks"]["alpha"]
    one_line(["add-task", store, "-x", alpha], "no such option '-x'; task names start with a letter or digit", 2)
    one_line(["rm", store, "-x"], "task names start with a letter or digit", 2)
    one_line(["export", store, "-x", store + "-out"], "task names start with a letter or digit", 2)
    # after `--` it is the name, and refused as one
    one_line(["add-task", store, "--", "-x", alpha], "invalid task name '-x'")
    one_line(["ls", store, "--bogus"], "no such option '--bogus'", 2)
    with pytest.raises(modelstore.InputError, match="starting with a letter or digit"):
        modelstore.open(store, mode="a").add_task("-x", alpha)
    assert modelstore.open(store).tasks() == ["alpha"]


# ---- safetensors headers -------------------------------------------------------------------------

def write_safetensors(path, header: dict, data: bytes) -> str:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


def f32(shape, start):
    n = 4 * int(torch.tensor(shape).prod())
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + n]}


@pytest.mark.parametrize("header, size, match", [
    ({"a": f32([2, 2], 0), "b": f32([2, 2], 8)}, 24, "tensors 'a' and 'b' overlap (data bytes [8, 16))"),
    ({"a": f32([4], 0), "b": f32([4], 0)}, 16, "overlap"),
    ({"b": f32([2], 0), "a": f32([2], 16)}, 24, "data bytes [8, 16) before tensor 'a' belong to no tensor"),
    ({"a": f32([2], 0)}, 12, "the last 4 bytes of the data section belong to no tensor"),
    ({"a": f32([4], 8)}, 16, "tensor 'a' (data offsets [8, 24]) lies outside the 16-byte data section"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, 12, "not the 16 bytes its shape [4] of F32 takes"),
])
def test_a_malformed_safetensors_header_is_refused_when_opened(store, tmp_path, header, size, match):
    path = write_safetensors(tmp_path / "bad.safetensors", header, bytes(size))
    with pytest.raises(modelstore.InputError, match="bad.safetensors") as e:
        open_checkpoint(path)  # the header alone: no tensor is read
    assert match in str(e.value)
    before = tree(store)
    one_line(["add-task", store, "bad", path], match)
    assert tree(store) == before


def test_a_well_formed_file_with_empty_tensors_opens(tmp_path):
    save_file({"a": torch.zeros(0), "b": torch.ones(3), "c": torch.zeros(2, 0)}, str(tmp_path / "ok.safetensors"))
    ck = open_checkpoint(str(tmp_path / "ok.safetensors"))
    assert torch.equal(ck.get("b"), torch.ones(3)) and ck.shape("c") == (2, 0)
