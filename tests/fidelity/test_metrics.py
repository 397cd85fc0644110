"""Agreement and KL against numpy, the coarsened reference of large vocabularies, and the data
reader's two formats."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from modelstore.errors import InputError
from modelstore.fidelity import metrics
from modelstore.fidelity.data import Calibration, read_data


def _np_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    la = a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
    lb = b - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True)) - b.max(-1, keepdims=True)
    return (np.exp(la) * (la - lb)).sum(-1)


def test_agreement_and_kl_match_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 7, generator=g) * 3, torch.randn(50, 7, generator=g) * 3
    acc = metrics.Agreement()
    acc.add(a[:20], b[:20])
    acc.add(a[20:], b[20:])
    assert acc.rows == 50
    assert acc.agreement == float((a.argmax(-1) == b.argmax(-1)).double().mean())
    assert acc.mean_kl == pytest.approx(float(_np_kl(a.double().numpy(), b.double().numpy()).mean()), rel=1e-9)


def test_a_coarsened_reference_bounds_the_kl_from_below_and_keeps_agreement(monkeypatch):
    monkeypatch.setattr(metrics, "TOP_TOKENS", 16)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 1000, generator=g) * 4
    b = a + torch.randn(40, 1000, generator=g)
    full, coarse = metrics.Agreement(), metrics.Agreement()
    full.add(a.double().log_softmax(-1), b)
    coarse.add(metrics.Coarse.of(a.double().log_softmax(-1)), b)
    assert coarse.agreement == full.agreement
    assert 0 < coarse.mean_kl <= full.mean_kl
    # with every entry kept, the coarse KL is the KL
    exact = metrics.Agreement()
    monkeypatch.setattr(metrics, "TOP_TOKENS", 1000)
    exact.add(metrics.Coarse.of(a.double().log_softmax(-1)), b)
    assert exact.mean_kl == pytest.approx(full.mean_kl, rel=1e-9)


def test_json_lines_and_csv_read_alike(tmp_path):
    j, c = tmp_path / "d.jsonl", tmp_path / "d.csv"
    j.write_text('{"text": "a cat", "label": 1}\n\n{"text": "b, \\"dog\\"", "label": 0}\n')
    c.write_text('text,label\na cat,1\n"b, ""dog""",0\n')
    assert read_data(str(j)) == read_data(str(c)) == (["a cat", 'b, "dog"'], [1, 0])
    cal = Calibration.from_file(str(c), max_examples=1)
    assert cal.texts == ["a cat"] and cal.sha256 == hashlib.sha256(c.read_bytes()).hexdigest()
    (tmp_path / "x.csv").write_text("words\nhello\n")
    with pytest.raises(InputError, match='needs a "text" column'):
        read_data(str(tmp_path / "x.csv"))
    with pytest.raises(InputError, match="at least one text"):
        Calibration([])
