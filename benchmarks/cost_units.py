"""The cost model of a reweighting MLO step, with its units measured on this machine.

    python benchmarks/cost_units.py --size 124m --repeats 5

A finite-difference MLO step (DESIGN.md section 4) is at least
  one training step of the LM (forward, backward, Adam)
+ one meta gradient (forward and backward of the meta loss, no optimizer)
+ two forwards of the per-example losses at theta +- eps w (no grad),
whatever the library. This script times each part alone in one process
(median of ``--repeats``, parts interleaved), adds them up to the floor any
implementation must pay, and times scalemlo's exact perturb/restore of the
LM's parameters, the one cost it adds on top. Writes
``benchmarks/results/cost_units.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reweighting_worker import LM_LR, WeightNet, batches, make_lm, per_example_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="124m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "cost_units.json"))
    args = parser.parse_args()
    from scalemlo.hypergrad import vectors

    torch.manual_seed(0)
    lm, weigher = make_lm(args.size), WeightNet()
    weigher.requires_grad_(False)
    opt = torch.optim.Adam(lm.parameters(), lr=LM_LR)
    train, meta = batches(args.size, 2, 0), batches(args.size, 2, 1)
    params = [p for p in lm.parameters()]

    def training_step():
        losses = per_example_loss(lm, train[0][0])
        (weigher(losses.detach()) * losses).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def meta_gradient():
        return torch.autograd.grad(per_example_loss(lm, meta[0][0]).mean(), params)

    def no_grad_forward():
        with torch.no_grad():
            per_example_loss(lm, train[0][0])

    direction = [torch.randn_like(p) * 1e-3 for p in params]

    def perturb_and_restore():
        with vectors.perturbed_(params, direction, 1.0):
            pass

    parts = {
        "training_step": training_step,
        "meta_gradient": meta_gradient,
        "no_grad_forward": no_grad_forward,
        "perturb_and_restore": perturb_and_restore,
    }
    for fn in parts.values():  # warm-up
        fn()
    times = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    floor = median["training_step"] + median["meta_gradient"] + 2 * median["no_grad_forward"]
    result = {
        "size": args.size,
        "params": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
        "median_s": median,
        "all_s": times,
        "fd_step_floor_s": floor,
        "fd_step_floor_vs_training_step": floor / median["training_step"],
        "scalemlo_extra_s": 2 * median["perturb_and_restore"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'part':<22}{'median s':>10}")
    for name, value in median.items():
        print(f"{name:<22}{value:>10.3f}")
    print(f"{'floor (fd MLO step)':<22}{floor:>10.3f}   = {floor / median['training_step']:.2f} x training step")


if __name__ == "__main__":
    main()
