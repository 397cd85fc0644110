"""Every file of a small store damaged in turn (a flipped byte, truncated, deleted, two chunks swapped):
loading then raises a one-line ModelStoreError that names the store, or returns exactly the weights of
the intact store, never other weights and never a raw exception from zarr, json or numcodecs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import modelstore
from modelstore.format.paths import is_payload_dir

V1 = Path(__file__).parent / "data" / "v1" / "store"


def _snapshot(url: str) -> dict:
    s = modelstore.open(url)
    out = {t: s.load(t) for t in s.tasks()}
    if "l" in out:
        a = s.load("l", merged=False)
        out["l:factors"] = {f"{k}.{x}": getattr(low, x) for k, low in a.updates.items() for x in "USV"}
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[t].keys() == b[t].keys() and all(torch.equal(a[t][k], b[t][k]) for k in a[t]) for t in a)


@pytest.fixture(scope="module", params=["v1", "sealed"])
def pristine(request, tmp_path_factory):
    """The committed version-1 store, and the same store synced anew (a checksummed manifest)."""
    root = tmp_path_factory.mktemp("pristine")
    if request.param == "v1":
        url = str(root / "store")
        shutil.copytree(V1, url)
    else:
        url = str(root / "sealed")
        modelstore.sync(str(V1), url)
        assert "checksum" in modelstore.open(url).manifest
    return url, _snapshot(url)


def _files(url: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), url) for d, _, fs in os.walk(url) for f in fs)


def _flip(path: str) -> None:
    blob = bytearray(open(path, "rb").read())
    if blob:
        blob[len(blob) // 2] ^= 0x01
        open(path, "wb").write(bytes(blob))


def _truncate(path: str) -> None:
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])


DAMAGE = {"flip": _flip, "truncate": _truncate, "delete": os.remove}


def _judge(url: str, want: dict, case: str) -> str:
    """"error" or "intact"; fails the test on other weights or on an exception that is not ours."""
    try:
        got = _snapshot(url)
    except modelstore.ModelStoreError as e:
        msg = str(e)
        assert "\n" not in msg and url in msg, f"{case}: {msg!r}"
        return "error"
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{case}: raw {type(e).__name__}: {str(e)[:300]}")
    assert _equal(got, want), f"{case}: other weights were served"
    return "intact"


@pytest.fixture(scope="module")
def raw_base(tmp_path_factory):
    """A store whose base is written uncompressed (chunks read straight into the load's output)."""
    root = tmp_path_factory.mktemp("raw")
    url = str(root / "raw")
    g = torch.Generator().manual_seed(0)
    # 3 chunks of bf16 base and a short float32 array: whole-chunk, partial and tail reads
    pre = {"w": torch.randn(3 << 20, 2, generator=g).bfloat16(), "b": torch.randn(40, generator=g)}
    save_file(pre, str(root / "pre.safetensors"))
    for t in ("a", "c"):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in pre.items()},
                  str(root / f"{t}.safetensors"))
    modelstore.build(url, str(root / "pre.safetensors"), {t: str(root / f"{t}.safetensors") for t in "ac"},
                     keep=0.001, base_codec="none")
    return url, _snapshot(url)


def test_every_file_damaged_in_turn(pristine, tmp_path):
    _damage_each_file(*pristine, tmp_path)


def test_every_file_of_a_raw_base_store_damaged_in_turn(raw_base, tmp_path):
    _damage_each_file(*raw_base, tmp_path)


def _damage_each_file(url0: str, want: dict, tmp_path: Path) -> None:
    outcomes: dict[str, int] = {}
    for rel in _files(url0):
        for how, damage in DAMAGE.items():
            url = str(tmp_path / f"case-{len(outcomes)}-{sum(outcomes.values())}")
            shutil.copytree(url0, url)
            damage(os.path.join(url, rel))
            verdict = _judge(url, want, f"{how} {rel}")
            outcomes[verdict] = outcomes.get(verdict, 0) + 1
            if verdict == "error" and rel != "manifest.json":  # check finds what load found
                report = modelstore.open(url).check()
                assert not report.ok and report.damaged, f"{how} {rel}: check found nothing"
            shutil.rmtree(url)
    assert outcomes["error"] > 2 * len(_files(url0))  # nearly every damage is caught, not served


def test_swapped_chunks(pristine, tmp_path):
    url0, want = pristine
    chunks = [f for f in _files(url0) if "/c/" in f]
    pairs = [(a, b) for i, a in enumerate(chunks) for b in chunks[i + 1:]
             if open(os.path.join(url0, a), "rb").read() != open(os.path.join(url0, b), "rb").read()]
    assert len(pairs) > 10
    for a, b in pairs:
        url = str(tmp_path / "swap")
        shutil.copytree(url0, url)
        pa, pb = os.path.join(url, a), os.path.join(url, b)
        blob_a, blob_b = open(pa, "rb").read(), open(pb, "rb").read()
        open(pa, "wb").write(blob_b)
        open(pb, "wb").write(blob_a)
        assert _judge(url, want, f"swap {a} {b}") == "error"
        shutil.rmtree(url)


def test_tampered_value_dtype_is_refused(pristine, tmp_path):
    import json
    from modelstore.format.manifest import seal
    url = str(tmp_path / "t")
    shutil.copytree(pristine[0], url)
    path = os.path.join(url, "manifest.json")
    m = json.load(open(path))
    m["tasks"]["a"]["params"]["value_dtype"] = "cfloat16"
    json.dump(m, open(path, "w"))
    with pytest.raises(modelstore.CorruptStoreError) as e:
        _snapshot(url)
    assert ("checksum" in str(e.value)) == ("checksum" in m)
    open(path, "wb").write(seal(m))  # even a writer that sealed it cannot make the reader misread
    with pytest.raises(modelstore.CorruptStoreError, match="value dtype 'cfloat16'"):
        modelstore.open(url).load("a")


def test_check_cli_reports_damage(pristine, tmp_path):
    import json
    from click.testing import CliRunner
    from modelstore.cli import main
    url = str(tmp_path / "c")
    shutil.copytree(pristine[0], url)
    r = CliRunner().invoke(main, ["check", url, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"]
    entry = modelstore.open(url).entry("b")
    _flip(os.path.join(url, entry["path"], "values", "c", "0"))
    r = CliRunner().invoke(main, ["check", url])
    assert r.exit_code == 1 and "DAMAGED  task 'b'" in r.output and "ok       task 'a'" in r.output


def test_sync_refuses_a_damaged_source_and_repairs_a_damaged_destination(pristine, tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    shutil.copytree(pristine[0], src)
    modelstore.sync(src, dst)
    b = modelstore.open(dst).entry("b")
    _flip(os.path.join(dst, b["path"], "values", "c", "0"))
    report = modelstore.sync(src, dst)
    assert report.repaired == ["b"] and report.copied == ["b"] and sorted(report.up_to_date) == ["a", "bf", "l"]
    assert _equal(_snapshot(dst), pristine[1])
    a = modelstore.open(src).entry("a")
    _flip(os.path.join(src, a["path"], "values", "c", "0"))
    fresh = str(tmp_path / "fresh")
    with pytest.raises(modelstore.CorruptStoreError, match=f"{src}.*task 'a'"):
        modelstore.sync(src, fresh)
    assert "a" not in modelstore.open(fresh).tasks()


def test_every_file_and_directory_relinked_in_turn(pristine, tmp_path):
    """Each file and directory replaced by a symbolic link to an identical copy outside the store:
    `check` names the link every time; a load refuses it wherever it would read through it, and
    otherwise (group metadata above the payloads, which loads do not read) returns the intact
    weights."""
    url0, want = pristine
    dirs = sorted(os.path.relpath(os.path.join(d, n), url0) for d, ns, _ in os.walk(url0) for n in ns)
    for i, rel in enumerate(_files(url0) + dirs):
        url, outside = str(tmp_path / f"case-{i}"), str(tmp_path / f"outside-{i}")
        shutil.copytree(url0, url)
        path = os.path.join(url, rel)
        shutil.move(path, outside)
        os.symlink(outside, path)
        parts = rel.split("/")  # loads read the manifest, payloads and the directories on the way
        read = rel == "manifest.json" or rel in dirs or (len(parts) > 2 and is_payload_dir(parts[2]))
        assert _judge(url, want, f"link {rel}") == ("error" if read else "intact")
        if rel != "manifest.json":
            report = modelstore.open(url).check()
            assert any(f"{rel} is a symbolic link" in why for why in report.damaged.values()), rel
        shutil.rmtree(url)
