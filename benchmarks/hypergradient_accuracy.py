"""Each system's reweighting hypergradient against a float64 reference, on a tiny GPT-2.

    python benchmarks/hypergradient_accuracy.py

Same task as benchmarks/reweighting.py (causal LM, per-example
Meta-Weight-Net weights, Adam on the LM) at a size where float64 double
backward is cheap. Protocol, identical for every system: build from one seed,
run 3 iterations with the upper level's learning rate at 0 (the LM trains, the
weight net does not move), then one iteration with the upper optimizer SGD at
lr 1, so the weight net moves by exactly minus its hypergradient. The
reference replays the same LM steps in float64 and forms, with autograd:

- finite difference (Betty ``darts``, scalemlo ``finite_difference``):
  -(d^2 f / dphi dtheta) (lr dF/dtheta);
- sama: -(d^2 f / dphi dtheta) (du/dg)^T dF/dtheta with du/dg by autograd
  through a written-out Adam step.

The mixed term is the derivative of the gradient the LM actually trains on,
where Meta-Weight-Net's input (the loss value) is detached. A central
difference of grad_phi f cannot see the detach: moving theta moves the weight
net's input too. So both systems' difference methods estimate the mixed term
of the *undetached* objective; the undetached columns show that they do so
accurately, the others how far that is from the training dynamics. The
system ``scalemlo-held`` feeds the weight net through ``Level.held``, which
keeps its input at the value of the current parameters in every evaluation:
it estimates the training dynamics' mixed term. ``scalemlo-shared`` uses
``LevelConfig.shared_forward`` (the LM level declared reweighted; the meta step
taken inside the next LM step on its forward, one-sided difference): it runs
one LM step more with the meta lr at 0, so that its meta step sees the same
parameters, optimizer state and learning rate as the reference. Each
comparison reports the cosine and the relative error ||g - ref|| / ||ref||
(a cosine alone is blind to the scale: a hypergradient off by the lr factor
scores 1.0).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reweighting_worker import (  # noqa: E402
    WeightNet,
    betty_problems,
    per_example_loss,
    scalemlo_levels,
    scalemlo_shared_levels,
)

WARM, LM_LR = 3, 1e-2


def tiny_lm() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )  # CPU SDPA has no double backward
    return GPT2LMHeadModel(cfg)


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 64, (4, 16), generator=g),), (torch.randint(0, 64, (4, 16), generator=g),)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def run_scalemlo(method: str, held: bool = False, shared: bool = False, central: bool = False) -> torch.Tensor:
    from scalemlo import Engine, EngineConfig, LevelConfig

    LM, Reweight = scalemlo_shared_levels() if shared else scalemlo_levels(held)

    train, meta = data()
    lm = tiny_lm()
    torch.manual_seed(2)
    weigher = WeightNet(hidden=16)
    upper_opt = torch.optim.SGD(weigher.parameters(), lr=0.0)
    lower = LM("lm", lm, torch.optim.Adam(lm.parameters(), lr=LM_LR), [train])
    upper = Reweight(
        "reweight",
        weigher,
        upper_opt,
        [meta],
        config=LevelConfig(
            method=method, shared_forward=shared, shared_forward_difference="central" if central else "one_sided"
        ),
    )
    # shared: the meta step comes before the LM step of its iteration, so one iteration more first
    engine = Engine([lower, upper], {"reweight": ["lm"]}, EngineConfig(max_steps=WARM + shared, progress_bar=False))
    engine.run()
    for group in upper.optimizer.param_groups:
        group["lr"] = 1.0
    before = flat(weigher.parameters())
    engine.step()
    return before - flat(weigher.parameters())


def run_betty(method: str) -> torch.Tensor:
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine

    LM, Reweight = betty_problems()

    train, meta = data()
    lm = tiny_lm()
    torch.manual_seed(2)
    weigher = WeightNet(hidden=16)
    lower = LM(
        name="lm",
        module=lm,
        optimizer=torch.optim.Adam(lm.parameters(), lr=LM_LR),
        train_data_loader=[train],
        config=Config(type={"finite_difference": "darts", "sama": "sama"}[method]),
    )
    upper = Reweight(
        name="reweight",
        module=weigher,
        optimizer=torch.optim.SGD(weigher.parameters(), lr=0.0),
        train_data_loader=[meta],
        config=Config(),
    )
    engine = Engine(
        problems=[upper, lower],
        dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        config=EngineConfig(train_iters=WARM + 1, valid_step=10**9),
    )
    engine.train()
    for _ in range(WARM):
        engine.global_step += 1
        engine.train_step()
    for group in upper.optimizer.param_groups:
        group["lr"] = 1.0
    before = flat(weigher.parameters())
    engine.global_step += 1
    engine.train_step()
    return before - flat(weigher.parameters())


def references() -> dict[str, torch.Tensor]:
    """Float64 replay of the LM's Adam steps and the two reference hypergradients."""
    train, meta = data()
    lm = tiny_lm().double()
    torch.manual_seed(2)
    weigher = WeightNet(hidden=16).double()
    params = list(lm.parameters())
    opt = torch.optim.Adam(params, lr=LM_LR)

    def f_lower(detach: bool = True):
        losses = per_example_loss(lm, train[0])
        return (weigher(losses.detach() if detach else losses) * losses).mean()

    for step in range(WARM + 1):
        if step == WARM:
            # per parameter: deepcopy(opt.state) would copy the keys too, and no parameter would be found
            state_before = {p: copy.deepcopy(opt.state[p]) for p in params if p in opt.state}
            theta_prev = [p.detach().clone() for p in params]
        weigher.requires_grad_(False)
        opt.zero_grad()
        f_lower().backward()
        weigher.requires_grad_(True)
        last_grads = [p.grad.detach().clone() for p in params]
        opt.step()
    v = torch.autograd.grad(per_example_loss(lm, meta[0]).mean(), params)
    # (du/dg)^T v through a written-out Adam step at the last gradient
    b1, b2 = opt.param_groups[0]["betas"]
    eps = opt.param_groups[0]["eps"]
    sens = []
    for p, g, vi, prev in zip(params, last_grads, v, theta_prev):
        st = state_before[p] if p in state_before else {}
        t = float(st.get("step", 0)) + 1
        m0 = st.get("exp_avg", torch.zeros_like(p))
        s0 = st.get("exp_avg_sq", torch.zeros_like(p))
        gv = g.clone().requires_grad_(True)
        m, s = b1 * m0 + (1 - b1) * gv, b2 * s0 + (1 - b2) * gv * gv
        root = (s + 1e-300).sqrt()  # d sqrt(s) at s = 0 is inf x 0 where g = 0; its true limit is 0
        new = prev - LM_LR / (1 - b1**t) * m / (root / (1 - b2**t) ** 0.5 + eps)
        sens.append(-torch.autograd.grad(new, gv, grad_outputs=vi)[0])  # -(du/dg)^T v = w
    out = {}
    for name, w in (("finite_difference", [LM_LR * vi for vi in v]), ("sama", sens)):
        for detach in (True, False):
            g = torch.autograd.grad(f_lower(detach), params, create_graph=True)
            mixed = torch.autograd.grad(sum((gi * wi).sum() for gi, wi in zip(g, w)), list(weigher.parameters()))
            out[(name, detach)] = -flat(mixed)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure() -> list[dict]:
    refs = references()
    systems = [
        ("scalemlo", run_scalemlo),
        ("scalemlo-held", lambda method: run_scalemlo(method, held=True)),
        ("scalemlo-shared", lambda method: run_scalemlo(method, shared=True)),
        ("scalemlo-shared-central", lambda method: run_scalemlo(method, shared=True, central=True)),
    ]
    if importlib.util.find_spec("betty") is not None:
        systems.append(("betty", run_betty))
    rows = []
    for method in ("finite_difference", "sama"):
        for system, runner in systems:
            g = runner(method)
            rows.append(
                {
                    "system": system,
                    "method": method,
                    "cosine_vs_float64": cosine(g, refs[(method, True)]),
                    "rel_err_vs_float64": rel_err(g, refs[(method, True)]),
                    "cosine_vs_float64_undetached": cosine(g, refs[(method, False)]),
                    "rel_err_vs_float64_undetached": rel_err(g, refs[(method, False)]),
                }
            )
    return rows


def main() -> None:
    rows = measure()
    for r in rows:
        print(
            f"{r['system']:>15} {r['method']:>17}: against the float64 reference cosine "
            f"{r['cosine_vs_float64']:.6f}, rel. error {r['rel_err_vs_float64']:.3g}; with the weight net's "
            f"input not detached: cosine {r['cosine_vs_float64_undetached']:.6f}, "
            f"rel. error {r['rel_err_vs_float64_undetached']:.3g}"
        )
    out = Path(__file__).resolve().parent / "results" / "hypergradient_accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
