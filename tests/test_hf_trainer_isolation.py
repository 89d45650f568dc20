"""Trainers in one process share no DeepSpeed or accelerate state, and a one-process run is not DDP.

No test here calls ``reset_trainer_state``, except to check that it still works for those who do. Before:
after a Trainer with ``--deepspeed``, a later ``ReweightingTrainer`` without it ran under DeepSpeed's default
ZeRO-2 (the ``Accelerator`` leaves ``ACCELERATE_USE_DEEPSPEED=true`` in the environment and its state in
accelerate's shared dict), and once a process group existed (``ensure_distributed``, or the previous
run's), accelerate took the ``LOCAL_RANK=0`` it sets for a distributed run and wrapped the model in
``DistributedDataParallel`` over one process (with a ``find_unused_parameters`` warning at each step).
"""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from hf_toy import rows
from test_hf_trainer import ds, parameters, trainer
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.training_args import ParallelMode

from scalemlo.distributed import ensure_distributed
from scalemlo.hf import reset_trainer_state
from scalemlo.hf.state import forget_leftover_deepspeed_flag, is_one_process_run


@pytest.fixture(autouse=True)
def process_group():
    ensure_distributed()  # as a user's set-up call, or an earlier run in the process, leaves it (LOCAL_RANK=0)
    yield


def plain_trainer_with_deepspeed(tmp_path) -> Trainer:
    """A baseline as a user writes it: transformers' own Trainer, --deepspeed ZeRO-2, the same toy data."""
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        deepspeed=ds(2),
        disable_tqdm=True,
    )

    def collate(items):
        return {k: torch.tensor([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")}

    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows(16, 0, 0)), data_collator=collate)


def is_plain(t) -> bool:
    """Trained by plain torch in one process: no DeepSpeed engine, no DDP wrapper."""
    from accelerate.utils import DistributedType

    return (
        not t.is_deepspeed_enabled
        and type(t.model_wrapped) is GPT2LMHeadModel
        and t.accelerator.distributed_type == DistributedType.NO
        and t.args.parallel_mode != ParallelMode.DISTRIBUTED
    )


def test_trainers_in_one_process_share_no_state(tmp_path):
    """A learned run, a DeepSpeed baseline (transformers' Trainer), the learned run again, a ZeRO-3 learned run
    and the learned run once more, in one process: each plain run is plain and bit-identical to the first;
    the ZeRO-3 run is ZeRO-3 and follows the same trajectory (as in test_hf_trainer)."""
    first = trainer(tmp_path / "first", max_steps=3)
    first.train()
    assert is_plain(first)
    reference = parameters(first)

    baseline = plain_trainer_with_deepspeed(tmp_path / "baseline")
    baseline.train()
    assert baseline.is_deepspeed_enabled and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"  # left set

    again = trainer(tmp_path / "again", max_steps=3)
    assert not is_deepspeed_zero3_enabled()
    again.train()
    assert is_plain(again) and torch.equal(parameters(again), reference)

    zero3 = trainer(tmp_path / "zero3", deepspeed=ds(3), max_steps=3)
    assert is_deepspeed_zero3_enabled()
    zero3.train()
    assert zero3.is_deepspeed_enabled and zero3.accelerator.state.deepspeed_plugin.zero_stage == 3
    assert float((parameters(zero3) - reference).norm() / reference.norm()) < 1e-5

    last = trainer(tmp_path / "last", max_steps=3)
    assert not is_deepspeed_zero3_enabled()
    last.train()
    assert is_plain(last) and torch.equal(parameters(last), reference)

    reset_trainer_state()  # still works for scripts that call it
    after_reset = trainer(tmp_path / "after_reset", max_steps=3)
    after_reset.train()
    assert is_plain(after_reset) and torch.equal(parameters(after_reset), reference)


def test_a_one_process_run_is_not_wrapped_in_ddp(tmp_path, recwarn):
    """With a one-process group started before the arguments are built (the fixture), nothing is DDP and no
    DDP warning is given."""
    import warnings

    t = trainer(tmp_path, max_steps=2)
    assert t.args.world_size == 1 and t.args.parallel_mode != ParallelMode.DISTRIBUTED
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.train()
    assert is_plain(t)
    assert not [w for w in caught if "find_unused_parameters" in str(w.message)]
    assert os.environ["LOCAL_RANK"] == "0"  # restored for DeepSpeed's engines (the weighting model's)


def test_launchers_settings_are_kept(monkeypatch):
    """``accelerate launch`` sets ACCELERATE_USE_DEEPSPEED with ACCELERATE_CONFIG_DS_FIELDS beside it: kept.
    Alone, it is an earlier Accelerator's: dropped for a run without --deepspeed. Under a launcher, the run is
    distributed whatever its size (LOCAL_RANK stays visible)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "zero_stage")
    forget_leftover_deepspeed_flag(None)
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"
    monkeypatch.delenv("ACCELERATE_CONFIG_DS_FIELDS")
    forget_leftover_deepspeed_flag("ds.json")
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"  # this run asks for DeepSpeed itself
    forget_leftover_deepspeed_flag(None)
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ
    assert is_one_process_run(None) and not is_one_process_run("ds.json")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    assert not is_one_process_run(None)
