"""tools.bench_switch runs (a tiny model) and reports every figure of its table."""

from __future__ import annotations

import argparse

from tools.bench_switch import run


def test_bench_switch_smoke(tmp_path):
    r = run(str(tmp_path), argparse.Namespace(layers=1, dim=16, vocab=40, keep=[0.05, 0.5], repeat=1))
    assert [row["keep"] for row in r["rows"]] == [0.05, 0.5]
    for row in r["rows"]:
        assert row["k"] > 0 and all(row[f] > 0 for f in ("switch_s", "floor_s", "load_state_dict_s", "load_into_s",
                                                         "resident_switch_s"))
    assert r["lora_restore"]["entries"] == 16 * 48 + 16 * 16
