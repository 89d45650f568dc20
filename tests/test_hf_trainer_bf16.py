"""ReweightingTrainer with the model in bf16: through DeepSpeed (``--bf16`` with the shipped
``configs/ds/trainer_zero{0,3}.json``, whose ``"bf16": {"enabled": "auto"}`` follows it) at ZeRO 0 and 3, and without DeepSpeed (``--bf16``: torch autocast). The meta steps'
hypergradients must point where the float32 run's do (cosine >= 0.99 for every meta step), the float32
run starting from the same (bf16-representable) weights: the hypergradient is evaluated in float32
(scalemlo.precision), with autocast off, at the bf16 model's own parameters.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_hf_trainer import ROOT, fresh_trainer_state, trainer  # noqa: F401 (fixture)
from transformers import TrainerCallback


class RecordHypergradients(TrainerCallback):
    def __init__(self, owner):
        self.owner, self.hypergradients = owner, []

    def on_train_begin(self, args, state, control, **kwargs):  # after the Trainer's own (it builds the program)
        coordinator = self.owner.mlo.coordinator
        original = coordinator.hypergradient

        def recorded(*a, **k):
            grads = original(*a, **k)
            self.hypergradients.append(torch.cat([g.flatten().double() for g in grads]))
            return grads

        coordinator.hypergradient = recorded


def ds_config(stage: int) -> str:
    """The shipped Trainer config: ``"bf16": {"enabled": "auto"}`` follows ``--bf16``."""
    return str(ROOT / "configs" / "ds" / f"trainer_zero{stage}.json")


def run(tmp_path, bf16: bool, deepspeed: str | None, **kwargs) -> tuple[list[torch.Tensor], object]:
    t = trainer(tmp_path, deepspeed=deepspeed, bf16=bf16, reweighting="example", **kwargs)
    with torch.no_grad():  # both runs from the same bf16-representable weights
        for p in t.model.parameters():
            p.copy_(p.bfloat16().float())
    record = RecordHypergradients(t)
    t.add_callback(record)
    t.train()
    return record.hypergradients, t


@pytest.mark.parametrize(
    "stage, method",
    [(0, "finite_difference"), (3, "finite_difference"), (0, "sama"), (None, "finite_difference")],
    ids=["zero0-fd", "zero3-fd", "zero0-sama", "autocast-fd"],
)
def test_bf16_model_meta_steps_match_float32(tmp_path, stage, method):
    deepspeed = None if stage is None else ds_config(stage)
    low, t = run(tmp_path / "bf16", True, deepspeed, hypergradient_method=method)
    if stage is not None:
        assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16}
    high, _ = run(tmp_path / "fp32", False, deepspeed, hypergradient_method=method)
    assert len(low) == len(high) == 5
    cosines = [float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(low, high)]
    if method == "sama":
        cosines = cosines[1:]  # after Adam's first step sama's w is dominated by near-zero gradients (README)
    assert min(cosines) >= 0.99, cosines
