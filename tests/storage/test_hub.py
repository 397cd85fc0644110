"""A store read through hf:// paths: olah, a read-only Hugging Face Hub mirror, serves a local git repo
holding the store over the Hub HTTP API on 127.0.0.1, and HfFileSystem reads it from there.

olah runs as a subprocess, from `$OLAH_CLI`, an `olah-cli` on PATH, or this interpreter's `olah` package;
the test is skipped when none is there, or when git is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import modelstore


def olah_command() -> list[str] | None:
    cli = os.environ.get("OLAH_CLI") or shutil.which("olah-cli")
    if cli:
        return [cli]
    if importlib.util.find_spec("olah") is not None:
        return [sys.executable, "-m", "olah.server"]
    return None


OLAH = olah_command()
pytestmark = [pytest.mark.skipif(OLAH is None, reason="olah (pip install olah) is not installed"),
              pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def stored(bert_models, tmp_path) -> str:
    """Tasks alpha and beta with float16 values. olah 0.5 takes a file of 121-149 bytes for a possible
    LFS pointer and decodes it as UTF-8: a binary one (a small int4 `scales` chunk) is answered 401."""
    url, tasks = str(tmp_path / "s"), bert_models["tasks"]
    modelstore.build(url, bert_models["pre"], {"alpha": tasks["alpha"], "beta": tasks["beta"]}, value_dtype="float16")
    return url


@pytest.fixture()
def hub(stored, tmp_path, monkeypatch):
    """`stored` committed to the git repo test/store, served by olah; yields HfFileSystem's storage options."""
    repo = tmp_path / "mirrors" / "models" / "test" / "store"
    shutil.copytree(stored, repo)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "store"]):
        subprocess.run(git + args, check=True, timeout=60)
    port = free_port()
    (tmp_path / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp_path / "cache"}"\n'
        f'mirrors-path = ["{tmp_path / "mirrors"}"]\n[accessibility]\noffline = true\n')
    log = open(tmp_path / "olah.out", "wb")
    proc = subprocess.Popen(OLAH + ["-c", str(tmp_path / "olah.toml"), "--log-path", str(tmp_path / "logs")],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/api/models/test/store/revision/main", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("olah did not start:\n" + (tmp_path / "olah.out").read_text())
                time.sleep(0.2)
        # conftest sets HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every request
        import huggingface_hub.constants
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield {"endpoint": endpoint, "token": False}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def assert_same_store(a: modelstore.Store, b: modelstore.Store) -> None:
    assert a.tasks() == b.tasks() == ["alpha", "beta"]
    for task in b.tasks():
        got, want = a.load(task), b.load(task)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), task


def test_open_and_load_through_hf(hub, stored):
    assert_same_store(modelstore.open("hf://test/store@main", storage_options=hub), modelstore.open(stored))


def test_sync_from_hf(hub, stored, tmp_path):
    report = modelstore.sync("hf://test/store@main", str(tmp_path / "copy"), src_options=hub)
    assert sorted(report.copied) == ["alpha", "beta"]
    assert_same_store(modelstore.open(str(tmp_path / "copy")), modelstore.open(stored))
    again = modelstore.sync("hf://test/store@main", str(tmp_path / "copy"), src_options=hub)
    assert again.copied == [] and sorted(again.up_to_date) == ["alpha", "beta"]
