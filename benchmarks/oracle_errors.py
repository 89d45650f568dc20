"""Each method's hypergradient error against the closed form on ridge regression.

    python benchmarks/oracle_errors.py [--out benchmarks/results/oracle_errors.json]

Ridge regression with per-feature L2 hyperparameters (6 features, 40 training
and 30 validation examples), lower level at its exact optimum theta*(lambda).
Prints a table of relative error and cosine against the implicit-function
closed form as each method's iteration count grows, in float64 on the plain
torch backend and in float32 inside DeepSpeed (ZeRO-0) engines.
finite_difference and sama approximate H^{-1} by the learning rate, so their
distance from the implicit closed form is the approximation itself, not a bug;
they are compared with their own one-step oracles in tests/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from scalemlo import LevelConfig  # noqa: E402
from scalemlo.testing import RidgeData, ridge_engine  # noqa: E402

SWEEPS = [
    ("exact", "-", [None], lambda k: {}),
    ("cg", "cg_iterations", [1, 2, 3, 4, 6, 8], lambda k: {"cg_iterations": k}),
    ("cg (alpha=0.25)", "cg_iterations", [1, 2, 4, 6, 8], lambda k: {"cg_iterations": k, "cg_alpha": 0.25}),
    (
        "neumann",
        "neumann_iterations",
        [1, 5, 10, 20, 50, 100, 200],
        lambda k: {"neumann_iterations": k, "neumann_alpha": 0.3},
    ),
    (
        "penalty (alpha=1e2)",
        "penalty_steps",
        [10, 100, 1000],
        lambda k: {"penalty_steps": k, "penalty_alpha": 1e2, "penalty_lr": 0.3},
    ),
    (
        "penalty (alpha=1e4)",
        "penalty_steps",
        [10, 100, 1000, 3000],
        lambda k: {"penalty_steps": k, "penalty_alpha": 1e4, "penalty_lr": 0.3},
    ),
    ("finite_difference", "-", [None], lambda k: {}),
    ("sama", "-", [None], lambda k: {}),
]


def measure(backend: str, dtype: torch.dtype) -> list[dict]:
    data = RidgeData.make()
    log_lambda = torch.linspace(-1.0, 0.5, 6, dtype=torch.float64)
    theta = data.solution(log_lambda)
    reference = data.hypergradient(log_lambda)
    rows = []
    for label, knob, values, kwargs in SWEEPS:
        method = label.split(" ")[0]
        for k in values:
            config = LevelConfig(method=method, backend=backend, **kwargs(k))
            engine = ridge_engine(data, log_lambda, theta, config, backend=backend, dtype=dtype)
            start = time.perf_counter()
            result = engine.hypergradient("hyper")[0].double()
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "method": label,
                    "backend": backend,
                    "dtype": str(dtype).replace("torch.", ""),
                    "knob": knob,
                    "iterations": k,
                    "rel_error": float((result - reference).norm() / reference.norm()),
                    "cosine": float(torch.dot(result, reference) / (result.norm() * reference.norm())),
                    "seconds": seconds,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/oracle_errors.json")
    args = parser.parse_args()
    rows = measure("torch", torch.float64) + measure("deepspeed", torch.float32)
    header = f"{'method':<22}{'backend':<11}{'dtype':<9}{'knob':<20}{'iters':>6}{'rel_error':>12}{'cosine':>14}"
    print(header)
    print("-" * len(header))
    for r in rows:
        iters = "-" if r["iterations"] is None else r["iterations"]
        print(
            f"{r['method']:<22}{r['backend']:<11}{r['dtype']:<9}{r['knob']:<20}{iters:>6}"
            f"{r['rel_error']:>12.3e}{r['cosine']:>14.10f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
