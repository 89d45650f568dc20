"""One benchmark configuration in its own process: time MLO reweighting steps.

    python benchmarks/reweighting_worker.py --system scalemlo --method finite_difference --size 4m --steps 8

Prints one JSON line: per-step wall times (after warm-up) and the process's
peak RSS. The orchestrator (benchmarks/reweighting.py) runs many of these in
interleaved rounds. Task: GPT-2-style causal LM (random token data, batch 8 x
64 tokens), per-example Meta-Weight-Net reweighting, Adam on both levels.

Systems:
- plain:    weighted fine-tuning in plain torch (the weight net is fixed);
- betty:    Betty 0.2.1 (``darts`` for finite_difference, ``sama``);
- scalemlo: this library (levels in DeepSpeed ZeRO-0 fp32 engines);
- scalemlo-shared: the same with ``LevelConfig.shared_forward`` (the LM level declared
  reweighted; the meta step inside the LM's step, on its forward: 7 units instead of 8).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

SIZES = {
    "4m": dict(vocab_size=8192, n_embd=256, n_layer=2, n_head=4, n_positions=64),
    "124m": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
}
BATCH, TOKENS = 8, 64
LM_LR, META_LR = 1e-4, 1e-3


def make_lm(size: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**SIZES[size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class WeightNet(torch.nn.Module):
    """Meta-Weight-Net: per-example loss -> weight in (0, 1)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1), torch.nn.Sigmoid()
        )

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.net(losses.unsqueeze(-1)).squeeze(-1)


def per_example_loss(lm: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, shape (batch,)."""
    logits = lm(input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    )
    return losses.view(input_ids.size(0), -1).mean(1)


def batches(size: str, count: int, seed: int) -> list[tuple[torch.Tensor]]:
    """Random token batches, each a 1-tuple ``(input_ids,)`` (Betty unpacks batches as sequences)."""
    g = torch.Generator().manual_seed(seed)
    vocab = SIZES[size]["vocab_size"]
    return [(torch.randint(0, vocab, (BATCH, TOKENS), generator=g),) for _ in range(count)]


# ---- the three systems -------------------------------------------------------------------------


def plain_trainer(size: str):
    """Weighted fine-tuning in plain torch (the weight net fixed): (lm, step), ``step(i)`` one optimizer step
    on batch ``i`` (mod 4)."""
    lm, weigher = make_lm(size), WeightNet()
    weigher.requires_grad_(False)
    opt = torch.optim.Adam(lm.parameters(), lr=LM_LR)
    data = batches(size, 4, 0)

    def step(i: int) -> None:
        losses = per_example_loss(lm, data[i % len(data)][0])
        loss = (weigher(losses.detach()) * losses).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return lm, step


def run_plain(args) -> tuple[list[float], int]:
    lm, plain_step = plain_trainer(args.size)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        plain_step(step)
        times.append(time.perf_counter() - start)
    return times[args.warmup :], sum(p.numel() for p in lm.parameters())


def scalemlo_levels(held: bool = False):
    """The two scalemlo level classes of the task: (LM, Reweight).

    ``held``: the weight net's input through ``Level.held`` (constant in every hypergradient
    evaluation, as in the step; one extra no-grad forward per hypergradient), else ``detach()``
    as Betty's task does.
    """
    from scalemlo import Level

    class LM(Level):
        def training_step(self, batch):
            losses = per_example_loss(self.module, batch[0])
            inputs = self.held(losses) if held else losses.detach()
            return (self.uppers["reweight"](inputs) * losses).mean()

    class Reweight(Level):
        def training_step(self, batch):
            return per_example_loss(self.lowers["lm"].module, batch[0]).mean()

    return LM, Reweight


def scalemlo_shared_levels():
    """The task's levels declared reweighted, for ``LevelConfig.shared_forward``: (LM, Reweight)."""
    from scalemlo import Level

    _, Reweight = scalemlo_levels()

    class LM(Level):
        def per_example_losses(self, batch):
            return per_example_loss(self.module, batch[0])

        def example_weights(self, batch, losses):
            return self.uppers["reweight"](losses)

    return LM, Reweight


def betty_problems():
    """The two Betty problem classes of the task: (LM, Reweight)."""
    from betty.problems import ImplicitProblem

    class LM(ImplicitProblem):
        def training_step(self, batch):
            losses = per_example_loss(self.module, batch[0])
            return (self.reweight(losses.detach()) * losses).mean()

    class Reweight(ImplicitProblem):
        def training_step(self, batch):
            return per_example_loss(self.lm.module, batch[0]).mean()

    return LM, Reweight


def scalemlo_program(size: str, method: str, unroll: int, shared: bool):
    """The task as a scalemlo program: (engine, lower, upper)."""
    from scalemlo import Engine, EngineConfig, LevelConfig

    LM, Reweight = scalemlo_shared_levels() if shared else scalemlo_levels()
    lm, weigher = make_lm(size), WeightNet()
    lower = LM("lm", lm, torch.optim.Adam(lm.parameters(), lr=LM_LR), batches(size, 4, 0))
    upper = Reweight(
        "reweight",
        weigher,
        torch.optim.Adam(weigher.parameters(), lr=META_LR),
        batches(size, 4, 1),
        config=LevelConfig(method=method, unroll_steps=unroll, shared_forward=shared),
    )
    engine = Engine([lower, upper], {"reweight": ["lm"]}, EngineConfig(max_steps=0, progress_bar=False))
    return engine, lower, upper


def run_scalemlo(args) -> tuple[list[float], int]:
    engine, lower, _ = scalemlo_program(args.size, args.method, args.unroll, args.system == "scalemlo-shared")
    lm = lower.module
    # One measured "step" is one full cycle of unroll_steps lower steps and one
    # meta step, divided by unroll_steps: time per lower step, meta cost amortized.
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        for _ in range(args.unroll):
            engine.step()
        times.append((time.perf_counter() - start) / args.unroll)
    return times[args.warmup :], sum(p.numel() for p in lm.parameters())


def run_betty(args) -> tuple[list[float], int]:
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine

    LM, Reweight = betty_problems()

    lm, weigher = make_lm(args.size), WeightNet()
    hyper_type = {"finite_difference": "darts", "sama": "sama"}[args.method]
    lower = LM(
        name="lm",
        module=lm,
        optimizer=torch.optim.Adam(lm.parameters(), lr=LM_LR),
        train_data_loader=batches(args.size, 4, 0),
        config=Config(type=hyper_type, unroll_steps=args.unroll),
    )
    upper = Reweight(
        name="reweight",
        module=weigher,
        optimizer=torch.optim.Adam(weigher.parameters(), lr=META_LR),
        train_data_loader=batches(args.size, 4, 1),
        config=Config(),
    )
    engine = Engine(
        problems=[upper, lower],
        dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        config=EngineConfig(train_iters=args.warmup + args.steps, valid_step=10**9),
    )
    engine.train()
    times = []
    for _ in range(args.warmup + args.steps):
        engine.global_step += 1
        start = time.perf_counter()
        engine.train_step()
        times.append(time.perf_counter() - start)
    return times[args.warmup :], sum(p.numel() for p in lm.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["plain", "betty", "scalemlo", "scalemlo-shared"], required=True)
    parser.add_argument("--method", choices=["finite_difference", "sama", "none"], default="finite_difference")
    parser.add_argument("--size", choices=sorted(SIZES), default="4m")
    parser.add_argument("--unroll", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runner = {"plain": run_plain, "betty": run_betty, "scalemlo": run_scalemlo, "scalemlo-shared": run_scalemlo}[
        args.system
    ]
    times, params = runner(args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "system": args.system,
                "method": args.method if args.system != "plain" else "none",
                "size": args.size,
                "unroll_steps": args.unroll,
                "step_s": times,
                "peak_rss_mb": peak_mb,
                "params": params,
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
