"""Every file of a small store damaged in turn (a flipped byte, truncated, deleted, two chunks swapped):
loading then raises a one-line ModelStoreError that names the store, or returns exactly the weights of
the intact store, never other weights and never a raw exception from zarr, json or numcodecs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DAMAGE, flip_byte
from safetensors.torch import save_file

import modelstore
from modelstore.format.paths import is_payload_dir

V1 = Path(__file__).parents[1] / "data" / "v1" / "store"


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


@pytest.fixture(scope="module")
def seeded_dare(bert_models, tmp_path_factory):
    """A store of DARE tasks with seeded positions (no `indices`: int4 and float16 values)."""
    url = str(tmp_path_factory.mktemp("seeded") / "s")
    tasks = bert_models["tasks"]
    s = modelstore.build(url, bert_models["pre"], {"q4": tasks["alpha"]}, merge="none", keep=0.1, value_dtype="int4",
                         kind_options={"sparsify": "dare", "seed": 3, "positions": "seeded", "group_size": 16})
    s.add_task("f16", tasks["beta"], sparsify="dare", keep=0.05, positions="seeded", value_dtype="float16")
    return url, _snapshot(url)


def test_every_file_damaged_in_turn(pristine, tmp_path):
    _damage_each_file(*pristine, tmp_path)


def test_every_file_of_a_raw_base_store_damaged_in_turn(raw_base, tmp_path):
    _damage_each_file(*raw_base, tmp_path)


def test_every_file_of_a_seeded_dare_store_damaged_in_turn(seeded_dare, tmp_path):
    """Every damage of a seeded task's payload (its table, values and scales) is caught: nothing in it is
    redundant, and a store this small has few other files (locks, group metadata, a config load does not read)."""
    outcomes = _damage_each_file(*seeded_dare, tmp_path, caught=False)
    parts = {rel: rel.split("/") for rel in outcomes}
    payload = {rel for rel, p in parts.items() if len(p) > 3 and p[0] == "tasks" and is_payload_dir(p[2])
               and p[3] != "files"}
    assert len(payload) == 8  # q4: table, values and scales (metadata, chunk); f16: table, values
    assert all(set(outcomes[rel]) == {"error"} for rel in payload), outcomes


def _damage_each_file(url0: str, want: dict, tmp_path: Path, caught: bool = True) -> dict[str, list[str]]:
    """Each file's verdicts, one per damage; with `caught`, nearly every damage must be caught."""
    outcomes: dict[str, list[str]] = {}
    for rel in _files(url0):
        for how, damage in DAMAGE.items():
            url = str(tmp_path / f"case-{sum(map(len, outcomes.values()))}")
            shutil.copytree(url0, url)
            damage(os.path.join(url, rel))
            verdict = _judge(url, want, f"{how} {rel}")
            outcomes.setdefault(rel, []).append(verdict)
            if verdict == "error" and rel != "manifest.json":  # check finds what load found
                report = modelstore.open(url).check()
                assert not report.ok and report.damaged, f"{how} {rel}: check found nothing"
            shutil.rmtree(url)
    errors = sum(verdicts.count("error") for verdicts in outcomes.values())
    assert not caught or errors > 2 * len(outcomes)  # nearly every damage is caught, not served
    return outcomes


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
    flip_byte(os.path.join(url, entry["path"], "values", "c", "0"))
    r = CliRunner().invoke(main, ["check", url])
    assert r.exit_code == 3 and "DAMAGED  task 'b'" in r.output and "ok       task 'a'" in r.output


def test_sync_refuses_a_damaged_source_and_repairs_a_damaged_destination(pristine, tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    shutil.copytree(pristine[0], src)
    modelstore.sync(src, dst)
    b = modelstore.open(dst).entry("b")
    flip_byte(os.path.join(dst, b["path"], "values", "c", "0"))
    report = modelstore.sync(src, dst)
    assert report.repaired == ["b"] and report.copied == ["b"] and sorted(report.up_to_date) == ["a", "bf", "l"]
    assert _equal(_snapshot(dst), pristine[1])
    a = modelstore.open(src).entry("a")
    flip_byte(os.path.join(src, a["path"], "values", "c", "0"))
    fresh = str(tmp_path / "fresh")
    with pytest.raises(modelstore.CorruptStoreError, match=f"{src}.*task 'a'"):
        modelstore.sync(src, fresh)
    assert "a" not in modelstore.open(fresh).tasks()


# ---- tables re-sealed with valid digests: load and check refuse alike, in one line -------------

def _reseal(url: str, owner: str, table: list) -> None:
    """Write `table` as the payload's table with a valid digest, the manifest re-sealed over it
    (what a faulty writer could publish; every checksum holds)."""
    import json

    from modelstore.format.manifest import seal, table_digest
    m = json.load(open(os.path.join(url, "manifest.json")))
    kind, name = owner.split(":")
    entry = m[kind][name]
    meta = os.path.join(url, entry["path"], "zarr.json")
    group = json.load(open(meta))
    group["attributes"]["tensors"] = table
    json.dump(group, open(meta, "w"))
    entry["table_sha256"], entry["tensors"] = table_digest(table), len(table)
    open(os.path.join(url, "manifest.json"), "wb").write(seal(m))


def _edits(table: list, rng, ordered: bool) -> dict[str, list | None]:
    """Named edits of a table (None where one does not apply). "reversed", "shifted", "count" and
    "names swapped" must be refused: the last swaps two entries of a task that read its base (a
    tensor stored whole may take any name and shape) and differ in shape, or that the base is
    read for in table order (`ordered`)."""
    import copy
    t = copy.deepcopy(table)
    full = [i for i, e in enumerate(t) if e["count"]]
    out: dict[str, list | None] = {}
    out["reversed"] = t[::-1] if len(full) > 1 else None
    if full:
        i = int(rng.choice(full))
        for name, field, by in (("shifted", "start", int(rng.choice([-1, 1, 3]))),
                                ("count", "count", int(rng.choice([-1, 1])))):
            e = copy.deepcopy(t)
            e[i][field] += by
            out[name] = e if e[i][field] >= 0 else None
    if len(full) > 1:
        i, j = (int(x) for x in rng.choice(full, 2, replace=False))
        e = copy.deepcopy(t)
        e[i]["name"], e[j]["name"] = e[j]["name"], e[i]["name"]
        detectable = "dense" not in (t[i]["kind"], t[j]["kind"]) and (t[i]["shape"] != t[j]["shape"] or ordered)
        out["names swapped" if detectable else "names swapped alike"] = e
        e = copy.deepcopy(t)
        e[i]["shape"], e[j]["shape"] = e[j]["shape"], e[i]["shape"]
        out["shapes swapped"] = e
        e = copy.deepcopy(t)
        e.insert(j, e.pop(i))
        out["moved"] = e
    i = int(rng.integers(len(t)))
    for name, change in (("duplicated", lambda e: e.append(dict(e[i]))),
                         ("dropped", lambda e: e.pop(i)),
                         ("dtype",
                          lambda e: e[i].update(dtype=str(rng.choice(["float16", "bfloat16", "float32", "int64"])))),
                         ("kind", lambda e: e[i].update(kind=str(rng.choice(["dense", "sparse", "lowrank", "bits"])))),
                         ("base", lambda e: e[i].update(base=t[int(rng.integers(len(t)))]["name"])),
                         ("transposed", lambda e: e[i].update(shape=e[i]["shape"][::-1])),
                         ("rank", lambda e: e[i].update(rank=e[i].get("rank", 0) + 1)),
                         ("layout", lambda e: e[i].update(layout="embedding")),
                         ("segments", lambda e: e[i].update(
                             segments={k: [s, c + 1] for k, (s, c) in e[i].get("segments", {}).items()})),
                         ("scale", lambda e: e[i].update(scale="x")),
                         ("seed", lambda e: e[i].update(seed=e[i]["seed"] + 1) if e[i].get("count") and "seed" in e[i]
                          else None),
                         ("count 0 start",
                          lambda e: e[i].update(start=e[i]["start"] + 10 ** 6) if not e[i]["count"] else None)):
        e = copy.deepcopy(t)
        change(e)
        out[name] = None if e == t else e
    return out


def _outcome(url: str, task: str) -> str:
    """"loads" or the one-line CorruptStoreError of `load`; fails on any other exception."""
    try:
        modelstore.open(url).load(task)
    except modelstore.CorruptStoreError as err:
        assert "\n" not in str(err) and url in str(err), str(err)
        return "refused"
    except Exception as err:  # noqa: BLE001 - the point of the test
        pytest.fail(f"raw {type(err).__name__}: {str(err)[:300]}")
    return "loads"


@pytest.fixture(scope="module")
def every_kind(bert_models, tmp_path_factory):
    """A store with fft (float16, int4, DARE int4 with seeded positions), tall-mask, bitdelta and LoRA tasks
    on a merged base and θ0."""
    from conftest import MAGNITUDE, peft_adapter
    root = tmp_path_factory.mktemp("kinds")
    url, tasks = str(root / "s"), bert_models["tasks"]
    s = modelstore.build(url, bert_models["pre"], {"alpha": tasks["alpha"]}, keep=0.1, kind_options=MAGNITUDE)
    s.add_task("q4", tasks["beta"], value_dtype="int4", group_size=8)
    s.add_task("sd", tasks["beta"], sparsify="dare", keep=0.05, value_dtype="int4", group_size=8, positions="seeded")
    s.add_task("tall", tasks["gamma"], kind="tall-mask", pretrained=bert_models["pre"])
    s.add_task("bd", tasks["gamma"], kind="bitdelta")
    s.add_lora_task("lora", peft_adapter(bert_models, root / "adapter"), rank=4)
    return url


def test_resealed_tables_are_refused_by_load_and_check_alike(every_kind, tmp_path):
    import json

    import numpy as np
    rng = np.random.default_rng(0)
    count0 = str(tmp_path / "count0")
    shutil.copytree(Path(__file__).parents[1] / "data" / "v2-count0" / "store", count0)
    verdicts: dict[str, set[str]] = {}
    for src in (every_kind, count0):
        m = json.load(open(os.path.join(src, "manifest.json")))
        owners = [f"tasks:{t}" for t in m["tasks"]] + [f"bases:{b}" for b in m["bases"]]
        for owner in owners:
            task = owner.split(":")[1]
            payload = os.path.join(src, m[owner.split(":")[0]][owner.split(":")[1]]["path"])
            table = json.load(open(os.path.join(payload, "zarr.json")))["attributes"]["tensors"]
            for _ in range(2 if src == every_kind else 4):
                ordered = owner.startswith("tasks") and m["tasks"][task]["kind"] != "lora"
                for edit, new in _edits(table, rng, ordered).items():
                    if new is None:
                        continue
                    url = str(tmp_path / "case")
                    shutil.copytree(src, url)
                    _reseal(url, owner, new)
                    loads = {t: _outcome(url, t) for t in m["tasks"]}
                    verdict = loads.get(task, "refused" if "refused" in loads.values() else "loads")
                    report = modelstore.open(url).check()
                    assert report.ok == (set(loads.values()) == {"loads"}), f"{owner} {edit}: {loads}, {report.damaged}"
                    for t, v in loads.items():  # check's verdict on each task is its load's
                        assert (f"task {t!r}" in report.damaged) == (v == "refused"), f"{owner} {edit}: {t} {v}"
                    verdicts.setdefault(edit, set()).add(verdict)
                    if edit in ("reversed", "shifted", "count", "names swapped"):
                        assert verdict == "refused", f"{owner} {edit} loaded"
                    shutil.rmtree(url)
    assert verdicts["count 0 start"] == {"loads"}  # an empty slice's start is not used
    assert {"refused"} <= verdicts["kind"] and len(verdicts) >= 15


def test_resealed_manifest_params_are_refused_by_load_and_check_alike(every_kind, tmp_path):
    """Task fields a reader acts on, changed and re-sealed: refused in one line, or read, alike."""
    import json

    from modelstore.format.manifest import seal
    edits = {"alpha": [("index_dtype", "uint64"), ("value_dtype", "bfloat16"), ("value_dtype", "int8")],
             "q4": [("group_size", 16), ("value_dtype", "int8"), ("index_dtype", "uint64")],
             "sd": [("keep", 0.1), ("positions", "stored"), ("sparsify", "magnitude"), ("group_size", 16)],
             "tall": [("base", "pretrained"), ("bases", ["merged"])],
             "bd": [("kind", "tall-mask"), ("kind", "fft")],
             "lora": [("kind", "bitdelta"), ("factor_dtype", "float16")]}
    refused = 0
    for task, changes in edits.items():
        for field, value in changes:
            url = str(tmp_path / "case")
            shutil.copytree(every_kind, url)
            m = json.load(open(os.path.join(url, "manifest.json")))
            entry = m["tasks"][task]
            (entry if field in ("base", "bases", "kind") else entry["params"])[field] = value
            open(os.path.join(url, "manifest.json"), "wb").write(seal(m))
            verdict = _outcome(url, task)
            try:
                damaged = f"task {task!r}" in modelstore.open(url).check().damaged
            except modelstore.CorruptStoreError:  # the manifest itself is refused: no check to run
                damaged = True
            assert damaged == (verdict == "refused"), f"{task} {field}={value}"
            refused += verdict == "refused"
            shutil.rmtree(url)
    assert refused == sum(map(len, edits.values()))
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
