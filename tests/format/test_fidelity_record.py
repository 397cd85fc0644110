"""The fidelity record of a task entry (spec section 2): its shape is checked when a manifest is
read, a damaged one is named, and `info`/`ls` show it. Records are committed here through the
store's own commit path, as a calibrated add-task writes them."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

import modelstore
from modelstore.cli import main
from modelstore.format.manifest import fidelity_problem

SHA = hashlib.sha256(b'{"text": "a calibration example"}\n').hexdigest()


def _record(**changes) -> dict:
    """A record as a calibrated add-task writes it (contract of issue 25), with `changes` applied."""
    fft = {"kind": "fft", "sparsify": "dare", "value_dtype": "int4"}
    candidates = [{"setting": {**fft, "keep": k}, "bytes": int(k * 1e6), "agreement": a, "mean_kl": kl,
                   "met": a >= 0.99}
                  for k, a, kl in [(0.01, 0.97, 0.02), (0.02, 0.996, 0.0012), (0.05, 0.999, 0.0004)]]
    candidates += [{"setting": {"kind": "exact"}, "bytes": 10**7, "agreement": 1.0, "mean_kl": 0.0, "met": True}]
    out = {"metric": "agreement", "target": 0.99, "met": True, "output": "classification", "agreement": 0.996,
           "mean_kl": 0.0012, "examples": 256, "predictions": 256, "calibration_sha256": SHA, "device": "cpu",
           "seconds": 41.2, "setting": {**fft, "keep": 0.02}, "candidates": candidates}
    out.update(changes)
    return out


def _set_record(url: str, task: str, record: object) -> None:
    """Commit `record` as `task`'s fidelity record (the store's commit path: sealed, checksummed)."""
    def change(m):
        m["tasks"][task]["fidelity"] = record
        return m
    modelstore.open(url, mode="a")._commit(change)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_sound_record_passes_and_later_fields_are_allowed():
    assert fidelity_problem(_record()) is None
    assert fidelity_problem(_record(metric="kl", target=0.01)) is None
    assert fidelity_problem(_record(metric="dare-q", target=None, output="causal-lm", predictions=9000)) is None
    assert fidelity_problem(_record(agreement=1, mean_kl=0, candidates=[])) is None  # JSON integers are numbers
    assert fidelity_problem(_record(extra={"by": "a later writer"})) is None
    assert fidelity_problem(_record(agreement_low=0.98)) is None  # a bound, written since
    assert fidelity_problem(_record(max_length=128)) is None  # the tokens texts were cut at, written since
    assert fidelity_problem(_record(file_rows=1000)) is None  # the rows the examples were spread over, since
    for output in ("token-classification", "seq2seq", "regression"):  # a later writer's outputs read too
        assert fidelity_problem(_record(output=output)) is None


def _without(field: str) -> dict:
    r = _record()
    del r[field]
    return r


def _bad_candidate(**changes) -> dict:
    r = _record()
    r["candidates"][1].update(changes)
    return r


@pytest.mark.parametrize("record, named", [
    ("not a record", "not an object"),
    (_record(agreement=1.5), "agreement 1.5 is not a fraction in [0, 1]"),
    (_record(agreement="0.99"), "agreement '0.99' is not a fraction"),
    (_record(agreement=True), "agreement True is not a fraction"),
    (_record(mean_kl=-0.1), "mean_kl -0.1 is not a finite number >= 0"),
    (_record(mean_kl=float("nan")), "mean_kl nan is not"),
    (_record(calibration_sha256="abc123"), "calibration_sha256 'abc123' is not 64 lowercase hex digits"),
    (_record(calibration_sha256=SHA.upper()), "calibration_sha256"),
    (_record(calibration_sha256=SHA + "0"), "calibration_sha256"),
    (_record(metric="bleu"), "metric 'bleu' is not one of agreement, kl, dare-q"),
    (_record(output=""), "output '' is not a name"),
    (_record(agreement_low=0.999), "agreement_low 0.999 is not a fraction at most the agreement"),
    (_record(agreement_low=-0.1), "agreement_low -0.1 is not a fraction"),
    (_record(max_length=1), "max_length 1 is not a count of at least 2"),
    (_record(file_rows=64), "file_rows 64 is not a count of more than the examples"),
    (_record(file_rows=-1), "file_rows -1 is not a count of more than the examples"),
    (_record(max_length="256"), "max_length '256' is not a count"),
    (_record(met="yes"), "met 'yes' is not true or false"),
    (_record(examples=2.5), "examples 2.5 is not a count"),
    (_record(predictions=-1), "predictions -1 is not a count"),
    (_record(seconds="41s"), "seconds '41s' is not"),
    (_record(device=None), "device None is not a string"),
    (_record(setting={"keep": 0.02}), "setting {'keep': 0.02} is not an object naming its kind"),
    (_record(target=None), "target None does not suit metric 'agreement'"),
    (_record(target=1.5), "target 1.5 does not suit metric 'agreement'"),
    (_record(metric="dare-q"), "target 0.99 does not suit metric 'dare-q'"),
    (_record(metric="kl", target=-1), "target -1 is not"),
    (_record(candidates={"a": 1}), "candidates {'a': 1} is not a list"),
    (_record(candidates=[1]), "candidates[0]: not an object"),
    (_bad_candidate(bytes=-5), "candidates[1]: bytes -5 is not a byte count"),
    (_bad_candidate(agreement=2), "candidates[1]: agreement 2 is not a fraction"),
    (_bad_candidate(met=1), "candidates[1]: met 1 is not true or false"),
    (_without("calibration_sha256"), "calibration_sha256 missing"),
    (_without("candidates"), "candidates missing"),
])
def test_a_damaged_record_is_named(record, named):
    assert named in (fidelity_problem(record) or "")


def test_info_and_ls_show_the_record(store2):
    rec = _record()
    _set_record(store2, "alpha", rec)
    s = modelstore.open(store2)
    assert s.entry("alpha")["fidelity"] == rec and "fidelity" not in s.entry("beta")
    assert s.check().ok  # readers ignore the record: the task reads as before
    out = _cli("info", store2, "alpha").output
    assert ("  fidelity: agreement 0.996 (target >= 0.99, met) on 256 calibration examples, mean KL 0.0012; "
            "chose fft dare int4 keep 2% of 4 candidates\n") in out, out
    assert "fidelity" not in _cli("info", store2, "beta").output
    assert json.loads(_cli("info", store2, "alpha", "--json").output)["fidelity"] == rec
    rows = {r["task"]: r for r in json.loads(_cli("ls", store2, "--json").output)}
    assert rows["alpha"]["fidelity"] == rec and rows["beta"]["fidelity"] is None
    table = _cli("ls", store2).output.splitlines()
    assert table[0].split()[-1] == "agree"
    assert [line.split()[-1] for line in table[1:]] == ["0.9960", "-"]  # alpha, beta


@pytest.mark.parametrize("changes, line", [
    (dict(metric="kl", target=0.01, met=False, mean_kl=0.0304, agreement=0.9),
     "agreement 0.9 on 256 calibration examples, mean KL 0.03 (target <= 0.01, NOT met); chose fft dare int4 "
     "keep 2% of 4 candidates"),
    (dict(metric="dare-q", target=None, output="causal-lm", predictions=8192,
          setting={"kind": "fft", "sparsify": "dare", "keep": 0.005, "value_dtype": "float16", "dare_q": 0.003}),
     "agreement 0.996 on 256 calibration examples (8192 predictions), mean KL 0.0012; tuned DARE's rescale, "
     "chose fft dare float16 keep 0.5% q 0.003 of 4 candidates"),
    (dict(setting={"kind": "exact"}), "chose exact of 4 candidates"),
])
def test_info_line_per_metric(store2, changes, line):
    _set_record(store2, "beta", _record(**changes))
    out = _cli("info", store2, "beta").output
    assert line in out and out.count("fidelity:") == 1, out


@pytest.mark.parametrize("damage, named", [
    ({"agreement": 1.5}, "agreement 1.5 is not a fraction in [0, 1]"),
    ({"examples": "256"}, "examples '256' is not a count"),
    ({"calibration_sha256": "f" * 63}, "calibration_sha256 'fff"),
])
def test_a_damaged_record_is_damage_to_open_and_check(store2, damage, named):
    _set_record(store2, "alpha", _record(**damage))  # a writer's bug, sealed with a valid checksum
    with pytest.raises(modelstore.CorruptStoreError, match=r"task 'alpha': fidelity record: ") as e:
        modelstore.open(store2)
    assert named in str(e.value)
    for cmd in ("check", "info", "ls"):
        r = _cli(cmd, store2)
        assert r.exit_code == 1 and named in r.output and "fidelity record" in r.output, (cmd, r.output)
        assert r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
