"""A failing rank ends a 2-rank launch, and non-finite values are handled alike on every rank.

Two launches of tests/distributed/failing_rank.py (``deepspeed --num_gpus 2``):
one where rank 1 raises in its training_step (the launch must end within 60 s
of the error, with the error in its output, instead of rank 0 waiting in a
collective), and one where rank 1 alone sees a NaN loss or gradient (and, in an fp16 program, an overflow
inside a hypergradient).
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from scalemlo.testing import deepspeed_command

SCRIPT = Path(__file__).parent / "distributed" / "failing_rank.py"


def launch(*args, timeout=600):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = deepspeed_command(SCRIPT, *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time()


def test_a_rank_that_raises_ends_the_launch_within_60_s():
    proc, ended = launch("--case", "raise")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "RuntimeError: the original error, raised on rank 1 in training_step" in output
    raised = float(re.search(r"rank 1 raises at (\d+\.\d+)", output).group(1))
    assert ended - raised < 60, f"the launch took {ended - raised:.1f} s to end after the error"


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite") / "records.json"
    proc, _ = launch("--case", "nonfinite", "--out", str(out))
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    return list(zip(rank0, rank1))


@pytest.mark.parametrize("kind", ["torch", "ds0", "ds3"])
def test_an_fp16_overflow_on_one_rank_skips_the_upper_step_on_every_rank(nonfinite, kind):
    """torch: the torch backend's scaler; ds0/ds3: DeepSpeed's own fp16 engine at ZeRO 0/3."""
    ((a, b),) = [pair for pair in nonfinite if pair[0]["stage"] == f"fp16-{kind}"]
    assert a["finite"] and b["finite"] and a["same_on_every_rank"]
    assert a["outcome"] == b["outcome"] == "finished" and a["global_step"] == 4
    # the weight net skipped one step on both ranks; the model's scale dropped once for it and once per
    # overflow of its own steps (one, measured, at the torch backend's default scale 2^16)
    overflows, skipped, scale = a["skipped"]
    assert a["skipped"] == b["skipped"] and skipped == 1 and scale == a["initial_scale"] / 2 ** (1 + overflows), (a, b)


def test_a_nan_on_one_rank_stops_or_skips_every_rank_alike(nonfinite):
    nonfinite = [pair for pair in nonfinite if not str(pair[0]["stage"]).startswith("fp16")]
    assert len(nonfinite) == 8  # ZeRO 0 and 3 x a NaN loss or gradient x raise or skip
    for a, b in nonfinite:
        case = f"ZeRO-{a['stage']} {a['fault']} {a['nonfinite']}"
        assert a["finite"] and b["finite"], f"{case}: a non-finite value reached a parameter or optimizer state"
        assert (a["outcome"], a["global_step"], a["skipped"]) == (b["outcome"], b["global_step"], b["skipped"]), case
        if a["nonfinite"] == "raise":
            assert a["outcome"] == "FloatingPointError" and a["global_step"] == 3, case
            words = "its loss is" if a["fault"] == "loss" else "non-finite gradients in its step 3"
            assert words in a["message"] and words in b["message"], case
        else:
            assert a["outcome"] == "finished" and a["global_step"] == 5, case
            assert a["skipped"][:2] == ([1, 1] if a["fault"] == "loss" else [0, 1]), case
        if a["stage"] == 0:
            assert a["same_on_every_rank"], case
