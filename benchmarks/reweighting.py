"""Data reweighting side by side: plain fine-tuning, Betty and scalemlo, in interleaved rounds.

    python benchmarks/reweighting.py --sizes 4m 124m --rounds 3 --steps 5

Every configuration runs in its own process (benchmarks/reweighting_worker.py).
Within a round the systems run one after another (plain, Betty, scalemlo, ...),
and each ratio is the median over rounds of that round's ratio, so a slow
minute on this shared machine hits both sides of a ratio. Writes
``benchmarks/results/latest.json``, ``benchmarks/results/latest.md`` and
``benchmarks/results/latest.png`` and prints the table.

Betty: ``pip install --no-deps --ignore-requires-python betty-ml==0.2.1``
(skipped with a note if it is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "reweighting_worker.py"


def configurations(sizes, methods, unrolls, unroll_sizes, with_betty, systems=("scalemlo", "scalemlo-shared")):
    """One round's configurations, in the order they run (unroll_steps > 1 only at ``unroll_sizes``)."""
    for size in sizes:
        yield {"system": "plain", "method": "none", "size": size, "unroll": 1}
        for method in methods:
            if with_betty:
                yield {"system": "betty", "method": method, "size": size, "unroll": 1}
            for unroll in unrolls:
                if unroll == 1 or size in unroll_sizes:
                    for system in systems:
                        yield {"system": system, "method": method, "size": size, "unroll": unroll}


def key(cfg) -> tuple:
    return (cfg["system"], cfg["method"], cfg["size"], cfg["unroll"])


def run_one(cfg, steps: int, warmup: int, threads: int = 0) -> dict:
    cmd = [
        sys.executable,
        str(WORKER),
        "--system",
        cfg["system"],
        "--method",
        cfg["method"],
        "--size",
        cfg["size"],
        "--unroll",
        str(cfg["unroll"]),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--threads",
        str(threads),
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def summarize(rounds: list[dict[tuple, dict]]) -> list[dict]:
    rows = []
    for k in rounds[0]:
        system, method, size, unroll = k
        per_round = [r[k] for r in rounds]
        # for unroll k, a worker "step" is one cycle (k lower steps + one meta step) divided by k
        medians = [statistics.median(x["step_s"]) for x in per_round]
        row = {
            "system": system,
            "method": method,
            "size": size,
            "params": per_round[0]["params"],
            "unroll_steps": unroll,
            "median_step_s": statistics.median(medians),
            "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in per_round),
            "rounds": len(per_round),
        }
        plain = [r[("plain", "none", size, 1)] for r in rounds]
        ratio_time = [statistics.median(x["step_s"]) / statistics.median(p["step_s"]) for x, p in zip(per_round, plain)]
        ratio_mem = [x["peak_rss_mb"] / p["peak_rss_mb"] for x, p in zip(per_round, plain)]
        row["time_vs_plain"] = _spread(ratio_time)
        row["memory_vs_plain"] = _spread(ratio_mem)
        betty_key = ("betty", method, size, 1)
        if system.startswith("scalemlo") and unroll == 1 and betty_key in rounds[0]:  # Betty runs at unroll 1 only
            betty = [r[betty_key] for r in rounds]
            row["time_vs_betty"] = _spread(
                [statistics.median(x["step_s"]) / statistics.median(b["step_s"]) for x, b in zip(per_round, betty)]
            )
            row["memory_vs_betty"] = _spread([x["peak_rss_mb"] / b["peak_rss_mb"] for x, b in zip(per_round, betty)])
        rows.append(row)
    return rows


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(ratio: dict | None) -> str:
    if not ratio:
        return "-"
    return f"{ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}]"


def table(rows: list[dict]) -> str:
    head = (
        "| system | method | params | unroll | median step (s) | peak RSS (MB) | time / plain | memory / plain "
        "| time / Betty | memory / Betty |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['system']} | {r['method']} | {r['params'] / 1e6:.1f}M | {r['unroll_steps']} | {r['median_step_s']:.3f} "
        f"| {r['peak_rss_mb']:.0f} | {_fmt(r['time_vs_plain'])} | {_fmt(r['memory_vs_plain'])} "
        f"| {_fmt(r.get('time_vs_betty'))} | {_fmt(r.get('memory_vs_betty'))} |\n"
        for r in rows
    )
    return head + body


def chart(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no chart")
        return
    sizes = sorted({r["size"] for r in rows}, key=lambda s: float(s.rstrip("m")))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        sub = [r for r in rows if r["size"] == size]
        labels = [
            f"{r['system']}\n{r['method']}" + (f"\nunroll {r['unroll_steps']}" if r["unroll_steps"] > 1 else "")
            for r in sub
        ]
        colors = {"plain": "#999999", "betty": "#d95f02", "scalemlo": "#1b9e77", "scalemlo-shared": "#7570b3"}
        ax.bar(range(len(sub)), [r["median_step_s"] for r in sub], color=[colors[r["system"]] for r in sub])
        ax.set_xticks(range(len(sub)), labels, fontsize=7)
        ax.set_ylabel("median step time (s)")
        ax.set_title(f"GPT-2 {size}: batch 8 x 64, CPU fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4m", "124m"])
    parser.add_argument("--methods", nargs="+", default=["finite_difference", "sama"])
    parser.add_argument("--unrolls", nargs="+", type=int, default=[1, 5, 10], help="scalemlo unroll_steps to measure")
    parser.add_argument("--unroll-sizes", nargs="+", default=["4m"], help="sizes at which unroll_steps > 1 run")
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["scalemlo", "scalemlo-shared"],
        choices=["scalemlo", "scalemlo-shared"],
        help="scalemlo variants to measure",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "latest"))
    parser.add_argument("--no-accuracy", action="store_true", help="skip benchmarks/hypergradient_accuracy.py")
    parser.add_argument(
        "--attach-accuracy", action="store_true", help="only run the accuracy check and attach it to an existing --out"
    )
    args = parser.parse_args()
    if args.attach_accuracy:
        attach_accuracy(Path(args.out))
        return
    with_betty = importlib.util.find_spec("betty") is not None
    if not with_betty:
        print("Betty is not installed: pip install --no-deps --ignore-requires-python betty-ml==0.2.1 (skipping it)")
    configs = list(configurations(args.sizes, args.methods, args.unrolls, args.unroll_sizes, with_betty, args.systems))
    rounds: list[dict[tuple, dict]] = []
    start = time.time()
    for i in range(args.rounds):
        result = {}
        for cfg in configs:
            result[key(cfg)] = run_one(cfg, args.steps, args.warmup, args.threads)
            r = result[key(cfg)]
            print(
                f"round {i + 1}/{args.rounds} {cfg['system']:>8} {cfg['method']:>17} {cfg['size']:>5} "
                f"unroll {cfg['unroll']:>2}: median {statistics.median(r['step_s']):.3f}s "
                f"peak {r['peak_rss_mb']:.0f}MB",
                flush=True,
            )
        rounds.append(result)
    rows = summarize(rounds)
    text = table(rows)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "wall_s": round(time.time() - start, 1),
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads or torch_threads(),
    }
    out.with_suffix(".json").write_text(
        json.dumps(
            {"meta": meta, "rows": rows, "raw": [{"round": i, **v} for i, r in enumerate(rounds) for v in r.values()]},
            indent=1,
        )
    )
    out.with_suffix(".md").write_text(f"Command: `{meta['command']}`  \nMachine: {meta['machine']}\n\n{text}")
    chart(rows, out.with_suffix(".png"))
    if not args.no_accuracy:
        attach_accuracy(out)
    print(f"wrote {out}.json / .md / .png")


def attach_accuracy(out: Path) -> None:
    """Run the float64 accuracy check and put its cosines and relative errors beside the timings."""
    result = HERE / "results" / "hypergradient_accuracy.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(HERE / "hypergradient_accuracy.py")], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hypergradient_accuracy.py failed:\n{proc.stderr[-3000:]}")
    accuracy = json.loads(result.read_text())
    data = json.loads(out.with_suffix(".json").read_text())
    by_key = {(a["system"], a["method"]): a for a in accuracy}
    for row in data["rows"]:
        a = by_key.get((row["system"], row["method"]))
        for key in (
            "cosine_vs_float64",
            "rel_err_vs_float64",
            "cosine_vs_float64_undetached",
            "rel_err_vs_float64_undetached",
        ):
            row[f"hypergradient_{key}"] = a[key] if a else None
    data["accuracy"] = accuracy
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    lines = [
        "\nHypergradient against a float64 reference (tiny GPT-2, benchmarks/hypergradient_accuracy.py):\n",
        "| system | method | cosine / rel. error vs training dynamics (detached MWN input) "
        "| cosine / rel. error vs undetached objective |",
        "|---|---|---|---|",
        *[
            f"| {a['system']} | {a['method']} | {a['cosine_vs_float64']:.4f} / {a['rel_err_vs_float64']:.3g} "
            f"| {a['cosine_vs_float64_undetached']:.6f} / {a['rel_err_vs_float64_undetached']:.3g} |"
            for a in accuracy
        ],
    ]
    with out.with_suffix(".md").open("a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
