"""Kill a checkpointing MLO run with SIGKILL at a random iteration, resume it, and compare bit for bit.

    python benchmarks/kill_and_resume.py                 # 10 trials of every configuration (~40 min)
    python benchmarks/kill_and_resume.py --trials 1 --configs zero0-sama

For each configuration a program runs once uninterrupted: ``tests/resume/program.py``
(a ``scalemlo.Engine`` program: a tiny GPT-2 with dropout under a
Meta-Weight-Net, unroll_steps 3, checkpoints every 2 of 12 iterations, keeping
the last 2) or ``tests/resume/trainer_program.py`` (the same kind of model in
a ``ReweightingTrainer`` with per-source weights, checkpoints every 2 of 12
optimizer steps). Then, per trial,
it runs again and is killed (the launcher and every rank, SIGKILL) a random
time within the iteration after a random one (up to 1.5 median iteration
times of the uninterrupted run), sometimes in the middle of writing a
checkpoint; a third run resumes from the latest complete checkpoint
and finishes. A trial is exact when every level's parameter shards and
optimizer state on every rank are bit-identical (``torch.equal``) to the
uninterrupted run's. Prints a table and writes
``benchmarks/results/kill_and_resume.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scalemlo.testing import deepspeed_command

ROOT = Path(__file__).resolve().parents[1]
ENGINE_PROGRAM = ROOT / "tests" / "resume" / "program.py"
TRAINER_PROGRAM = ROOT / "tests" / "resume" / "trainer_program.py"
STEPS = 12

# name -> (ranks, lower ZeRO stage, method; None: the ReweightingTrainer program, finite_difference). sama needs
# per-parameter optimizer state, which ZeRO 1-3 keep in flat partitions (refused there), so its two-rank
# configuration is at ZeRO-0. "-fp16": the Trainer's model in DeepSpeed's fp16 engine (--fp16; let build on a
# CPU, scalemlo.testing.allow_deepspeed_fp16_on_cpu), its loss scale part of what must resume exactly.
CONFIGS = {
    "zero0-finite_difference": (1, 0, "finite_difference"),
    "zero0-sama": (1, 0, "sama"),
    "zero0-penalty": (1, 0, "penalty"),
    "zero3-2ranks-finite_difference": (2, 3, "finite_difference"),
    "zero0-2ranks-sama": (2, 0, "sama"),
    "zero3-2ranks-penalty": (2, 3, "penalty"),
    "trainer-zero0": (1, 0, None),
    "trainer-zero3-2ranks": (2, 3, None),
    "trainer-zero3-2ranks-fp16": (2, 3, None),
}


def command(config: str, checkpoint_dir: Path, out: Path, resume: bool) -> list[str]:
    ranks, stage, method = CONFIGS[config]
    if method is None:
        args = [str(TRAINER_PROGRAM), "--stage", str(stage), "--steps", str(STEPS), "--output_dir", str(checkpoint_dir)]
        args += ["--fp16"] if config.endswith("-fp16") else []
    else:
        args = [
            str(ENGINE_PROGRAM),
            "--method",
            method,
            "--stage",
            str(stage),
            "--steps",
            str(STEPS),
            "--checkpoint-dir",
            str(checkpoint_dir),
        ]
    args += ["--out", str(out)] + (["--resume"] if resume else [])
    if ranks == 1:
        return [sys.executable, *args]
    return deepspeed_command(*args, ranks=ranks)


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def rank_tracebacks(err: str, tail: int = 12) -> str:
    """The last ``tail`` lines each rank wrote with a ``[rankN]:`` prefix, ranks in order, first in a failure's
    report: the rank that died first is the one to read, the others' barrier errors follow from it."""
    by_rank: dict[str, list[str]] = {}
    for line in err.splitlines(keepends=True):
        if line.startswith("[rank") and "]" in line:
            by_rank.setdefault(line[: line.index("]") + 1], []).append(line)
    return "".join("".join(by_rank[r][-tail:]) for r in sorted(by_rank))


def run_to_end(cmd: list[str]) -> tuple[str, float]:
    """Run ``cmd`` to the end; returns its output and the median time between its ``step`` lines."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, times = [], []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step "):
            times.append(time.perf_counter())
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{rank_tracebacks(err)}\n{''.join(lines)[-1000:]}\n{err[-1000:]}")
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return "".join(lines), gaps[len(gaps) // 2] if gaps else 0.1


def run_and_kill(cmd: list[str], at_step: int, delay: float) -> bool:
    """Start ``cmd``; SIGKILL its whole process group ``delay`` s after it prints ``step <at_step>``.

    Returns False when the run finished before the kill point.
    """
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        for line in proc.stdout:
            if line.strip() == f"step {at_step}":
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
        proc.wait()
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def outputs(out: Path, ranks: int) -> list[dict]:
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(ranks)]


def identical(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def trial(config: str, reference: list[dict], step_time: float, work: Path, rng: random.Random) -> dict:
    """Kill a random time within the step after a random one (a save, on even steps, is in that window)."""
    ranks = CONFIGS[config][0]
    checkpoints, out = work / "checkpoints", work / "out"
    at_step, delay = rng.randint(1, STEPS - 1), rng.uniform(0.0, 1.5 * step_time)
    killed = run_and_kill(command(config, checkpoints, out, resume=False), at_step, delay)
    partial = sorted(p.name for p in checkpoints.glob(".*partial")) if checkpoints.exists() else []
    log, _ = run_to_end(command(config, checkpoints, out, resume=True))
    resumed_from = next((line.split()[-1] for line in log.splitlines() if line.startswith("resumed from")), None)
    return {
        "config": config,
        "killed_after_step": at_step,
        "delay_s": round(delay, 3),
        "step_time_s": round(step_time, 3),
        "killed": killed,
        "partial_checkpoint_left": partial,
        "resumed_from": resumed_from,
        "exact": identical(outputs(out, ranks), reference),
    }


def measure(configs: list[str], trials: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for config in configs:
        with tempfile.TemporaryDirectory() as tmp:
            ref_out = Path(tmp) / "reference"
            _, step_time = run_to_end(command(config, Path(tmp) / "reference-checkpoints", ref_out, resume=False))
            reference = outputs(ref_out, CONFIGS[config][0])
            for i in range(trials):
                work = Path(tmp) / f"trial{i}"
                work.mkdir()
                row = trial(config, reference, step_time, work, rng)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kill_and_resume.json"))
    args = parser.parse_args()
    start = time.time()
    rows = measure(args.configs, args.trials, args.seed)
    print(f"\n{'configuration':<32}{'exact':>8}{'killed mid-save':>17}  kill points (after step)")
    for config in args.configs:
        mine = [r for r in rows if r["config"] == config]
        exact = sum(r["exact"] for r in mine)
        mid_save = sum(bool(r["partial_checkpoint_left"]) for r in mine)
        points = ", ".join(str(r["killed_after_step"]) for r in mine)
        print(f"{config:<32}{f'{exact}/{len(mine)}':>8}{mid_save:>17}  {points}")
    result = {"trials": args.trials, "seed": args.seed, "wall_s": round(time.time() - start, 1), "rows": rows}
    path = Path(args.out)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
