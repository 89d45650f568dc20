"""benchmarks/gpu_check.py (the prepared GPU check: bf16 MLO on one GPU) runs end to end on the CPU with tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    agreement = [r for r in rows if r["part"] == "agreement" and "cosine" in r]
    same_point = [r for r in agreement if r["steps_before"] == 0]
    # at the same point a bf16 level is evaluated in float32 at its masters: the float32 run's numbers
    # (fp16: the bf16-representable start loses bits where fp16 is subnormal, below 6e-5: 3e-4 measured)
    assert {r["precision"] for r in same_point} == {"bf16", "fp16"}
    assert all(r["cosine"] > 0.9999 and r["rel_err"] < (1e-6 if r["precision"] == "bf16" else 1e-3) for r in same_point)
    assert any(r["method"] == "cg" and r["cosine"] > 0.99 for r in agreement)
    fp16 = [r for r in agreement if r["precision"] == "fp16"]  # DeepSpeed's fp16 engine, let build on the CPU
    assert len(fp16) == 4 and all(r["cosine"] > 0.99 for r in fp16 if r["method"] != "sama"), fp16
    throughput = {r["row"]: r for r in rows if r["part"] == "throughput"}
    assert set(throughput) == {"plain", "mlo fd unroll 1", "mlo fd unroll 10", "mlo fd shared unroll 1"}
    assert all(r["tokens_per_s"] > 0 for r in throughput.values())
    assert [r["size"] for r in rows if r["part"] == "fit" and r["ok"]] == ["tiny", "4m"]
