"""A store on S3: moto's real S3 HTTP server on 127.0.0.1, started by the tests."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import start_moto

import modelstore

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    server, opts = start_moto()
    yield opts
    server.stop()


def test_build_add_load_on_s3(s3, bert_models):
    url = "s3://models/store1"
    t = bert_models["tasks"]
    s = modelstore.build(url, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1,
                         storage_options=s3)
    local = modelstore.build(str(bert_models["root"] / "s3-twin"), bert_models["pre"],
                             {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1)
    got, want = s.load("alpha"), local.load("alpha")
    assert all(torch.equal(got[k], want[k]) for k in want)
    modelstore.add_task(url, "gamma", t["gamma"], storage_options=s3)
    s = modelstore.open(url, storage_options=s3)
    assert s.tasks() == ["alpha", "beta", "gamma"]
    assert set(s.load("gamma")) == set(bert_models["sd0"])
    modelstore.remove_task(url, "beta", storage_options=s3)
    assert modelstore.open(url, storage_options=s3).tasks() == ["alpha", "gamma"]


def test_cli_on_s3(s3, bert_models, monkeypatch):
    from click.testing import CliRunner

    from modelstore.cli import main
    monkeypatch.setenv("MODELSTORE_STORAGE_OPTIONS", json.dumps(s3))
    r = CliRunner().invoke(main, ["build", "s3://models/store2", "--pretrained", bert_models["pre"],
                                  "--task", f"alpha={bert_models['tasks']['alpha']}"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["ls", "s3://models/store2", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["task"] == "alpha"
    r = CliRunner().invoke(main, ["ls", "s3://models/nothing-here"])
    assert r.exit_code == 1 and "not a modelstore store" in r.output


def test_loading_a_task_takes_few_requests(s3, bert_models):
    """Once the base is kept (from its second load on), loading another task costs a handful of
    GETs, whatever the tensor count."""
    import io
    import logging
    t = bert_models["tasks"]
    modelstore.build("s3://models/store3", bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]},
                     value_dtype="float16", storage_options=s3)  # float values: no scales array
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    log = logging.getLogger("werkzeug")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        s = modelstore.open("s3://models/store3", storage_options=s3)
        s.load("alpha")  # streams the base
        s.load("alpha")  # keeps it
        before = buf.getvalue().count("HTTP/1.1")
        sd = s.load("beta")
        second = [line for line in buf.getvalue().splitlines()[before:] if "HTTP/1.1" in line]
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    assert len(sd) > 30
    # the manifest read again (HEAD + GET: reads follow other writers), task group + (metadata + one
    # chunk) for indices and for values
    assert len(second) <= 7, second


def test_sync_local_to_s3_and_back(s3, bert_models, tmp_path):
    from modelstore.storage.transfer import sync
    t = bert_models["tasks"]
    local = str(tmp_path / "local")
    modelstore.build(local, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.1)
    url = "s3://models/synced"
    report = sync(local, url, dst_options=s3)
    assert report.copied == ["alpha", "beta"] and report.bases_copied == ["merged"]
    remote = modelstore.open(url, storage_options=s3)
    want = modelstore.open(local)
    for task in ("alpha", "beta"):
        got = remote.load(task)
        assert all(torch.equal(got[k], v) for k, v in want.load(task).items())
    assert sync(local, url, dst_options=s3).up_to_date == ["alpha", "beta"]  # nothing copied twice
    back = str(tmp_path / "back")
    assert sync(url, back, tasks=["beta"], src_options=s3).copied == ["beta"]
    got = modelstore.open(back).load("beta")
    assert all(torch.equal(got[k], v) for k, v in want.load("beta").items())


def test_load_by_url_takes_storage_options_over_the_environment(s3, bert_models, monkeypatch):
    from modelstore.errors import InputError
    url = "s3://models/store-load"
    s = modelstore.build(url, bert_models["pre"], {"alpha": bert_models["tasks"]["alpha"]}, keep=0.1,
                         storage_options=s3)
    want = s.load("alpha")
    monkeypatch.setenv("MODELSTORE_STORAGE_OPTIONS", json.dumps(s3))
    got = modelstore.load("alpha", url)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    monkeypatch.setenv("MODELSTORE_URL", url)
    assert torch.equal(modelstore.load("alpha")["embeddings.word_embeddings.weight"],
                       want["embeddings.word_embeddings.weight"])
    # explicit options win over the environment's: a dead endpoint there is overridden here
    monkeypatch.setenv("MODELSTORE_STORAGE_OPTIONS", json.dumps({**s3, "endpoint_url": "http://127.0.0.1:9"}))
    got = modelstore.load("alpha", url, storage_options={"endpoint_url": s3["endpoint_url"]})
    assert all(torch.equal(got[k], want[k]) for k in want)
    monkeypatch.delenv("MODELSTORE_STORAGE_OPTIONS")
    got = modelstore.load("alpha", url, storage_options=s3)
    assert all(torch.equal(got[k], want[k]) for k in want)
    for bad in ("not json", "[1, 2]"):
        monkeypatch.setenv("MODELSTORE_STORAGE_OPTIONS", bad)
        with pytest.raises(InputError, match="MODELSTORE_STORAGE_OPTIONS is not a JSON object"):
            modelstore.load("alpha", url)
    with pytest.raises(InputError, match="already open"):
        modelstore.load("alpha", s, storage_options=s3)
