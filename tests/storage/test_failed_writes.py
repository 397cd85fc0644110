"""Failed writes leave nothing behind, and bad inputs are one-line errors before anything is written."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import modelstore
from modelstore.cli import main


def _tree(url: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), url) for d, _, fs in os.walk(url) for f in fs
                  if f != ".manifest.lock")


def _one_line_error(args, match: str) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1 and match in r.output, r.output
    assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output, r.output
    return r.output


@pytest.fixture()
def base_only(bert_models, tmp_path):
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    return url


def test_failed_add_task_leaves_no_directory(bert_models, base_only, tmp_path):
    before = _tree(base_only)
    sd = dict(bert_models["sds"]["alpha"])
    k = "encoder.layer.0.attention.self.query.weight"
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("nan")
    save_file({n: v.contiguous() for n, v in sd.items()}, str(tmp_path / "nan.safetensors"))
    huge = {n: (v + 1e6 if v.dtype.is_floating_point else v).contiguous()
            for n, v in bert_models["sds"]["alpha"].items()}
    save_file(huge, str(tmp_path / "huge.safetensors"))
    for path, match in ((tmp_path / "nan.safetensors", "NaN or Inf"), (tmp_path / "huge.safetensors", "float32")):
        _one_line_error(["add-task", base_only, "x", path, "--keep", "1.0"], match)
        assert _tree(base_only) == before, match
        assert not os.path.exists(os.path.join(base_only, "tasks", "x"))


def test_lora_input_is_validated_before_the_pretrained_base_is_committed(bert_models, tmp_path):
    t = bert_models["tasks"]
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"alpha": t["alpha"]}, keep=0.1)
    before = _tree(url)
    adapter = tiny_adapter(bert_models, tmp_path / "ad")
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    torch.save({"w": torch.zeros(2), "evil": Exploit()}, os.path.join(adapter, "adapter_model.bin"))
    out = _one_line_error(["add-task", url, "l", "--lora", adapter, "--pretrained", bert_models["pre"]],
                          "cannot read the weights")
    assert "weights_only=False" not in out
    assert _tree(url) == before and sorted(modelstore.open(url).manifest["bases"]) == ["merged"]


def tiny_adapter(bert_models, path) -> str:
    import peft
    from transformers import BertModel
    m = BertModel(bert_models["cfg"])
    m.load_state_dict(bert_models["sd0"], strict=False)
    pm = peft.get_peft_model(m, peft.LoraConfig(init_lora_weights=False, r=4, target_modules=["query"]))
    pm.save_pretrained(str(path))
    return str(path)


class Exploit:
    """An arbitrary class: unpickling it would run code from the file."""


def test_pickle_refusal_is_one_line_and_never_suggests_unsafe_loading(tmp_path, base_only):
    torch.save({"w": torch.zeros(2), "obj": Exploit()}, str(tmp_path / "evil.bin"))
    out = _one_line_error(["add-task", base_only, "x", tmp_path / "evil.bin"], "weights_only")
    assert "weights_only=False" not in out


def _write_raw_safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("make, match", [
    (lambda p: _write_raw_safetensors(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     "truncated or malformed"),
    (lambda p: _write_raw_safetensors(p, {"w": {"dtype": "F32", "data_offsets": [0, 16]}}, b"\0" * 16),
     "no valid shape"),
    (lambda p: open(p, "wb").write(b"\x05\0\0\0\0\0\0\0{"), "not a readable safetensors"),
    (lambda p: _write_raw_safetensors(p, {"__metadata__": {}}, b""), "holds no tensors"),
])
def test_malformed_checkpoints_are_one_line_errors(base_only, tmp_path, make, match):
    path = str(tmp_path / "bad.safetensors")
    make(path)
    before = _tree(base_only)
    _one_line_error(["add-task", base_only, "x", path], match)
    assert _tree(base_only) == before


def test_a_keep_that_keeps_nothing_and_a_store_path_that_is_a_file(bert_models, base_only, tmp_path):
    _one_line_error(["add-task", base_only, "x", bert_models["tasks"]["alpha"], "--keep", "1e-9",
                     "--sparsify", "magnitude"], "keeps no entry")
    (tmp_path / "file").write_text("not a store")
    _one_line_error(["ls", tmp_path / "file"], "is a file")
    _one_line_error(["init", tmp_path / "file", "--pretrained", bert_models["pre"]], "is a file")
