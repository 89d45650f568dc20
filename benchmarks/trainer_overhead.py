"""The overhead of ``scalemlo.hf.ReweightingTrainer`` beside the plain ``transformers.Trainer``.

    python benchmarks/trainer_overhead.py                                    # GPT-2 124M, 30 steps, 10 skipped
    python benchmarks/trainer_overhead.py --size tiny --steps 12 --skip 2 --out /tmp/trainer_overhead.json  # check

Three rows, each in a fresh process (benchmarks/trainer_overhead_worker.py),
all with the same model (GPT-2 from a config, seed 0, no download), data
(random token ids, ``--batch_size`` x ``--seq_len``, from a seeded generator),
budget (``--steps`` optimizer steps via ``max_steps``) and DeepSpeed config
(configs/ds/trainer_zero0.json: ZeRO-0, one process, CPU):

- plain: ``transformers.Trainer`` (the model's own mean token loss);
- reweighting, unroll_steps=1 / 10: ``ReweightingTrainer`` with a
  Meta-Weight-Net, the finite-difference hypergradient, ``meta_warmup_steps=0``
  and a meta batch of ``--batch_size``: a meta step after every 1 / 10
  optimizer steps.

Measured per row:

- s/step: mean wall-clock seconds per optimizer step over the last
  ``--steps - --skip`` steps, from time stamps taken in a ``TrainerCallback``'s
  ``on_step_end`` (after that step's meta step, if any). ``--steps - --skip``
  must be a multiple of 10 so the unroll-10 window holds whole cycles;
- peak RSS: the process's ``ru_maxrss`` after training (imports, data,
  DeepSpeed, model, optimizer, MLO);
- peak - pre-model RSS: peak minus the RSS just before the model is built
  (imports, the process group and the data are already there): the part
  attributable to the model, its optimizer and the MLO machinery.

Every ratio is to the plain row. ``--threads N`` sets ``OMP_NUM_THREADS`` in
the workers (default: accelerate's one thread per physical core); on a machine
that other jobs share, OpenMP threads waiting on busy cores make every step
many times slower (30x seen on 2 cores), so there use fewer threads than free
cores, or none of the timings mean much. Workers run with ``MALLOC_MMAP_THRESHOLD_=1048576``
(as benchmarks/zero_scaling.py): glibc otherwise keeps freed tensors' pages in
its heap and RSS would count memory freed long ago. Prints a table and the
targets at unroll_steps=10 (peak memory <= 1.05x plain, time <= 1.3x
plain) with PASS/FAIL; writes ``--out`` (JSON: settings, versions, threads, rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "trainer_overhead_worker.py"
ROWS = [("plain", "plain", None), ("unroll_steps=1", "reweighting", 1), ("unroll_steps=10", "reweighting", 10)]
TARGET_ROW, MEMORY_TARGET, TIME_TARGET = "unroll_steps=10", 1.05, 1.3


def run_row(trainer: str, unroll_steps: int | None, args) -> dict:
    """One row in a fresh process; its JSON result."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="1048576")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        flags = {
            "trainer": trainer,
            "size": args.size,
            "steps": args.steps,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "unroll_steps": unroll_steps,
            "result": result,
        }
        cmd = [sys.executable, str(WORKER)] + [f"--{k}={v}" for k, v in flags.items() if v is not None]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def summarize(name: str, raw: dict, skip: int) -> dict:
    ends = raw["step_end_s"]
    return {
        "row": name,
        **{k: v for k, v in raw.items() if k != "step_end_s"},
        "seconds_per_step": (ends[-1] - ends[skip - 1]) / (len(ends) - skip),
        "peak_rss_mib": raw["peak_rss_kib"] / 1024,
        "model_opt_mlo_rss_mib": (raw["peak_rss_kib"] - raw["rss_before_model_kib"]) / 1024,
        "step_seconds": [b - a for a, b in zip([0.0, *ends], ends)],
    }


def table(rows: list[dict]) -> str:
    header = (
        f"{'row':<16} {'s/step':>8} {'x plain':>8} {'peak RSS MiB':>13} {'x plain':>8} "
        f"{'peak-pre-model MiB':>19} {'x plain':>8} {'meta steps':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['row']:<16} {r['seconds_per_step']:>8.3f} {r['time_ratio']:>8.2f} {r['peak_rss_mib']:>13.0f} "
            f"{r['peak_rss_ratio']:>8.3f} {r['model_opt_mlo_rss_mib']:>19.0f} {r['model_opt_mlo_rss_ratio']:>8.3f} "
            f"{r['meta_steps']:>11}"
        )
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def targets(row: dict) -> tuple[str, dict]:
    """The targets at unroll_steps=10 (peak memory and time against plain): a line to print and the JSON record."""
    peak, attributable, step = row["peak_rss_ratio"], row["model_opt_mlo_rss_ratio"], row["time_ratio"]
    record = {
        "row": row["row"],
        "peak_memory_max_ratio": MEMORY_TARGET,
        "time_max_ratio": TIME_TARGET,
        "peak_rss_pass": peak <= MEMORY_TARGET,
        "peak_minus_pre_model_rss_pass": attributable <= MEMORY_TARGET,
        "time_pass": step <= TIME_TARGET,
    }
    line = (
        f"Targets at {row['row']}: peak memory <= {MEMORY_TARGET}x plain, time <= {TIME_TARGET}x plain. "
        f"Peak RSS {peak:.3f}x: {verdict(record['peak_rss_pass'])}; "
        f"peak - pre-model RSS {attributable:.3f}x: {verdict(record['peak_minus_pre_model_rss_pass'])}; "
        f"time {step:.2f}x: {verdict(record['time_pass'])}."
    )
    return line, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["124m", "tiny"], default="124m")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per row (max_steps)")
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4, help="per device, training and meta")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: torch's default)")
    parser.add_argument("--out", default=str(HERE / "results" / "trainer_overhead.json"))
    args = parser.parse_args()
    if not 1 <= args.skip < args.steps or (args.steps - args.skip) % 10:
        parser.error(f"need 1 <= --skip < --steps, --steps - --skip a multiple of 10; got {args.steps}, {args.skip}")

    started = time.time()
    rows = []
    for name, trainer, unroll_steps in ROWS:
        rows.append(summarize(name, run_row(trainer, unroll_steps, args), args.skip))
        print(
            f"{name}: {rows[-1]['seconds_per_step']:.3f} s/step, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    plain = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds_per_step"] / plain["seconds_per_step"]
        r["peak_rss_ratio"] = r["peak_rss_kib"] / plain["peak_rss_kib"]
        r["model_opt_mlo_rss_ratio"] = r["model_opt_mlo_rss_mib"] / plain["model_opt_mlo_rss_mib"]
    line, record = targets(next(r for r in rows if r["row"] == TARGET_ROW))
    print()
    print(table(rows))
    print()
    print(line)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "size": args.size,
            "params": plain["params"],
            "steps": args.steps,
            "skip": args.skip,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "deepspeed_config": "configs/ds/trainer_zero0.json",
            "reweighting": "meta_weight_net",
            "hypergradient_method": "finite_difference",
            "meta_warmup_steps": 0,
            "malloc_mmap_threshold": 1048576,
        },
        "versions": {name: version(name) for name in ("torch", "transformers", "deepspeed", "accelerate")},
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": plain["torch_threads"],
        "wall_s": round(time.time() - started, 1),
        "targets": record,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
