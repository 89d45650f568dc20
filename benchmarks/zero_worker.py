"""One ZeRO scaling configuration, launched on several ranks: time and per-rank memory of MLO reweighting.

    deepspeed --num_gpus 2 benchmarks/zero_worker.py --stage 3 --size 124m --system scalemlo

Same task as benchmarks/reweighting_worker.py (GPT-2-style LM, per-example
Meta-Weight-Net, Adam on both levels, batch 8 x 64 tokens *per rank*), with the
LM level in a DeepSpeed engine at the given ZeRO stage on every rank and the
weight net at ZeRO-0. ``--system plain`` trains the LM level alone (the weight
net fixed) in the same engine: data-parallel fine-tuning without MLO.

Every rank prints one JSON line: step times after warm-up, peak RSS (the
high-water mark, model construction included), the RSS after the last step,
and the number of LM parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reweighting_worker import LM_LR, META_LR, SIZES, WeightNet, batches, make_lm, scalemlo_levels  # noqa: E402

SIZES = {
    **SIZES,
    "350m": dict(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
    "774m": dict(vocab_size=50257, n_embd=1280, n_layer=36, n_head=20, n_positions=1024),  # GPT-2 large
}


def zero_settings(stage: int) -> dict:
    """ZeRO buckets sized to the model: "auto", which scalemlo fills from config.hidden_size as Hugging Face does.

    DeepSpeed's defaults (5e8-element buckets: 2 GB each in fp32) are sized for
    large GPUs and would dominate per-rank memory here.
    """
    settings = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 3:
        settings.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    else:
        settings.update(allgather_bucket_size="auto")
    return settings


def live_mb() -> float:
    """RSS after returning freed heap pages to the system (glibc malloc_trim): memory actually in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_mb()


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=[0, 1, 2, 3], required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="4m")
    parser.add_argument("--system", choices=["scalemlo", "plain"], default="scalemlo")
    parser.add_argument("--method", default="finite_difference")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--zero", default="{}", help="JSON merged into zero_optimization (e.g. live-parameter limits)")
    parser.add_argument("--whole", action="store_true", help="at ZeRO-3, build the model whole (not under zero_init)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the LM's blocks")
    parser.add_argument(
        "--fused_adam",
        action="store_true",
        help="torch's fused Adam for the LM (in place: no full-size temporaries in its step)",
    )
    parser.add_argument("--bf16", action="store_true", help="the LM level in bf16 (the weight net stays fp32)")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()

    import deepspeed
    import reweighting_worker

    import scalemlo
    from scalemlo import Engine, EngineConfig, Level, LevelConfig

    reweighting_worker.SIZES.update(SIZES)
    deepspeed.init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    baseline_live = live_mb()  # the runtime alone (torch, DeepSpeed, the process group), before any model
    ds_config = {"zero_optimization": {**zero_settings(args.stage), **json.loads(args.zero)}}
    if args.bf16:
        ds_config["bf16"] = {"enabled": True}
    # At ZeRO-3 the LM is built partitioned (scalemlo.zero_init: deepspeed.zero.Init), so no rank
    # holds it whole; with --whole (and at stages 0-2) every rank builds it whole and
    # deepspeed.initialize partitions it, so the peak includes one whole fp32 copy.
    with scalemlo.zero_init(None if args.whole else {"zero_optimization": ds_config["zero_optimization"]}):
        lm = make_lm(args.size)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters())
    if args.checkpointing:  # each block's activations recomputed in the backward instead of kept
        lm.config.use_cache = False
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weigher = WeightNet()
    LM, Reweight = scalemlo_levels()
    lm_config = LevelConfig(deepspeed_config=ds_config)
    train = batches(args.size, 4, 10 * rank)
    if args.system == "plain":
        weigher.requires_grad_(False)

        class Plain(Level):
            def training_step(self, batch):
                losses = reweighting_worker.per_example_loss(self.module, batch[0])
                return (weigher(losses.detach()) * losses).mean()

        adam = torch.optim.Adam(lm.parameters(), lr=LM_LR, fused=args.fused_adam or None)
        levels = [Plain("lm", lm, adam, train, config=lm_config)]
        edges = {}
    else:
        adam = torch.optim.Adam(lm.parameters(), lr=LM_LR, fused=args.fused_adam or None)
        lower = LM("lm", lm, adam, train, config=lm_config)
        upper = Reweight(
            "reweight",
            weigher,
            torch.optim.Adam(weigher.parameters(), lr=META_LR),
            batches(args.size, 4, 10 * rank + 1),
            config=LevelConfig(method=args.method),
        )
        levels, edges = [lower, upper], {"reweight": ["lm"]}
    engine = Engine(levels, edges, EngineConfig(max_steps=0, progress_bar=False))
    times = []
    for _ in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        engine.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    record = {
        "rank": rank,
        "world_size": world,
        "system": args.system,
        "method": args.method if args.system == "scalemlo" else "none",
        "stage": args.stage,
        "size": args.size,
        "params": params,
        "step_s": times[args.warmup :],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "end_rss_mb": rss_mb(),
        "end_live_mb": live_mb(),
        "baseline_live_mb": baseline_live,
        "zero": ds_config["zero_optimization"],
        "built": "whole" if args.whole or args.stage != 3 else "zero_init",
        "checkpointing": args.checkpointing,
        "fused_adam": args.fused_adam,
        "precision": "bf16" if args.bf16 else "fp32",
        "first_step_s": times[0],
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
