"""ZeRO-0 vs ZeRO-3 on two CPU ranks: per-rank memory and step time of MLO reweighting, and plain fine-tuning.

    python benchmarks/zero_scaling.py                      # 124M at ZeRO-0 and ZeRO-3, 350M at ZeRO-3
    python benchmarks/zero_scaling.py --configs 4m:0 4m:3  # quick check

Each configuration (size:stage) is one ``deepspeed --num_gpus N`` launch of
benchmarks/zero_worker.py, first plain data-parallel fine-tuning of the LM
level alone, then scalemlo MLO (finite_difference). Writes
``benchmarks/results/zero_scaling.json`` and ``.md`` and prints the table.
Per-rank memory is the mean over ranks; "peak" is ru_maxrss (at ZeRO-3 the
model is built partitioned, under ``scalemlo.zero_init``; ``--whole`` builds it
whole on every rank first), "end" is the RSS after the last step,
"held B/param" the live memory after the last step minus the live memory
before the model was built, per parameter: what a rank keeps between steps.
Ratios to plain compare the same size and stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from scalemlo.testing import deepspeed_command

HERE = Path(__file__).resolve().parent
WORKER = HERE / "zero_worker.py"


def records_in(text: str) -> list[dict]:
    """Every ``{"rank": ...}`` JSON object in the launcher's output (ranks' lines may interleave)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find('{"rank"', i)) >= 0:
        obj, end = decoder.raw_decode(text, i)
        out.append(obj)
        i = end
    return out


def launch(size: str, stage: int, system: str, ranks: int, steps: int, warmup: int, flags: list[str]) -> list[dict]:
    cmd = deepspeed_command(
        WORKER,
        "--size",
        size,
        "--stage",
        stage,
        "--system",
        system,
        "--steps",
        steps,
        "--warmup",
        warmup,
        *flags,
        ranks=ranks,
    )
    # glibc raises its mmap threshold after large frees and then keeps freed tensors'
    # pages in the heap: RSS would report memory freed long ago (2.8 GB RSS for
    # 1.7 GB live at 124M ZeRO-3). A fixed threshold returns large tensors to the
    # system when freed, so RSS tracks live memory; it applies to every configuration.
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", MALLOC_MMAP_THRESHOLD_="1048576")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = records_in(proc.stdout)
    if proc.returncode != 0 or len(found) != ranks:
        raise RuntimeError(f"launch failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return found


def _ratio(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: no plain row to compare with (--systems scalemlo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=["124m:0", "124m:3", "350m:0", "350m:3"], help="size:stage pairs"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "zero_scaling"))
    parser.add_argument("--whole", action="store_true", help="ZeRO-3 models built whole on every rank first")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the LM's blocks")
    parser.add_argument("--fused_adam", action="store_true", help="torch's fused (in-place) Adam for the LM")
    parser.add_argument("--zero", default=None, help="JSON merged into zero_optimization (e.g. live-parameter limits)")
    parser.add_argument("--systems", nargs="+", default=["plain", "scalemlo"], choices=["plain", "scalemlo"])
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="the LM level's precision (each configuration runs in each)",
    )
    args = parser.parse_args()
    rows = []
    for spec in args.configs:
        size, stage = spec.split(":")
        for system, precision in [(s, p) for p in args.precisions for s in args.systems]:
            started = time.time()
            flags = ["--whole"] * args.whole + ["--checkpointing"] * args.checkpointing
            flags += ["--fused_adam"] * args.fused_adam
            flags += ["--zero", args.zero] if args.zero else []
            flags += ["--bf16"] if precision == "bf16" else []
            per_rank = launch(size, int(stage), system, args.ranks, args.steps, args.warmup, flags)
            row = {
                "system": system,
                "method": per_rank[0]["method"],
                "size": size,
                "params": per_rank[0]["params"],
                "zero_stage": int(stage),
                "built": per_rank[0]["built"],
                "checkpointing": per_rank[0]["checkpointing"],
                "fused_adam": per_rank[0]["fused_adam"],
                "precision": per_rank[0]["precision"],
                "zero": per_rank[0]["zero"],
                "first_step_s": statistics.mean(r["first_step_s"] for r in per_rank),
                "ranks": args.ranks,
                "median_step_s": statistics.median(t for r in per_rank for t in r["step_s"]),
                "peak_rss_mb_per_rank": statistics.mean(r["peak_rss_mb"] for r in per_rank),
                "end_rss_mb_per_rank": statistics.mean(r["end_rss_mb"] for r in per_rank),
                "end_live_mb_per_rank": statistics.mean(r["end_live_mb"] for r in per_rank),
                # what a rank holds per parameter between steps, the runtime subtracted (live memory after
                # the last step minus live memory before the model was built; weight net and batches
                # included, negligible at these sizes)
                "held_bytes_per_param": statistics.mean(
                    (r["end_live_mb"] - r["baseline_live_mb"]) * 2**20 / r["params"] for r in per_rank
                ),
                "launch_s": round(time.time() - started, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    plain = {(r["size"], r["zero_stage"], r["precision"]): r for r in rows if r["system"] == "plain"}
    for r in rows:
        base = plain.get((r["size"], r["zero_stage"], r["precision"]), {})  # absent with --systems scalemlo
        r["time_vs_plain_same_stage"] = r["median_step_s"] / base.get("median_step_s", float("nan"))
        r["peak_rss_vs_plain_same_stage"] = r["peak_rss_mb_per_rank"] / base.get("peak_rss_mb_per_rank", float("nan"))
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    header = (
        "| system | size | ZeRO | precision | ranks | step s | peak RSS/rank MB | end RSS/rank MB "
        "| end RSS B/param (runtime incl.) | held B/param (runtime excl.) | time / plain | peak RSS / plain |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['system']} | {r['size']} ({r['params'] / 1e6:.0f}M) | {r['zero_stage']} | {r['precision']} | "
        f"{r['ranks']} | "
        f"{r['median_step_s']:.2f} | {r['peak_rss_mb_per_rank']:.0f} | {r['end_rss_mb_per_rank']:.0f} | "
        f"{r['end_live_mb_per_rank'] * 2**20 / r['params']:.1f} | {r['held_bytes_per_param']:.1f} | "
        f"{_ratio(r['time_vs_plain_same_stage'])} | {_ratio(r['peak_rss_vs_plain_same_stage'])} |"
        for r in rows
    ]
    table = header + "\n".join(lines) + "\n"
    Path(args.out + ".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
