"""ReweightingTrainer with the model in bf16, and offloaded.

bf16 through DeepSpeed (``--bf16`` with the shipped ``configs/ds/trainer_zero{0,3}.json``, whose
``"bf16": {"enabled": "auto"}`` follows it) at ZeRO 0 and 3, and without DeepSpeed (``--bf16``: torch
autocast). The meta steps' hypergradients must point where the float32 run's do (cosine >= 0.99 for
every compared meta step, `compared_meta_steps`), the float32 run starting from the same
(bf16-representable) weights: the hypergradient is evaluated in float32 (scalemlo.precision), with autocast
off. The shipped offload config must give the meta steps of ZeRO-3 without offload.

What is compared, and why (measured on this file's program, AMD EPYC with AVX2 kernels against the same
machine with ``ATEN_CPU_CAPABILITY=default`` or ``MKL_CBWR=COMPATIBLE MKL_ENABLE_INSTRUCTIONS=SSE4_2``, which
reproduce the cosines an Intel Xeon gave to 4 digits):

- The float32 run takes the shared forward's central difference, the one a low-precision run always takes
  (``scalemlo.hypergrad.problem.is_central``): the one-sided estimate is another estimator, whose
  sama meta steps 1-2 move with the CPU's kernels (cosine 0.943 and 0.998 between the two kernel sets;
  the central one 0.9994 and 1.0) and differ from the central one (0.92 at meta step 1).
- sama is compared from its third meta step (`SAMA_FIRST_COMPARED`). Its first two read Adam after
  one and two steps, where w = -(du/dg) v is dominated by the entries whose gradient is rounding noise (the
  key bias's is zero in exact arithmetic) and 1/(sqrt(s) + eps) amplifies it (docs/precision.md, sama in bf16): the
  low-precision estimate there is as much a function of the kernels as of the model (fp16, the same program
  under the two kernel sets: cosine 0.44 and 0.978 at meta steps 1-2, >= 0.9989 from the third). From the
  third: bf16 >= 0.9974, fp16 >= 0.9993 against float32 under every pairing of the kernel sets.
"""

from __future__ import annotations

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


SAMA_FIRST_COMPARED = 2
"""Index of sama's first meta step compared with the float32 run (the module docstring says why)."""


def compared_meta_steps(cosines: list[float], method: str) -> list[float]:
    """The cosines of the meta steps whose low-precision estimate is above the kernels' rounding noise."""
    return cosines[SAMA_FIRST_COMPARED:] if method == "sama" else cosines


def ds_config(stage: int) -> str:
    """The shipped Trainer config: ``"bf16": {"enabled": "auto"}`` follows ``--bf16``."""
    return str(ROOT / "configs" / "ds" / f"trainer_zero{stage}.json")


def run_low_precision(tmp_path, dtype: torch.dtype, low: bool, deepspeed: str | None, **kwargs):
    """Train with ``--bf16``/``--fp16`` (as ``dtype``) set to ``low``, from weights representable in ``dtype``
    (so the low-precision run and the float32 one start equal); every meta step's hypergradient, the trainer.
    The float32 run's shared forward takes the central difference a low-precision run must take."""
    flag = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if not low:
        kwargs.setdefault("shared_forward_difference", "central")
    t = trainer(tmp_path, deepspeed=deepspeed, reweighting="example", **{flag: low}, **kwargs)
    with torch.no_grad():
        for p in t.model.parameters():
            p.copy_(p.to(dtype).float())
    record = RecordHypergradients(t)
    t.add_callback(record)
    t.train()
    return record.hypergradients, t


def run(tmp_path, bf16: bool, deepspeed: str | None, **kwargs) -> tuple[list[torch.Tensor], object]:
    return run_low_precision(tmp_path, torch.bfloat16, bf16, deepspeed, **kwargs)


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
    cosines = compared_meta_steps([float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(low, high)], method)
    assert min(cosines) >= 0.99, cosines


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_the_shipped_offload_config_gives_the_hypergradients_of_zero3(tmp_path, bf16):
    """configs/ds/trainer_zero3_offload.json (parameters and optimizer offloaded to the CPU) against
    trainer_zero3.json: the same meta steps up to the drift of the offloaded step's own arithmetic
    (measured 2e-4 -> 1.2e-3 fp32, 1e-5 -> 4.5e-3 bf16 over 5 meta steps, growing with the steps; in
    scalemlo.Engine offload is bit-identical, tests/test_low_precision.py). Without the boundary that
    DeepSpeedBackend's backward finalizes under offload_optimizer, every offloaded hypergradient is zero
    (relative difference 1)."""
    offloaded, _ = run(tmp_path / "offload", bf16, str(ROOT / "configs" / "ds" / "trainer_zero3_offload.json"))
    plain, _ = run(tmp_path / "zero3", bf16, ds_config(3))
    assert len(offloaded) == len(plain) == 5
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(offloaded, plain)]
    assert max(rel) < 2e-2, rel


def test_a_bf16_zero0_run_resumes_bit_for_bit(tmp_path):
    """Stopped at step 4 and resumed from checkpoint-4: the bf16 model, its float32 masters and the
    weights end as in the uninterrupted run (the backend adopted at the resume keeps the loaded
    optimizer state: only DeepSpeed's zero-gradient initial step is ever undone)."""
    from test_hf_trainer import parameters

    from scalemlo.hf import reset_trainer_state

    def masters(t) -> torch.Tensor:
        return torch.cat([m.flatten() for group in t.model_wrapped.optimizer.fp32_groups for m in group])

    kw = {"deepspeed": ds_config(0), "bf16": True, "save_strategy": "steps", "save_steps": 2}
    uninterrupted = trainer(tmp_path / "uninterrupted", **kw)
    uninterrupted.train()
    reference = parameters(uninterrupted), masters(uninterrupted)
    reset_trainer_state()

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    first = trainer(tmp_path / "run", **kw)
    first.add_callback(Stop())
    first.train()
    reset_trainer_state()
    resumed = trainer(tmp_path / "run", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert torch.equal(parameters(resumed), reference[0]) and torch.equal(masters(resumed), reference[1])
