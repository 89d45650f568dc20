"""LoRA through peft at ZeRO-2 and across a resume.

ZeRO-2 is checked against the run without DeepSpeed (a second backend: the same adapter and weighting
parameters to 1e-5; sama is refused at ZeRO 1-3), a resumed run against the uninterrupted one (bit-identical,
LoRA dropout on). The model and data are test_hf_trainer_peft's.
"""

from __future__ import annotations

import pytest
import torch
from test_hf_trainer import ds, fresh_trainer_state  # noqa: F401 (fixture)
from test_hf_trainer_peft import METHODS, final_vector, peft_trainer, split
from transformers import TrainerCallback

from scalemlo.hf import reset_trainer_state

pytest.importorskip("peft")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "sama"])  # sama is refused at ZeRO 1-3
def test_zero2_trains_the_adapter_as_without_deepspeed(tmp_path, method):
    kw = {"hypergradient_method": method, "max_steps": 3, "neumann_iterations": 3, "cg_iterations": 3}
    reference = peft_trainer(tmp_path / "zero0", **kw)
    reference.train()
    expected = final_vector(reference)
    reset_trainer_state()
    t = peft_trainer(tmp_path / "zero2", deepspeed=ds(2), **kw)
    base_before, _ = split(t.model)
    t.train()
    assert t.is_deepspeed_enabled
    base_after, _ = split(t.model)
    assert all(torch.equal(base_after[n], base_before[n]) for n in base_after)
    a, b = final_vector(t), expected
    assert float((a - b).norm() / b.norm()) < 1e-5


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


@pytest.mark.parametrize("method", ["finite_difference", "sama"])
def test_a_resumed_adapter_run_ends_bit_identical(tmp_path, method):
    """LoRA dropout on (TRL's 0.05): the random state resumes too. Stopped after step 4 of 6, resumed from
    checkpoint-4 (an adapter checkpoint): adapter and weighting parameters bit-identical to the run without a stop."""
    kw = {"hypergradient_method": method, "lora_dropout": 0.05, "save_strategy": "steps", "save_steps": 2}
    uninterrupted = peft_trainer(tmp_path / "uninterrupted", max_steps=6, **kw)
    uninterrupted.train()
    reference = final_vector(uninterrupted)
    reset_trainer_state()
    first = peft_trainer(tmp_path / "run", max_steps=6, **kw)
    first.add_callback(StopAt(4))
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    reset_trainer_state()
    resumed = peft_trainer(tmp_path / "run", max_steps=6, **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(final_vector(resumed), reference)
