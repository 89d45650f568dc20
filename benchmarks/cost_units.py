"""The cost model of a reweighting MLO step, with its units measured on this machine.

    python benchmarks/cost_units.py --size 124m --repeats 5

A finite-difference MLO step (DESIGN.md section 4) is at least
  one training step of the LM (forward, backward, Adam)
+ one meta gradient (forward and backward of the meta loss, no optimizer)
+ two forwards of the per-example losses at theta +- eps w (no grad),
whatever the library. This script times each part alone in one process
(median of ``--repeats``, parts interleaved), adds them up to the floor any
implementation must pay, and times the perturbation of the LM's parameters
for one central difference (to theta + eps w, to theta - eps w, back): scalemlo's
exact one (``vectors.mirrored_``, bit-for-bit restore), an exact one that keeps
the realized step and patches the restore (``perturbed_`` below, twice; recorded as
``central_perturbation_exact_before``), and Betty's unchecked three in-place adds
(which leave the parameters off by rounding). Writes ``benchmarks/results/cost_units.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from scalemlo import vectors

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reweighting_worker import LM_LR, WeightNet, batches, make_lm, per_example_loss  # noqa: E402


# An exact move for a central difference without mirrored_: keep the realized step r = fl(p + eps d) - p in d,
# and patch the elements where p + r - r is not p from a sparse record; the baseline mirrored_ is timed against.
@contextlib.contextmanager
def perturbed_(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], eps: float):
    """Move ``params`` to ``params + eps * direction`` and back, bit for bit; writes ``direction``.

    ``p + eps*d - eps*d`` is not ``p`` in floating point (Betty leaves lower
    levels perturbed this way). Here the realized step ``r = fl(p + eps*d) - p``
    is written into ``direction`` (the trailing underscore: its storage is
    reused, so no second parameter-sized buffer is needed); restoring
    subtracts ``r`` and patches the few elements where that is not exact (tiny
    ``p`` next to a large step) from a sparse record. A second call with
    ``eps=-1`` then moves to exactly ``p - r``. Peak extra memory: two scratch
    buffers of at most ``_CHUNK`` elements, plus the sparse record.

    Yields nothing; from entry on, ``direction`` holds the realized step.
    """
    fixes: list[tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]] = []
    # Through .data: the writes do not bump the parameters' version counters, so a graph that saved
    # them before the move (the shared forward's) stays usable after the exact restore.
    params = [p.data for p in params]
    pieces = [piece for p, d in zip(params, direction) for piece in vectors._pieces(p, d)]
    largest = max((p.numel() for p, _ in pieces), default=0)
    with torch.no_grad():
        # Two scratch buffers reused across pieces: no allocation per tensor.
        before_buf = pieces[0][0].new_empty(largest) if largest else None
        check_buf = pieces[0][0].new_empty(largest) if largest else None
        for p, d in pieces:
            before = before_buf[: p.numel()].view_as(p)
            check = check_buf[: p.numel()].view_as(p)
            before.copy_(p)
            p.add_(d.to(p.dtype), alpha=eps)
            torch.sub(p, before, out=d)
            torch.sub(p, d, out=check)
            if not torch.equal(check, before):  # one fused pass; the mask only where needed (rare)
                mask = check != before
                fixes.append((p, mask.nonzero(as_tuple=True), before[mask].clone()))
        del before_buf, check_buf
    try:
        yield
    finally:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(d.to(p.dtype))
            for piece, where, values in fixes:
                piece[where] = values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="124m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "cost_units.json"))
    args = parser.parse_args()

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
    scratch = [torch.empty_like(p) for p in params]  # the consumed copy of w, refilled untimed

    def refill():
        for s, d in zip(scratch, direction):
            s.copy_(d)

    def central_exact():  # what ResponseProblem.central_difference_ does around its two evaluations
        with vectors.mirrored_(params, scratch, 1.0) as to_mirror:
            to_mirror()

    def central_exact_patched():  # the same with perturbed_ (below): realized step kept, restore patched
        with perturbed_(params, scratch, 1.0):
            pass
        with perturbed_(params, scratch, -1.0):
            pass

    def central_unchecked():  # Betty's: p += eps w, p -= 2 eps w, p += eps w (not restored exactly)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d)
            for p, d in zip(params, direction):
                p.sub_(d, alpha=2.0)
            for p, d in zip(params, direction):
                p.add_(d)

    parts = {  # name -> (untimed setup, timed part)
        "training_step": (None, training_step),
        "meta_gradient": (None, meta_gradient),
        "no_grad_forward": (None, no_grad_forward),
        "central_perturbation_exact": (refill, central_exact),
        "central_perturbation_exact_before": (refill, central_exact_patched),
        "central_perturbation_unchecked": (None, central_unchecked),
    }
    for setup, fn in parts.values():  # warm-up
        if setup:
            setup()
        fn()
    times = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, (setup, fn) in parts.items():
            if setup:
                setup()
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
        "scalemlo_extra_s": median["central_perturbation_exact"] - median["central_perturbation_unchecked"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'part':<36}{'median s':>10}")
    for name, value in median.items():
        print(f"{name:<36}{value:>10.3f}")
    print(f"{'floor (fd MLO step)':<36}{floor:>10.3f}   = {floor / median['training_step']:.2f} x training step")


if __name__ == "__main__":
    main()
