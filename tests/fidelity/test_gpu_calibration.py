"""Calibration on a GPU (`device="cuda"`): the models run on the device, and what the record says
is what the stored task's outputs give against the original's on the CPU, text by text, to the
near-ties the two devices' rounding may flip.

These run where torch sees a CUDA device (`tools/device_check.sh` runs them on the device machine);
elsewhere they are skipped. MODELSTORE_TEST_DEVICE=cpu runs them on the CPU, to check the tests'
own code."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from test_calibrated import _independent, _store, classifiers  # noqa: E402, F401  (a fixture)

import modelstore  # noqa: E402

DEVICE = os.environ.get("MODELSTORE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device here (tools/device_check.sh runs these on one)")


@pytest.mark.parametrize("task, target", [("dense", {"min_agreement": 0.9}), ("spiky", {"max_kl": 1e-3})])
def test_a_calibrated_write_on_the_device_measures_what_the_cpu_measures(classifiers, tmp_path, task, target):  # noqa: F811
    s = _store(classifiers, tmp_path)
    f = s.add_task(task, classifiers[task], calibration=classifiers["cal"], device=DEVICE, **target)["fidelity"]
    assert f["device"].startswith(DEVICE) and f["met"]
    texts = [json.loads(line)["text"] for line in open(classifiers["cal"])]
    stored = modelstore.load_model(task, s.url, dtype=torch.float32)
    agreement, kl = _independent(classifiers[task], stored, texts, classifiers["tok"])
    assert abs(agreement - f["agreement"]) <= 2 / len(texts)
    assert f["mean_kl"] == pytest.approx(kl, rel=0.02, abs=1e-6)


def test_a_dual_encoder_calibrated_on_the_device_matches_what_the_cpu_matches(tmp_path):
    """CLIP's zero-shot matches on the device (its texts' batch placed there, its logit scale
    applied there): the record is what features made on the CPU one image and text at a time give."""
    from test_calibrated import _perturbed, _texts
    from test_dual_encoders import _clip, _features
    from transformers import CLIPModel
    prompts = _texts(12, 6)
    m, proc, rows = _clip(tmp_path, prompts * 2)
    for name in ("pre", "ft"):
        if name == "ft":
            _perturbed(m, 2, 0.001)
        m.save_pretrained(tmp_path / name)
        proc.save_pretrained(tmp_path / name)
    cal = tmp_path / "c.jsonl"
    cal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    f = modelstore.open(url, mode="a").add_task("clip", str(tmp_path / "ft"), calibration=str(cal), device=DEVICE,
                                                min_agreement=0.9)["fidelity"]
    assert f["device"].startswith(DEVICE) and f["output"] == "zero-shot"
    ref = CLIPModel.from_pretrained(tmp_path / "ft").eval()
    stored = modelstore.load_model("clip", url, dtype=torch.float32)
    (ei, et), (si, st) = (_features(x, proc, tmp_path, rows, prompts) for x in (ref, stored))
    agree = int(((ei @ et.T).argmax(1) == (si @ st.T).argmax(1)).sum())
    assert abs(f["agreement"] - agree / 24) <= 2 / 24
