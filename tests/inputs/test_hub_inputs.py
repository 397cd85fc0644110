"""Model inputs given as Hub ids (`org/name[@revision]`), resolved from a populated local Hugging
Face cache with the Hub offline, as a machine without model hubs does."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

import modelstore
from modelstore.cli import main


def _cache_repo(cache, repo_id: str, src: str, commit: str, branch: str = "main") -> None:
    """Put directory `src` into the cache as snapshot `commit` of model `repo_id`, `branch` pointing at it."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / branch).write_text(commit)


@pytest.fixture()
def hub_cache(bert_models, tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    _cache_repo(cache, "acme/tiny-bert", bert_models["pre"], "a" * 40)
    _cache_repo(cache, "acme/tiny-bert-alpha", bert_models["tasks"]["alpha"], "b" * 40)
    _cache_repo(cache, "acme/tiny-bert-alpha", bert_models["tasks"]["beta"], "c" * 40, branch="v2")
    return cache


def test_hub_ids_with_revisions_from_the_cache(bert_models, hub_cache, tmp_path):
    url = str(tmp_path / "s")
    r = CliRunner().invoke(main, ["build", url, "--pretrained", "acme/tiny-bert",
                                  "--task", "alpha=acme/tiny-bert-alpha", "--keep", "1.0", "--value-dtype", "float32"])
    assert r.exit_code == 0, r.output
    modelstore.add_task(url, "beta", "acme/tiny-bert-alpha@v2", keep=1.0, value_dtype="float32")
    modelstore.add_task(url, "alpha-pinned", "acme/tiny-bert-alpha@" + "b" * 40, keep=1.0, value_dtype="float32")
    s = modelstore.open(url)
    for task, want in [("alpha", "alpha"), ("beta", "beta"), ("alpha-pinned", "alpha")]:
        got = s.load(task)
        for k, v in bert_models["sds"][want].items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_unknown_hub_ids_are_one_line_errors(bert_models, hub_cache, tmp_path):
    url = str(tmp_path / "s")
    modelstore.init(url, "acme/tiny-bert")
    for spec, what in [("acme/not-cached", "not in the local Hugging Face cache"),
                       ("acme/tiny-bert-alpha@v9", "v9")]:
        r = CliRunner().invoke(main, ["add-task", url, "x", spec])
        assert r.exit_code == 1 and what in r.output and r.output.count("\n") == 1, r.output


def test_a_mistyped_local_path_is_named_as_one(bert_models, hub_cache, tmp_path, monkeypatch):
    """`ft/rte` is shaped like a Hub id: when `ft/` exists it is a mistyped path, else both readings fail."""
    url = str(tmp_path / "s")
    modelstore.init(url, "acme/tiny-bert")
    (tmp_path / "ft").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec, want in [("ft/rte", "no such file or directory: ft/rte (ft/ exists; as a Hub id: not in the local"),
                       ("nodir/rte", "nodir/rte: no such file or directory, and as a Hub id: not in the local"),
                       ("./ft/rte", "no such file"), ("ft/rte/x", "no such file")]:
        r = CliRunner().invoke(main, ["add-task", url, "x", spec])
        assert r.exit_code == 1 and want in r.output and r.output.count("\n") == 1, (spec, r.output)
