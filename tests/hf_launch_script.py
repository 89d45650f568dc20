"""A user's Trainer script with ReweightingTrainer, for any launcher; writes what each rank saw as JSON.

Like ``tests/hf_plain_script.py`` (argument parsing, a tiny model, data, train; no scalemlo set-up call), and
at the end every rank writes ``OUTPUT_DIR/rank{process_index}.json``: the world size and process index the
arguments and the accelerator report, accelerate's distributed type, the ZeRO stage of the model's DeepSpeed
engine (``null`` without one), the steps trained, the training loss and the logged losses.

    accelerate launch --config_file configs/accelerate/zero2.yaml tests/hf_launch_script.py --output_dir /tmp/t
"""

from __future__ import annotations

import json
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
    "max_steps": 3,
    "use_cpu": True,
    "report_to": [],
    "save_strategy": "no",
    "reweighting": "source",
    "disable_tqdm": True,
    "logging_steps": 1,
}


def zero_stage(trainer: ReweightingTrainer) -> int | None:
    """The stage the model's DeepSpeed engine runs at, as the engine reports it; None without DeepSpeed."""
    engine = trainer.model_wrapped
    return engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None


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
    )
    print(f"rank {args.process_index}: training", flush=True)
    result = trainer.train()
    seen = {
        "world_size": args.world_size,
        "process_index": args.process_index,
        "num_processes": trainer.accelerator.num_processes,
        "accelerator_process_index": trainer.accelerator.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "deepspeed": trainer.is_deepspeed_enabled,
        "zero_stage": zero_stage(trainer),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "meta_losses": [e["meta/loss"] for e in trainer.state.log_history if "meta/loss" in e],
    }
    Path(args.output_dir, f"rank{args.process_index}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
    from scalemlo.checkpoint import barrier
    from scalemlo.testing import end_launched_rank

    barrier()  # every rank done and written before any leaves
    end_launched_rank()  # after a final barrier (see scalemlo.testing.end_launched_rank)
