"""Data reweighting on a tiny GPT-2 at every ZeRO stage on several ranks, against one float64 process.

Launched once by ``tests/test_distributed_zero.py`` (``deepspeed --num_gpus 2``);
every configuration runs inside that one launch. For each configuration the
script trains a few MLO steps (lower level with gradient accumulation 2, upper
level on hypergradients), then takes one more hypergradient and records, on
rank 0, the relative error of the final parameters and of the hypergradient
(averaged over ranks) against the same program in float64 on one process
whose batches are the ranks' batches concatenated. It also records whether a
hypergradient left the ZeRO-3 partitions and fp32 master copies bit-identical.

Writes a JSON list of records to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from scalemlo import Engine, EngineConfig, Level, LevelConfig

VOCAB, SEQ, BATCH, STEPS, ACCUMULATION = 64, 8, 4, 2, 2


def tiny_gpt2(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    return GPT2LMHeadModel(config).to(dtype)


def weight_net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Sigmoid())
    return net.to(dtype)


def per_example_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


class Model(Level):
    def training_step(self, ids):
        losses = per_example_loss(self, ids)
        weights = self.uppers["weights"](losses.detach()[:, None]).squeeze(1)
        return (weights.to(losses.dtype) * losses).mean()


class Weights(Level):
    def training_step(self, ids):
        return per_example_loss(self.lowers["model"], ids).mean()


def batches(kind: str, ranks: list[int], count: int) -> list[torch.Tensor]:
    """Batch i of each rank in ``ranks``, concatenated (one rank: that rank's own batches)."""
    out = []
    for i in range(count):
        parts = []
        for r in ranks:
            g = torch.Generator().manual_seed(1000 * r + 10 * i + (kind == "meta"))
            parts.append(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))
        out.append(torch.cat(parts))
    return out


def build(stage: int | None, ranks: list[int], method: str, **upper_kwargs) -> Engine:
    """stage None: the float64 torch-backend reference on one process."""
    dtype = torch.float64 if stage is None else torch.float32
    if stage is None:
        lower_cfg = LevelConfig(backend="torch", gradient_accumulation=ACCUMULATION)
        upper_cfg = LevelConfig(backend="torch", method=method, **upper_kwargs)
    else:
        lower_cfg = LevelConfig(
            gradient_accumulation=ACCUMULATION, deepspeed_config={"zero_optimization": {"stage": stage}}
        )
        upper_cfg = LevelConfig(method=method, **upper_kwargs)
    lm, net = tiny_gpt2(dtype), weight_net(dtype)
    model = Model("model", lm, torch.optim.Adam(lm.parameters(), lr=1e-3), batches("train", ranks, 8), config=lower_cfg)
    weights = Weights(
        "weights", net, torch.optim.SGD(net.parameters(), lr=1.0), batches("meta", ranks, 8), config=upper_cfg
    )
    return Engine([model, weights], {"weights": ["model"]}, EngineConfig(max_steps=STEPS * ACCUMULATION, log_every=0))


def full_params(level: Level) -> list[torch.Tensor]:
    if level.backend.partitioned:
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p).double() for p in level.params]
    return [p.detach().double().clone() for p in level.params]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def run(stage, ranks, method, **kw) -> dict:
    """Train, then one more hypergradient; returns flat parameters and the rank-averaged hypergradient."""
    import torch.distributed as dist

    engine = build(stage, ranks, method, **kw)
    engine.run()
    model = engine.levels["model"]
    untouched = None
    if stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        coords = [t.clone() for t in model.backend.coords]
        masters = [safe_get_local_fp32_param(p).clone() for p in model.params]
    hg = flat(engine.hypergradient("weights"))
    if stage == 3:
        untouched = all(torch.equal(a, b) for a, b in zip(coords, model.backend.coords)) and all(
            torch.equal(a, safe_get_local_fp32_param(p)) for a, p in zip(masters, model.params)
        )
    if stage is not None and dist.get_world_size() > 1:
        dist.all_reduce(hg)
        hg /= dist.get_world_size()
    return {
        "model": flat(full_params(model)),
        "weights": flat(full_params(engine.levels["weights"])),
        "hypergradient": hg,
        "untouched": untouched,
    }


CASES = [
    # (method, upper kwargs, stages)
    ("finite_difference", {}, [0, 1, 2, 3]),
    ("cg", {"second_order": "finite_difference", "cg_iterations": 3}, [0, 3]),
    ("cg", {"second_order": "autograd", "cg_iterations": 3}, [1, 2]),
    ("neumann", {"second_order": "finite_difference", "neumann_iterations": 3, "neumann_alpha": 0.1}, [3]),
    ("penalty", {"penalty_steps": 2}, [3]),
    ("sama", {}, [0]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    records = []
    for method, kw, stages in CASES:
        reference = run(None, list(range(world)), method, **kw)
        for stage in stages:
            got = run(stage, [rank], method, **kw)
            records.append(
                {
                    "method": method,
                    "settings": kw,
                    "stage": stage,
                    "world_size": world,
                    "model_rel_err": rel(got["model"], reference["model"]),
                    "model_moved": rel(got["model"], flat(full_params_initial())),
                    "weights_rel_err": rel(got["weights"], reference["weights"]),
                    "hypergradient_rel_err": rel(got["hypergradient"], reference["hypergradient"]),
                    "hypergradient_cosine": float(
                        F.cosine_similarity(got["hypergradient"], reference["hypergradient"], dim=0)
                    ),
                    "hypergradient_norm": float(got["hypergradient"].norm()),
                    "zero3_untouched": got["untouched"],
                }
            )
            if rank == 0:
                print(json.dumps(records[-1]), flush=True)
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(records, fh, indent=1)


def full_params_initial() -> list[torch.Tensor]:
    return [p.detach().double() for p in tiny_gpt2(torch.float32).parameters()]


if __name__ == "__main__":
    main()
