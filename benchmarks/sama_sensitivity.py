"""Where sama's w lives: the share of ||w||^2 per parameter and by the size of Adam's second moment.

    python benchmarks/sama_sensitivity.py --size tiny --steps 5     # ~15 s on the CPU

Trains the reweighting task of benchmarks/gpu_check.py (GPT-2 LM under a Meta-Weight-Net, Adam,
float32) for ``--steps`` steps with ``sama``, then forms sama's Adam sensitivity for v = 1 (what
multiplies the meta gradient, entry by entry) and prints which parameters and which entries (by
sqrt of the bias-corrected second moment) hold its squared norm. On GPT-2 the attention biases
(``c_attn.bias``: the key bias's gradient is zero in exact arithmetic, rounding noise in practice)
hold almost all of it; see docs/precision.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import gpu_check

    from scalemlo.hypergrad.sama import _adam_sensitivity

    torch.manual_seed(0)
    engine = gpu_check.levels(args.size, "sama", "fp32")
    for _ in range(args.steps):
        engine.step()
    backend = engine.levels["lm"].backend
    group = backend.torch_optimizer.param_groups[0]
    names = [n for n, p in engine.levels["lm"].module.named_parameters() if p.requires_grad]
    w, roots, share = [], [], {}
    for i, (name, p) in enumerate(zip(names, backend.params)):
        state = backend.optimizer_state(p)
        entry = _adam_sensitivity(p, torch.ones_like(p), state, group, backend.last_step.grads[i], 1.0, False)
        bc2 = 1 - group["betas"][1] ** float(state["step"])
        w.append(entry.reshape(-1).double())
        roots.append((state["exp_avg_sq"] / bc2).sqrt().reshape(-1).double())
        share[name] = float((w[-1] ** 2).sum())
    w, roots = torch.cat(w), torch.cat(roots)
    total = float((w**2).sum())
    print(f"sama sensitivity (lr = 1, v = 1) after {args.steps} steps, GPT-2 {args.size}, float32")
    for name, value in sorted(share.items(), key=lambda item: -item[1])[:5]:
        print(f"  {value / total:8.4f} of ||w||^2  {name}")
    for bound in (1e-9, 1e-8, 1e-6, 1e-4):
        inside = roots < bound
        print(
            f"  sqrt(s_hat) < {bound:g}: {float(inside.double().mean()):.4f} of the entries, "
            f"{float((w[inside] ** 2).sum()) / total:.4f} of ||w||^2"
        )


if __name__ == "__main__":
    main()
