"""benchmarks/trainer_overhead.py runs end to end on a tiny GPT-2 (its 124M numbers are in docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_overhead_benchmark_measures_three_rows(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "trainer_overhead.py"),
        "--size",
        "tiny",
        "--steps",
        "12",
        "--skip",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "unroll_steps=1", "unroll_steps=10"]
    # the reweighting rows took their meta steps at the schedule, on the shared forward (the Trainer's
    # default): the one due after step t inside step t + 1, so 11 (due after steps 1-12, the last one
    # never taken) and 1 (due after step 10, taken in step 11)
    assert [r["meta_steps"] for r in rows.values()] == [0, 11, 1]
    plain = rows["plain"]
    for r in rows.values():
        assert r["seconds_per_step"] > 0 and r["peak_rss_mib"] > 0 and len(r["step_seconds"]) == 12
        # every figure is the one recomputed from the recorded times and memory (skip 2: steps 3-12 timed)
        assert r["seconds_per_step"] == pytest.approx(sum(r["step_seconds"][2:]) / 10, rel=1e-9)
        assert r["time_ratio"] == pytest.approx(r["seconds_per_step"] / plain["seconds_per_step"], rel=1e-12)
        assert r["peak_rss_mib"] == pytest.approx(r["peak_rss_kib"] / 1024, rel=1e-12)
        assert r["peak_rss_ratio"] == pytest.approx(r["peak_rss_kib"] / plain["peak_rss_kib"], rel=1e-12)
        printed = f"{r['row']:<16} {r['seconds_per_step']:>8.3f} {r['time_ratio']:>8.2f}"
        assert printed in proc.stdout, f"the table does not print {printed!r}"
    assert plain["time_ratio"] == 1.0
    # the targets' verdicts follow from the unroll_steps=10 row's ratios and the stated limits
    record, row = result["targets"], rows["unroll_steps=10"]
    assert record["time_pass"] == (row["time_ratio"] <= record["time_max_ratio"])
    assert record["peak_rss_pass"] == (row["peak_rss_ratio"] <= record["peak_memory_max_ratio"])
    assert f"time {row['time_ratio']:.2f}x: {'PASS' if record['time_pass'] else 'FAIL'}" in proc.stdout
