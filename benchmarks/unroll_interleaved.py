"""The shared-forward MLO step at ``unroll_steps`` k against plain fine-tuning, interleaved cycle by cycle.

    python benchmarks/unroll_interleaved.py --size 124m --unroll 10 --rounds 4   # ~4 min a round at 124M

``benchmarks/reweighting.py`` runs each system in its own process one after the
other, and its plain rows time two steps: on this shared 2-core machine a ratio
near 1.1 moves by ±0.07 between rounds there. Here one process holds both
(the task of ``reweighting_worker.py``: GPT-2 causal LM, batch 8 × 64 random
tokens, Meta-Weight-Net, Adam on both levels) and every round times k plain
steps, then one full scalemlo cycle (k lower steps, the last of which takes
the meta step inside it), so both sides of a round's ratio see the same
minute. Reported: each round's ratio (scalemlo cycle time / plain time for
the same number of steps), their median and range, and the meta step's extra
cost in plain steps. The first round is warm-up and not counted.
Writes ``benchmarks/results/unroll_interleaved_<size>_u<k>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reweighting_worker as task  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="124m", choices=sorted(task.SIZES))
    parser.add_argument("--method", default="finite_difference")
    parser.add_argument("--unroll", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4, help="counted rounds (one warm-up round more)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default results/unroll_interleaved_<size>_u<k>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, plain_step = task.plain_trainer(args.size)
    engine, _, upper = task.scalemlo_program(args.size, args.method, args.unroll, shared=True)

    rounds = []
    start = time.time()
    for r in range(args.rounds + 1):
        plain = []
        for i in range(args.unroll):
            t = time.perf_counter()
            plain_step(i)
            plain.append(time.perf_counter() - t)
        mlo = []
        for _ in range(args.unroll):
            t = time.perf_counter()
            engine.step()
            mlo.append(time.perf_counter() - t)
        row = {
            "round": r,
            "warmup": r == 0,
            "plain_s": plain,
            "scalemlo_s": mlo,
            "ratio": sum(mlo) / sum(plain),
            "meta_steps_so_far": upper.steps,
            "meta_extra_plain_steps": (mlo[-1] - statistics.median(plain)) / statistics.median(plain),
        }
        rounds.append(row)
        extra = 1 + row["meta_extra_plain_steps"]
        print(
            f"round {r}{' (warm-up)' if r == 0 else ''}: plain {sum(plain):.1f}s, scalemlo {sum(mlo):.1f}s, "
            f"ratio {row['ratio']:.3f}, meta step = {extra:.2f} plain steps",
            flush=True,
        )
    counted = [row["ratio"] for row in rounds if not row["warmup"]]
    summary = {"median_ratio": statistics.median(counted), "min": min(counted), "max": max(counted)}
    print(
        f"time / plain at unroll_steps {args.unroll}: {summary['median_ratio']:.3f} "
        f"[{summary['min']:.3f}-{summary['max']:.3f}] over {len(counted)} rounds"
    )
    out = Path(args.out) if args.out else HERE / "results" / f"unroll_interleaved_{args.size}_u{args.unroll}.json"
    command = "python benchmarks/unroll_interleaved.py " + " ".join(sys.argv[1:])
    out.write_text(
        json.dumps(
            {
                "command": command.strip(),
                "wall_s": round(time.time() - start, 1),
                "threads": args.threads,
                "summary": summary,
                "rounds": rounds,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
