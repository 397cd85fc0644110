"""tools.bench_commit runs, and its contended run loses no commit (a small local run)."""

from __future__ import annotations

import argparse

from tools.bench_commit import bench


def test_bench_commit_local_smoke(tmp_path):
    r = bench("local", str(tmp_path / "s"), None, argparse.Namespace(commits=6, tasks=5, writers=3))
    assert r["tasks_after_contention"] == r["tasks_expected"] == 11
    assert r["single_writer_ms"] > 0 and r["protocol_vs_single"] > 0
