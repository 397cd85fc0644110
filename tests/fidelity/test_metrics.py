"""Agreement and KL against numpy, the coarsened reference of large vocabularies, and the data
reader's two formats."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from modelstore.errors import InputError
from modelstore.fidelity import metrics
from modelstore.fidelity.data import Calibration, read_data, spread


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
    assert read_data(str(j)) == read_data(str(c)) == (["a cat", 'b, "dog"'], None, [1, 0], None, None, None)
    assert read_data(str(j), labels=False).labels is None
    cal = Calibration.from_file(str(c), max_examples=1)
    assert cal.texts == ["a cat"] and cal.pairs is None and cal.sha256 == hashlib.sha256(c.read_bytes()).hexdigest()
    (tmp_path / "x.csv").write_text("words\nhello\n")
    with pytest.raises(InputError, match='needs a "text" \\(or "question", "image" or "audio"\\) column'):
        read_data(str(tmp_path / "x.csv"))
    with pytest.raises(InputError, match="at least one text"):
        Calibration([])


def _each_refused(tmp_path, cases: list[tuple[str, str]]) -> None:
    """Each (file body, message) of `cases`: read_data refuses the body with the message."""
    for body, what in cases:
        (tmp_path / "bad.jsonl").write_text(body)
        with pytest.raises(InputError, match=what):
            read_data(str(tmp_path / "bad.jsonl"))


def test_choices_are_read_as_a_list_or_numbered_columns(tmp_path):
    """A multiple-choice row's choices: a JSON "choices" list, or choice0, choice1 ... columns (SWAG's
    ending0 ... too), empty ones left out; fewer than two, or choices in some rows only, are refused."""
    j, c = tmp_path / "m.jsonl", tmp_path / "m.csv"
    j.write_text('{"text": "q1", "choices": ["a", "b", "c"], "label": 2}\n{"text": "q2", "choices": ["d", "e"], '
                 '"label": 0}\n')
    c.write_text("text,ending1,ending0,ending2,label\nq1,b,a,c,2\nq2,e,d,,0\n")
    want = (["q1", "q2"], None, [2, 0], None, None, [["a", "b", "c"], ["d", "e"]])
    assert read_data(str(j)) == read_data(str(c)) == want
    cal = Calibration.from_file(str(c))
    assert cal.choices == want[-1] and cal.sha256 == hashlib.sha256(c.read_bytes()).hexdigest()
    assert Calibration(["q"], choices=[["a", "b"]]).sha256 != Calibration(["q"], pairs=["a"]).sha256
    _each_refused(tmp_path, [('{"text": "q", "choices": ["a"]}\n', 'line 1 is not a JSON object'),
                             ('{"text": "q", "choices": ["a", 1]}\n', 'line 1 is not a JSON object'),
                             ('{"text": "q", "choices": ["a", "b"]}\n{"text": "r"}\n', "some rows have choices")])
    with pytest.raises(InputError, match="two choices"):
        Calibration(["q"], choices=[["a"]])


def test_a_longer_file_gives_examples_spread_over_it(tmp_path):
    """A file sorted by label calibrates on every part of it: max_examples of its rows, row
    floor(i * rows / max_examples) of each i (spec section 2), pairs and images alike."""
    c = tmp_path / "sorted.csv"
    c.write_text("text,text_pair,label\n" + "".join(f"t{i},p{i},{i // 5}\n" for i in range(10)))
    cal = Calibration.from_file(str(c), max_examples=4)
    assert cal.texts == ["t0", "t2", "t5", "t7"] and cal.pairs == ["p0", "p2", "p5", "p7"] and cal.file_rows == 10
    for everything in (10, 11, None):
        whole = Calibration.from_file(str(c), max_examples=everything)
        assert len(whole.texts) == 10 and whole.file_rows is None
    assert spread(7, 3) == [0, 2, 4] and spread(3, 3) == [0, 1, 2] and spread(256, 1) == [0]
    from PIL import Image
    rows = []
    for i in range(5):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "text": f"<image> {i}"}))
    (tmp_path / "im.jsonl").write_text("\n".join(rows))
    cal = Calibration.from_file(str(tmp_path / "im.jsonl"), max_examples=2)
    assert cal.texts == ["<image> 0", "<image> 2"] and [os.path.basename(x) for x in cal.images] == ["0.png", "2.png"]


def test_pairs_are_read_under_either_name_and_all_or_none(tmp_path):
    """A pair task's second texts: text_pair, or SQuAD's question and context; a file giving them
    in some rows only, or a label that is neither an index nor a name, is refused in one line."""
    j, c, q = tmp_path / "p.jsonl", tmp_path / "p.csv", tmp_path / "q.jsonl"
    j.write_text('{"text": "a cat", "text_pair": "sat"}\n{"text": "a dog", "text_pair": "ran", "label": 2}\n')
    c.write_text('question,context\na cat,sat\na dog,ran\n')
    q.write_text('{"question": "a cat", "context": "sat", "id": "x1"}\n{"question": "a dog", "context": "ran"}\n')
    want = (["a cat", "a dog"], ["sat", "ran"], None, None, None, None)
    assert read_data(str(c)) == read_data(str(q)) == read_data(str(j), labels=False) == want
    cal = Calibration.from_file(str(q), max_examples=1)
    assert (cal.texts, cal.pairs) == (["a cat"], ["sat"])
    assert Calibration(["a"], pairs=["b"]).sha256 != Calibration(["a"]).sha256 == Calibration(["a"]).sha256
    _each_refused(tmp_path, [('{"text": "a", "text_pair": "b"}\n{"text": "c"}\n', "some rows have a second text"),
                             ('{"context": "b"}\n', 'line 1 is not a JSON object with a "text" string'),
                             ('{"text": "a", "label": [1, 2]}\n', "a label is a class index or name"),
                             ('{"text": "a", "label": 0.5}\n', "a label is a class index or name")])
    with pytest.raises(InputError, match="one second text"):
        Calibration(["a", "b"], pairs=["c"])


def test_image_and_audio_rows_name_files_beside_the_data(tmp_path):
    """An image or audio path is relative to the data file's folder; a file mixing images and
    texts, or images and sounds, or images and texts given together in Python, is refused in one
    line."""
    (tmp_path / "d").mkdir()
    j, c = tmp_path / "d" / "i.jsonl", tmp_path / "d" / "i.csv"
    j.write_text('{"image": "a.png", "label": 1}\n{"image": "/x/b.png", "label": 0}\n')
    c.write_text("image,label\na.png,1\n/x/b.png,0\n")
    want = ([], None, [1, 0], [str(tmp_path / "d" / "a.png"), "/x/b.png"], None, None)
    assert read_data(str(j)) == read_data(str(c)) == want
    j.write_text('{"audio": "a.wav", "label": 1}\n{"audio": "/x/b.wav", "label": 0}\n')
    assert read_data(str(j)) == ([], None, [1, 0], None, [str(tmp_path / "d" / "a.wav"), "/x/b.wav"], None)
    for rows in ('{"image": "a.png"}\n{"text": "a cat"}\n', '{"image": "a.png"}\n{"audio": "a.wav"}\n'):
        (tmp_path / "m.jsonl").write_text(rows)
        with pytest.raises(InputError, match="some rows name an image file and some do not"):
            read_data(str(tmp_path / "m.jsonl"))
    with pytest.raises(InputError, match="at least one image, and images only"):
        Calibration(["a cat", "a dog"], images=["a.png"])  # images with texts: one each
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "text": "<image> a"}\n{"image": "b.png"}\n')
    with pytest.raises(InputError, match="some give a text with it and some not"):
        read_data(str(tmp_path / "m.jsonl"))
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "text": "<image> a", "label": 1}\n')
    assert read_data(str(tmp_path / "m.jsonl")) == (["<image> a"], None, [1], [str(tmp_path / "a.png")], None, None)
    assert read_data(str(tmp_path / "m.jsonl")).modality == "image-text"
    with pytest.raises(InputError, match="at least one sound, and sounds only"):
        Calibration(audio=["a.wav"], pairs=["x"])
    with pytest.raises(InputError, match="and sounds only"):
        Calibration(images=["a.png"], audio=["a.wav"])
    with pytest.raises(InputError, match="a.png"):  # read for its hash, so a missing image is named at once
        Calibration.from_file(str(c))


@pytest.mark.parametrize("agree, n", [(256, 256), (253, 256), (230, 256), (5, 10), (0, 7), (999, 1000)])
def test_the_agreement_bound_is_wilsons(agree, n):
    """The lower bound is the p0 below the measured agreement at which the measurement lies z
    standard errors of p0 above it (Wilson's score interval), found here by bisection."""
    p, z = agree / n, metrics.Z_95
    lo, hi = 0.0, p
    for _ in range(200):
        mid = (lo + hi) / 2
        if (p - mid) / max(np.sqrt(mid * (1 - mid) / n), 1e-300) > z:
            lo = mid
        else:
            hi = mid
    assert metrics.agreement_low(p, n) == pytest.approx(lo, abs=1e-9)
    assert metrics.agreement_low(p, n) <= p


def test_the_bound_covers_the_true_agreement_19_times_in_20():
    """Drawn 256-example calibration sets of a task whose true agreement is 0.98: the bound falls
    below 0.98 in about 95% of them (one-sided; Wilson's interval is close to nominal here)."""
    rng = np.random.default_rng(0)
    draws = rng.binomial(256, 0.98, 20000)
    covered = np.mean([metrics.agreement_low(d / 256, 256) <= 0.98 for d in draws])
    assert 0.93 <= covered <= 0.99
