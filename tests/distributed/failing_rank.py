"""What a 2-rank launch does when one rank fails (run by tests/test_failing_rank.py).

    deepspeed --num_gpus 2 tests/distributed/failing_rank.py --case raise
    deepspeed --num_gpus 2 tests/distributed/failing_rank.py --case nonfinite --out records.json

``raise``: rank 1's training_step raises on its 3rd batch; rank 1
prints the time it raised. The launch must end soon after, on every rank,
with the original error in its output.

``nonfinite``: rank 1's loss (or, in a second program, its gradient) is NaN
on its 3rd batch (in the lower level's 3rd step, and in the hypergradient
that reads that step), at ZeRO 0 and 3. With ``nonfinite="raise"``
both ranks must raise FloatingPointError at the same step and nothing must
have been written; with ``"skip"`` both must finish with equal, finite
parameters and the same skip counts. Either way no parameter and no optimizer
state may hold a non-finite value.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import zero_suite as suite

from scalemlo import Engine, EngineConfig, LevelConfig
from scalemlo.distributed import add_launcher_arguments, ensure_distributed, rank
from scalemlo.testing import allow_deepspeed_fp16_on_cpu, end_launched_rank

FAULTY = suite.batches("train", [1], 6)[2]  # rank 1's 3rd batch


class Failing(suite.Model):
    fault = "raise"  # raise | loss | gradient

    def training_step(self, ids):
        loss = super().training_step(ids)
        if rank() == 1 and torch.equal(ids, FAULTY):
            if self.fault == "raise":
                print(f"rank 1 raises at {time.time():.3f}", flush=True)
                raise RuntimeError("the original error, raised on rank 1 in training_step")
            if self.fault == "loss":
                return loss * float("nan")
            # finite loss, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
            return loss + torch.sqrt(sum((p * 0).sum() for p in self.module.parameters()))
        return loss


def build(stage: int, fault: str, nonfinite: str) -> Engine:
    Failing.fault = fault
    lm, net = suite.tiny_gpt2(torch.float32), suite.weight_net(torch.float32)
    model = Failing(
        "model",
        lm,
        torch.optim.Adam(lm.parameters(), lr=1e-2),
        suite.batches("train", [rank()], 6),
        config=LevelConfig(deepspeed_config={"zero_optimization": {"stage": stage}}),
    )
    weights = suite.Weights(
        "weights", net, torch.optim.SGD(net.parameters(), lr=1.0), suite.batches("meta", [rank()], 6)
    )
    config = EngineConfig(max_steps=5, log_every=0, progress_bar=False, nonfinite=nonfinite)
    return Engine([model, weights], {"weights": ["model"]}, config)


def shards(engine: Engine) -> list[torch.Tensor]:
    return [t.detach().clone() for lv in engine.levels.values() for t in lv.backend.local_shards]


def nonfinite_case(stage: int, fault: str, nonfinite: str) -> dict:
    import torch.distributed as dist

    engine = build(stage, fault, nonfinite)
    model = engine.levels["model"]
    record = {"stage": stage, "fault": fault, "nonfinite": nonfinite}
    try:
        for _ in range(5):
            engine.step()
        record["outcome"] = "finished"
    except FloatingPointError as exc:
        record["outcome"] = "FloatingPointError"
        record["message"] = str(exc)[:300]
    record["global_step"] = engine.global_step
    record["skipped"] = [model.skipped_batches, model.skipped_steps, engine.levels["weights"].skipped_steps]
    flat = torch.cat([t.reshape(-1) for t in shards(engine)])
    states = [v for lv in engine.levels.values() for s in lv.optimizer.state.values() for v in s.values()]
    record["finite"] = bool(torch.isfinite(flat).all()) and all(
        bool(torch.isfinite(v).all()) for v in states if torch.is_tensor(v) and v.is_floating_point()
    )
    if stage == 0:  # whole parameters: equal on both ranks
        other = flat.clone()
        dist.broadcast(other, src=0)
        record["same_on_every_rank"] = bool(torch.equal(flat, other))
    return record


class InfOnRank1(suite.Weights):
    """The meta loss is inf on rank 1 alone at global step 2 (an fp16 overflow inside a hypergradient)."""

    engine = None

    def training_step(self, ids):
        loss = super().training_step(ids)
        return loss * float("inf") if rank() == 1 and self.engine.global_step == 2 else loss


def fp16_case(kind: str) -> dict:
    """An fp16 lower level under a float32 weight net whose meta loss overflows on rank 1 only: both ranks
    must skip the upper step, lower the same scale, and end equal. ``kind``: "torch" (the torch backend's
    scaler, from 2^16) or "ds0"/"ds3" (DeepSpeed's own fp16 engine at ZeRO 0/3, from 2^8)."""
    import torch.distributed as dist

    lm, net = suite.tiny_gpt2(torch.float16 if kind == "torch" else torch.float32), suite.weight_net(torch.float32)
    if kind == "torch":
        config = LevelConfig(backend="torch", fp16_loss_scaling={"hysteresis": 1})
    else:
        config = LevelConfig(
            deepspeed_config={
                "zero_optimization": {"stage": int(kind[-1])},
                "fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
            }
        )
    model = suite.Model(
        "model", lm, torch.optim.Adam(lm.parameters(), lr=1e-3), suite.batches("train", [rank()], 6), config=config
    )
    weights = InfOnRank1("weights", net, torch.optim.SGD(net.parameters(), lr=1.0), suite.batches("meta", [rank()], 6))
    config = EngineConfig(max_steps=4, log_every=0, progress_bar=False)
    engine = Engine([model, weights], {"weights": ["model"]}, config)
    InfOnRank1.engine = engine
    engine.run()
    flat = torch.cat([p.float().reshape(-1) for lv in engine.levels.values() for p in suite.full_params(lv)])
    other = flat.clone()
    dist.broadcast(other, src=0)
    return {
        "stage": f"fp16-{kind}",
        "fault": "meta-overflow",
        "nonfinite": "raise",
        "outcome": "finished",
        "global_step": engine.global_step,
        "initial_scale": 2.0 ** (16 if kind == "torch" else 8),
        "skipped": [model.overflow_steps, weights.skipped_steps, model.backend.loss_scale],
        "finite": bool(torch.isfinite(flat).all()),
        "same_on_every_rank": bool(torch.equal(flat, other)),
    }


def main() -> None:
    parser = add_launcher_arguments(argparse.ArgumentParser())
    parser.add_argument("--case", choices=["raise", "nonfinite"], required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ensure_distributed()
    torch.set_num_threads(1)
    if args.case == "raise":
        build(3, "raise", "raise").run()
        return
    records = []
    for stage in (0, 3):
        for fault in ("loss", "gradient"):
            for nonfinite in ("raise", "skip"):
                records.append({"rank": rank(), **nonfinite_case(stage, fault, nonfinite)})
    allow_deepspeed_fp16_on_cpu()
    for kind in ("torch", "ds0", "ds3"):
        records.append({"rank": rank(), **fp16_case(kind)})
    import torch.distributed as dist

    gathered = [None, None]
    dist.all_gather_object(gathered, records)
    if rank() == 0 and args.out:
        with open(args.out, "w") as fh:
            json.dump(gathered, fh, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
    end_launched_rank()
