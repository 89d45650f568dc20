"""A user's Trainer script with ReweightingTrainer: argument parsing, a model, data, train; no scalemlo set-up call.

Run alone, or under ``deepspeed --num_gpus N`` / ``torchrun --nproc_per_node N``; with ``--deepspeed
configs/ds/trainer_zero{0,1,2,3}.json`` or without. Prints ``trained N steps on W ranks`` on rank 0 at the end.

    python tests/hf_plain_script.py --output_dir /tmp/t --deepspeed configs/ds/trainer_zero3.json
    torchrun --nproc_per_node 2 tests/hf_plain_script.py --output_dir /tmp/t --deepspeed configs/ds/trainer_zero3.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser

from scalemlo.hf import ReweightingArguments, ReweightingTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_toy import T, V, collate, rows  # noqa: E402

DEFAULTS = {
    "per_device_train_batch_size": 4,
    "per_device_meta_batch_size": 4,
    "max_steps": 2,
    "use_cpu": True,
    "report_to": [],
    "save_strategy": "no",
    "reweighting": "source",
    "disable_tqdm": True,
}


def main() -> None:
    parser = HfArgumentParser(ReweightingArguments)
    parser.set_defaults(**DEFAULTS)
    (args,) = parser.parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=T))
    trainer = ReweightingTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows(32, True, 0)),
        meta_dataset=Dataset.from_list(rows(16, False, 1)),
        data_collator=collate,
        reweighter_kwargs={"sources": ["clean", "noisy"]},
    )
    trainer.train()
    if trainer.is_world_process_zero():
        print(f"trained {trainer.state.global_step} steps on {args.world_size} ranks", flush=True)


if __name__ == "__main__":
    main()
    from scalemlo.checkpoint import barrier
    from scalemlo.testing import end_launched_rank

    barrier()  # every rank done and written before any leaves
    end_launched_rank()  # after a final barrier (see scalemlo.testing.end_launched_rank)
