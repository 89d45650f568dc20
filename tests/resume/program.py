"""A small MLO program that checkpoints as it runs: the subject of the kill-and-resume check.

A tiny GPT-2 (dropout on, so the random generators matter) under a
Meta-Weight-Net, ``unroll_steps`` 3, the LM with gradient accumulation 2. The
LM reads a ``DataLoader`` (a ``RandomSampler`` with its own seeded generator
on one process, a ``DistributedSampler`` on several ranks); the weight net
reads a plain list. It prints ``step N`` after every global iteration (the
driver kills it on one of them), saves every ``--save-every`` iterations
keeping the last 2, and at the end writes every level's local parameter
shards (and Adam state) of this rank to ``<out>.rank<R>.pt``.

    python tests/resume/program.py --method sama --checkpoint-dir /tmp/c --out /tmp/o [--resume]
    deepspeed --num_gpus 2 tests/resume/program.py --stage 3 --method penalty ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import zero_suite as suite  # noqa: E402

from scalemlo import Engine, EngineConfig, LevelConfig  # noqa: E402
from scalemlo.checkpoint import complete_checkpoints  # noqa: E402
from scalemlo.distributed import add_launcher_arguments, ensure_distributed, rank, rank_share, world_size  # noqa: E402


def lm_with_dropout() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=suite.VOCAB,
        n_positions=suite.SEQ,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


def build(args) -> Engine:
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

    train = torch.cat(suite.batches("train", [0, 1, 2], 4))  # 48 sequences
    dataset = TensorDataset(train)
    if world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        dataset, batch_size=4, sampler=sampler, collate_fn=lambda items: torch.stack([i[0] for i in items])
    )
    meta = [rank_share(b) for b in suite.batches("meta", [0, 1], 3)]  # a plain list, 3 batches
    lm, net = lm_with_dropout(), suite.weight_net(torch.float32)
    stage = {"zero_optimization": {"stage": args.stage}}
    model = suite.Model(
        "model",
        lm,
        torch.optim.Adam(lm.parameters(), lr=1e-2),
        loader,
        config=LevelConfig(gradient_accumulation=2, deepspeed_config=stage),
    )
    weights = suite.Weights(
        "weights",
        net,
        torch.optim.Adam(net.parameters(), lr=1e-2),
        meta,
        config=LevelConfig(method=args.method, unroll_steps=3),
    )
    config = EngineConfig(
        max_steps=args.steps,
        log_every=1,
        progress_bar=False,
        checkpoint_dir=args.checkpoint_dir,
        save_every=args.save_every,
        keep_last=2,
    )
    announce = (lambda engine, metrics: print(f"step {engine.global_step}", flush=True)) if rank() == 0 else None
    return Engine([model, weights], {"weights": ["model"]}, config, callbacks=[announce] if announce else [])


def main(argv=None) -> None:
    parser = add_launcher_arguments(argparse.ArgumentParser())
    parser.add_argument("--method", default="finite_difference")
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint, if any")
    args = parser.parse_args(argv)
    ensure_distributed()
    torch.set_num_threads(1)
    torch.manual_seed(1234)  # the generators dropout draws from; a resume must restore them
    engine = build(args)
    if args.resume and complete_checkpoints(args.checkpoint_dir):
        loaded = engine.load_checkpoint(args.checkpoint_dir)
        if rank() == 0:
            print(f"resumed from {loaded.name}", flush=True)
    engine.run()
    state = {}
    for name, lv in engine.levels.items():
        state[name] = [t.detach().clone() for t in lv.backend.local_shards]
        state[f"{name}.optimizer"] = plain(lv.optimizer.state_dict())
    torch.save(state, f"{args.out}.rank{rank()}.pt")


def plain(value):
    """Tensors, numbers and strings of a (ZeRO) optimizer state dict, in its nesting; other objects dropped."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if plain(v) is not None}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else None


if __name__ == "__main__":
    main()
    from scalemlo.checkpoint import barrier
    from scalemlo.testing import end_launched_rank

    barrier()  # every rank done and written before any leaves
    end_launched_rank()  # after a final barrier (see scalemlo.testing.end_launched_rank)
