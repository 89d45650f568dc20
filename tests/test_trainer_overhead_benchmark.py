"""benchmarks/trainer_overhead.py runs end to end on a tiny GPT-2 (its 124M numbers are in docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_overhead_benchmark_measures_three_rows(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trainer_overhead.py"), "--size", "tiny", "--steps", "12",
           "--skip", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "unroll_steps=1", "unroll_steps=10"]
    # the reweighting rows took their meta steps at the schedule, on the shared forward (the Trainer's
    # default): the one due after step t inside step t + 1, so 11 (due after steps 1-12, the last one
    # never taken) and 1 (due after step 10, taken in step 11)
    assert [r["meta_steps"] for r in rows.values()] == [0, 11, 1]
    for r in rows.values():
        assert r["seconds_per_step"] > 0 and r["peak_rss_mib"] > 0 and len(r["step_seconds"]) == 12
    assert rows["plain"]["time_ratio"] == 1.0 and "targets" in result
    assert "Targets (issue) at unroll_steps=10" in proc.stdout
