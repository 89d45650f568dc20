"""A ReweightingTrainer script needs no set-up call: ``--deepspeed`` alone, with no launcher.

``tests/hf_plain_script.py`` does what a plain Trainer script does (parse ``ReweightingArguments``, build a
model and data, train) and nothing else; it runs in a fresh process with no launcher variables in its
environment, with the shipped ZeRO-0 and ZeRO-3 Trainer configs. Without the process group that
``ReweightingArguments`` starts, accelerate looks for one through MPI and fails (``No module named
'mpi4py'``). The same script under ``deepspeed``/``torchrun`` is not launched here (a launch costs ~30 s);
``tests/resume/trainer_program.py``, which has no set-up call either, runs under the ``deepspeed`` launcher on
2 ranks at ZeRO-3 in ``tests/test_kill_and_resume.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("stage", [0, 3])
def test_a_script_with_deepspeed_runs_without_a_launcher_or_a_set_up_call(tmp_path, stage):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["DS_ACCELERATOR"] = "cpu"
    config = ROOT / "configs" / "ds" / f"trainer_zero{stage}.json"
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "hf_plain_script.py"),
        "--output_dir",
        str(tmp_path),
        "--deepspeed",
        str(config),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained 2 steps on 1 ranks" in proc.stdout
