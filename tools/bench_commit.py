"""Benchmark: what the many-writer commit protocol costs against the single-writer commit it replaced.

For a local directory and for moto's S3 server on 127.0.0.1 (started here), with a manifest of
`--tasks` entries, each of `--commits` commits adds one task entry:

- single writer (the old commit): read the manifest, change it, write it (atomic rename / one PUT);
- protocol: `modelstore.storage.commits.commit`: read with a version token, change, seal (generation,
  writer, checksum), conditional publish (flock + rename / If-Match PUT).

Then `--writers` threads commit at once through the protocol (none is lost; conflicts are retried).
Prints each time beside its baseline from the same run, as ratios.

    python -m tools.bench_commit --commits 50 --tasks 100
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from modelstore.format.manifest import new_manifest, seal
from modelstore.storage import Location
from modelstore.storage.commits import commit

ENTRY: dict[str, Any] = {
    "path": "tasks/t/0123456789abcdef", "kind": "fft", "base": "pretrained", "method": "post-pruning",
    "params": {"keep": 0.1, "granularity": "global", "value_dtype": "float16", "index_dtype": "uint32",
               "merge": {"method": "none"}},
    "source": {"path": "/x", "fingerprint": "sha256:" + "0" * 64}, "kept": 1, "total": 10, "tensors": 1,
    "dense_tensors": 0, "bytes": 1, "full_bytes": 40, "table_sha256": "sha256:" + "0" * 64,
    "arrays": {"indices": {"count": 1, "crc32": 0}, "values": {"count": 1, "crc32": 0}},
}
BASE = {**ENTRY, "path": "bases/pretrained/0123456789abcdef", "kind": "pretrained"}


def _entry(name: str) -> dict[str, Any]:
    return {**copy.deepcopy(ENTRY), "path": f"tasks/{name}/0123456789abcdef"}


def _fresh(loc: Location, tasks: int) -> None:
    m = new_manifest()
    m["bases"]["pretrained"] = copy.deepcopy(BASE)
    for i in range(tasks):
        m["tasks"][f"t{i}"] = _entry(f"t{i}")
    _plain_write(loc, seal(m))


def _plain_write(loc: Location, blob: bytes) -> None:
    """The single-writer commit: an atomic replace with no condition."""
    path = loc.path("manifest.json")
    if loc.local:
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    else:
        loc.fs.pipe_file(path, blob)


def _single_writer(loc: Location, name: str) -> None:
    m = json.loads(loc.fs.cat_file(loc.path("manifest.json")))
    m["tasks"][name] = _entry(name)
    _plain_write(loc, json.dumps(m, indent=1, sort_keys=True).encode())


def _protocol(loc: Location, name: str) -> None:
    def add(m: dict) -> dict:
        m["tasks"][name] = _entry(name)
        return m
    commit(loc, add)  # type: ignore[arg-type]


def _timed(fn: Callable[[Location, str], None], loc: Location, n: int, tag: str) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(loc, f"{tag}{i}")
    return (time.perf_counter() - t) / n


def _contended(loc: Location, writers: int, each: int) -> tuple[float, int]:
    def run(w: int) -> None:
        for i in range(each):
            _protocol(loc, f"w{w}x{i}")
    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    return elapsed / (writers * each), len(loc.require_manifest()["tasks"])


def bench(name: str, url: str, options: dict | None, a: argparse.Namespace) -> dict[str, Any]:
    loc = Location(url, options, read_only=False)
    _fresh(loc, a.tasks)
    single = _timed(_single_writer, loc, a.commits, "s")
    _fresh(loc, a.tasks)
    protocol = _timed(_protocol, loc, a.commits, "p")
    _fresh(loc, a.tasks)
    contended, count = _contended(loc, a.writers, a.commits // a.writers or 1)
    expected = a.tasks + a.writers * (a.commits // a.writers or 1)
    return {"location": name, "single_writer_ms": 1e3 * single, "protocol_ms": 1e3 * protocol,
            "protocol_vs_single": protocol / single, "contended_ms_per_commit": 1e3 * contended,
            "contended_vs_single": contended / single, "tasks_after_contention": count,
            "tasks_expected": expected}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commits", type=int, default=40, help="commits timed per variant")
    p.add_argument("--tasks", type=int, default=100, help="task entries already in the manifest")
    p.add_argument("--writers", type=int, default=4, help="threads committing at once in the contended run")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        rows.append(bench("local", os.path.join(d, "store"), None, a))
    try:
        import moto  # noqa: F401
        import s3fs  # noqa: F401
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from conftest import start_moto
    except ImportError:
        print("moto is not installed: S3 skipped (pip install 'moto[server]' s3fs)", file=sys.stderr)
    else:
        server, opts = start_moto(bucket="bench")
        try:
            rows.append(bench("s3 (moto, 127.0.0.1)", "s3://bench/store", opts, a))
        finally:
            server.stop()
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{a.commits} commits of one task entry into a manifest of {a.tasks} tasks; {a.writers} writers contended")
    print(f"{'location':22} {'single ms':>10} {'protocol ms':>12} {'ratio':>6} {'contended ms':>13} {'ratio':>6} "
          f"{'tasks':>11}")
    for r in rows:
        print(f"{r['location']:22} {r['single_writer_ms']:10.2f} {r['protocol_ms']:12.2f} "
              f"{r['protocol_vs_single']:6.2f} {r['contended_ms_per_commit']:13.2f} {r['contended_vs_single']:6.2f} "
              f"{r['tasks_after_contention']:>5}/{r['tasks_expected']:<5}")


if __name__ == "__main__":
    main()
