"""Kill a checkpointing run with SIGKILL at a random iteration, resume, compare bit for bit: one trial
of every configuration of benchmarks/kill_and_resume.py (which runs 10 each and reports the table).

One process at ZeRO-0 (finite_difference, sama, penalty) and two ranks (ZeRO-3 finite_difference and
penalty; sama, which ZeRO 1-3 cannot serve, at ZeRO-0), unroll_steps 3, dropout on, a DataLoader with
a seeded sampler (one process) or a DistributedSampler (two ranks) and a plain list.
"""

import importlib.util
import zlib
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_and_resume.py"
spec = importlib.util.spec_from_file_location("kill_and_resume", PATH)
kill_and_resume = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kill_and_resume)


@pytest.mark.parametrize("config", list(kill_and_resume.CONFIGS))
def test_a_killed_run_resumes_bit_identically(config):
    (row,) = kill_and_resume.measure([config], trials=1, seed=zlib.crc32(config.encode()))
    assert row["killed"], row  # the kill landed before the run ended
    assert row["exact"], row
