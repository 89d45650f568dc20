"""A ReweightingTrainer run that checkpoints as it goes: the subject of the Trainer's kill-and-resume check.

A tiny GPT-2 (dropout on) on counting sequences with a noisy source, per-source
weights learned on a clean meta set, unroll_steps 2, gradient accumulation 2,
a checkpoint every 2 steps (the last 2 kept). It prints ``step N`` after
every optimizer step; with ``--resume`` it continues from the latest complete
checkpoint in its output directory, if any. At the end every rank writes the
model's and the weighting model's parameters (ZeRO-3: the full fp32 values)
to ``<out>.rank<R>.pt``. No set-up call: ``ReweightingArguments`` starts the process group DeepSpeed needs.

    python tests/resume/trainer_program.py --output_dir /tmp/t --out /tmp/o [--resume]
    deepspeed --num_gpus 2 tests/resume/trainer_program.py --stage 3 --output_dir /tmp/t --out /tmp/o
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from scalemlo.distributed import add_launcher_arguments, rank, world_size
from scalemlo.hf import ReweightingArguments, ReweightingTrainer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from hf_toy import T, V, collate, rows  # noqa: E402


class Announce(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if rank() == 0:
            print(f"step {state.global_step}", flush=True)


def main() -> None:
    parser = add_launcher_arguments(argparse.ArgumentParser())
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fp16", action="store_true", help="the model in DeepSpeed's fp16 engine")
    options = parser.parse_args()
    if options.fp16:
        from scalemlo.testing import allow_deepspeed_fp16_on_cpu

        allow_deepspeed_fp16_on_cpu()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=V,
            n_positions=T,
            attn_implementation="eager",
            resid_pdrop=0.1,
            embd_pdrop=0.1,
        )
    )
    args = ReweightingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=options.steps,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        seed=0,
        meta_learning_rate=0.1,
        per_device_meta_batch_size=4,
        reweighting="source",
        unroll_steps=2,
        deepspeed=str(ROOT / "configs" / "ds" / f"trainer_zero{options.stage}.json"),
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        logging_steps=1,
        disable_tqdm=True,
        overwrite_output_dir=True,
        fp16=options.fp16,
    )
    trainer = ReweightingTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows(64, True, 0)),
        meta_dataset=Dataset.from_list(rows(16, False, 1)),
        data_collator=collate,
        reweighter_kwargs={"sources": ["clean", "noisy"]},
        callbacks=[Announce()],
    )
    # the Trainer's side sees the launcher's ranks: one process zero, the training data split between ranks
    assert (trainer.accelerator.num_processes, trainer.args.process_index) == (world_size(), rank()), (
        trainer.accelerator.num_processes,
        trainer.args.process_index,
        world_size(),
        rank(),
    )
    resume = options.resume and Path(options.output_dir).is_dir() and get_last_checkpoint(options.output_dir)
    if resume and rank() == 0:
        print(f"resumed from {Path(resume).name}", flush=True)
    trainer.train(resume_from_checkpoint=resume or None)
    lm = trainer._model_level
    if lm.backend.partitioned:
        from deepspeed.utils import safe_get_full_fp32_param

        model_params = [safe_get_full_fp32_param(p).clone() for p in lm.params]
    else:
        model_params = [p.detach().clone() for p in lm.params]
    state = {"model": model_params, "weights": [p.detach().clone() for p in trainer.reweighter.parameters()]}
    if options.fp16:  # DeepSpeed's loss scale and overflow count must resume too
        engine = trainer.model_wrapped
        state["fp16"] = [float(engine.optimizer.loss_scale), engine.skipped_steps]
    torch.save(state, f"{options.out}.rank{rank()}.pt")


if __name__ == "__main__":
    main()
    from scalemlo.checkpoint import barrier
    from scalemlo.testing import end_launched_rank

    barrier()  # every rank done and written before any leaves
    end_launched_rank()  # after a final barrier (see scalemlo.testing.end_launched_rank)
