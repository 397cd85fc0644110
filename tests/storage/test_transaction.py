"""A writer's payloads in flight (storage/transaction.py): several written for one task, each read
back, one committed and the others discarded, on a local disk and on moto's S3 server; gc run with
no grace meanwhile keeps them all."""

from __future__ import annotations

import pytest
import torch

import modelstore
from modelstore.inputs.sources import open_checkpoint
from modelstore.kinds import checkpoint_kind
from modelstore.store import source_info

CPU = torch.device("cpu")


def test_two_payloads_for_one_task_commit_one_and_discard_the_other(shared, bert_models):
    url, opts = shared
    s = modelstore.open(url, mode="a", storage_options=opts)
    ck = open_checkpoint(bert_models["tasks"]["alpha"])
    fft = checkpoint_kind("fft")
    exact, lossy = (s._write_task_payload("alpha", fft, ck, fft.parse_options(o), source_info=source_info(ck))
                    for o in ({"keep": 1.0, "value_dtype": "float32"}, {"keep": 0.05}))
    assert exact.path != lossy.path and s.tasks() == []  # written, not committed

    gc = s.collect_garbage(grace=0, force=True)  # no grace: only their leases keep them
    assert sorted(gc.kept_leased) == sorted([exact.path, lossy.path]) and not gc.removed

    got = {p.path: dict(s._tensors("alpha", p.entry, CPU, None)) for p in (exact, lossy)}
    want = bert_models["sds"]["alpha"]
    assert set(got[exact.path]) == set(got[lossy.path]) == set(want)
    for k, v in want.items():  # every delta entry kept in float32: the fine-tune itself, up to rounding
        torch.testing.assert_close(got[exact.path][k], v, rtol=0, atol=1e-6)
    assert any(not torch.allclose(got[lossy.path][k], v) for k, v in want.items())  # so the two differ

    assert s._commit_task("alpha", *lossy) == lossy.entry
    s._discard_payload(exact.path)

    r = modelstore.open(url, storage_options=opts)
    assert r.tasks() == ["alpha"] and r.entry("alpha") == lossy.entry
    loaded = r.load("alpha")
    assert all(torch.equal(loaded[k], got[lossy.path][k]) for k in want)
    assert r.loc.files(exact.path) == {}
    assert not [f for f in r.loc.files("tasks/alpha") if f.endswith(".lease")]  # both leases ended
    assert r.check().ok
    left = r.collect_garbage(grace=0, force=True, dry_run=True)
    assert not (left.removed or left.leftovers or left.kept_young or left.kept_leased)


def test_a_payload_is_committed_or_discarded_once(shared, bert_models):
    url, opts = shared
    s = modelstore.open(url, mode="a", storage_options=opts)
    ck = open_checkpoint(bert_models["tasks"]["beta"])
    fft = checkpoint_kind("fft")
    first, second = (s._write_task_payload("beta", fft, ck, fft.parse_options({"keep": 0.1}),
                                           source_info=source_info(ck)) for _ in range(2))
    s._commit_task("beta", *first)
    s._discard_payload(second.path)
    with pytest.raises(modelstore.InputError, match="no payload of this writer's in flight"):
        s._discard_payload(first.path)  # committed: never deleted by its writer
    with pytest.raises(modelstore.InputError, match="no payload of this writer's in flight"):
        s._commit_task("beta", *second, overwrite=True)  # discarded: never published
    r = modelstore.open(url, storage_options=opts)
    assert r.entry("beta") == first.entry and r.check().ok
    assert r.loc.files(first.path) and r.loc.files(second.path) == {}
