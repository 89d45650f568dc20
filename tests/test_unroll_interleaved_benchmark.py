"""benchmarks/unroll_interleaved.py runs end to end on the 4M config (its 124M numbers are in docs/benchmarks.md)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_interleaved_benchmark_takes_one_meta_step_per_cycle(tmp_path):
    out = tmp_path / "u3.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "unroll_interleaved.py"),
        "--size",
        "4m",
        "--unroll",
        "3",
        "--rounds",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rounds = result["rounds"]
    assert [r["warmup"] for r in rounds] == [True, False, False]
    # every cycle of 3 lower steps took exactly one meta step (inside its 3rd step)
    assert [r["meta_steps_so_far"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert len(r["plain_s"]) == len(r["scalemlo_s"]) == 3 and all(t > 0 for t in r["plain_s"] + r["scalemlo_s"])
        # each round's ratio is its recorded cycle time over its recorded plain time
        assert r["ratio"] == pytest.approx(sum(r["scalemlo_s"]) / sum(r["plain_s"]), rel=1e-12)
    # the summary is over the counted (non-warm-up) rounds, and the printed line says the same numbers
    counted = [r["ratio"] for r in rounds if not r["warmup"]]
    summary = result["summary"]
    assert summary == pytest.approx(
        {"median_ratio": statistics.median(counted), "min": min(counted), "max": max(counted)}
    )
    low, high = summary["min"], summary["max"]
    line = f"time / plain at unroll_steps 3: {summary['median_ratio']:.3f} [{low:.3f}-{high:.3f}] over 2 rounds"
    assert line in proc.stdout
