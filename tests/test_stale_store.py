"""A long-lived Store follows the store as other processes change it: after a task is replaced or
removed by another process (the CLI, run as a process of its own), every read of the first Store
gives the task as it is now, bit for bit what a fresh Store loads, or TaskNotFoundError."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_bert_config

import modelstore


def cli(*args: str) -> None:
    """Run the modelstore CLI in a process of its own."""
    p = subprocess.run([sys.executable, "-m", "modelstore", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def bert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.fixture()
def url(bert_models, tmp_path) -> str:
    url = str(tmp_path / "s")
    t = bert_models["tasks"]
    modelstore.build(url, bert_models["pre"], {"alpha": t["alpha"], "beta": t["beta"]}, keep=0.3)
    return url


def model():
    from transformers import BertModel
    return BertModel(tiny_bert_config()).eval()


@pytest.mark.parametrize("cache_base", [True, False])
def test_reads_follow_a_task_another_process_replaced(bert_models, url, cache_base):
    s = modelstore.open(url, cache_base=cache_base)
    old = s.load("alpha")
    m = model()
    s.switch(m, "alpha", resident="1GB")  # resident: a switch back would read nothing
    s.switch(m, "beta", resident="1GB")
    s.switch(m, "alpha", resident="1GB")
    old_table = s.table("alpha")
    cli("add-task", url, "alpha", bert_models["tasks"]["gamma"], "--overwrite", "--keep", "0.2")
    new = modelstore.open(url).load("alpha")
    assert not same(new, old)  # what follows tells the two apart
    assert same(dict(s.tensors("alpha")), new)
    assert s.table("alpha") != old_table
    assert same(s.load("alpha"), new)
    got = bert(s.load_into(model(), "alpha").state_dict())
    assert all(torch.equal(got[k], new[k]) for k in new)
    # the model holds the old alpha, and the old alpha is resident: neither may be served
    s.switch(m, "alpha", resident="1GB")
    assert all(torch.equal(bert(m.state_dict())[k], new[k]) for k in new)
    s.switch(m, "beta", resident="1GB")
    s.switch(m, "alpha", resident="1GB")
    assert all(torch.equal(bert(m.state_dict())[k], new[k]) for k in new)


def test_a_generator_made_before_the_change_reads_the_new_task(bert_models, url):
    s = modelstore.open(url)
    stream = s.tensors("alpha")  # nothing read yet
    cli("add-task", url, "alpha", bert_models["tasks"]["gamma"], "--overwrite")
    assert same(dict(stream), modelstore.open(url).load("alpha"))


def test_reads_of_a_task_another_process_removed_say_so(url):
    s = modelstore.open(url)
    s.load("alpha")
    m = model()
    s.switch(m, "alpha", resident="1GB")
    s.switch(m, "beta", resident="1GB")
    stream = s.tensors("alpha")
    cli("rm", url, "alpha")
    reads = [lambda: dict(stream), lambda: s.load("alpha"), lambda: s.table("alpha"),
             lambda: s.load_into(model(), "alpha"), lambda: s.switch(m, "alpha", resident="1GB")]
    for read in reads:
        with pytest.raises(modelstore.TaskNotFoundError, match="'alpha'"):
            read()
    with pytest.raises(modelstore.TaskNotFoundError):
        s.tensors("alpha")
    assert s.tasks() == ["beta"] and s.info()["tasks"] == ["beta"]


def test_a_task_another_process_added_is_found(bert_models, url):
    s = modelstore.open(url)
    cli("add-task", url, "gamma", bert_models["tasks"]["gamma"])
    assert s.entry("gamma")["kind"] == "fft" and "gamma" in s.tasks()
    assert same(s.load("gamma"), modelstore.open(url).load("gamma"))


def test_a_store_rebuilt_by_another_process_is_read_anew(bert_models, url, tmp_path):
    """The base (and its model files) too: a base kept in memory is not served once replaced."""
    s = modelstore.open(url, cache_base=True)
    s.load("alpha")
    old_base = s.base("merged")
    assert "vocab.txt" not in s.model_files("merged")
    t = bert_models["tasks"]
    pre = str(tmp_path / "pre")
    shutil.copytree(bert_models["pre"], pre)
    with open(os.path.join(pre, "vocab.txt"), "w") as fh:
        fh.write("[PAD]\n[UNK]\nhello\n")
    subprocess.run(["rm", "-r", url], check=True)
    cli("build", url, "--pretrained", pre, "--task", f"alpha={t['gamma']}", "--task", f"beta={t['beta']}",
        "--keep", "0.3")
    fresh = modelstore.open(url)
    assert not same(fresh.base("merged"), old_base)
    assert same(s.base("merged"), fresh.base("merged"))
    assert same(s.load("alpha"), fresh.load("alpha"))
    assert s.model_files("merged") == {"vocab.txt": b"[PAD]\n[UNK]\nhello\n"}


def test_damage_is_still_reported_as_damage(url):
    """Following the manifest must not hide a payload that is missing although the manifest lists it."""
    s = modelstore.open(url)
    path = os.path.join(url, s.entry("alpha")["path"])
    for f in sorted(os.listdir(path)):
        if f != "zarr.json":
            subprocess.run(["rm", "-r", os.path.join(path, f)], check=True)
    with pytest.raises(modelstore.CorruptStoreError):
        s.load("alpha")
    with pytest.raises(modelstore.CorruptStoreError):
        dict(s.tensors("alpha"))


def test_reads_while_another_process_keeps_replacing_the_task(bert_models, url):
    """A payload may vanish between a read's manifest read and its payload read (the replacing
    writer deletes it on publish): the read follows the new manifest, and every result is one of
    the two versions whole, never a damaged-store error or a mix."""
    t = bert_models["tasks"]
    versions = []
    for path in (t["gamma"], t["alpha"]):
        modelstore.open(url, mode="a").add_task("alpha", path, overwrite=True, keep=0.3)
        versions.append(modelstore.open(url).load("alpha"))
    code = (f"import modelstore\ns = modelstore.open({url!r}, mode='a')\n"
            f"for i in range(12):\n"
            f"    s.add_task('alpha', [{t['gamma']!r}, {t['alpha']!r}][i % 2], overwrite=True, keep=0.3)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    s, m, seen = modelstore.open(url), model(), set()
    try:
        while writer.poll() is None:
            got = s.load("alpha")
            seen.add(next(i for i, v in enumerate(versions) if same(got, v)))
            s.switch(m, "alpha")
            held = bert(m.state_dict())
            assert any(all(torch.equal(held[k], v[k]) for k in v) for v in versions)
    finally:
        _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert seen  # (which versions a run sees depends on timing)
    assert same(s.load("alpha"), versions[1])
