"""ReweightingTrainer with the model in fp16: DeepSpeed's fp16 engine, and torch's autocast with GradScaler.

Neither runs on a CPU as shipped (DeepSpeed refuses fp16 there, Accelerate turns ``--fp16`` into float32),
but both are torch code, so here they are let run: `scalemlo.testing.allow_deepspeed_fp16_on_cpu`
for DeepSpeed's engine (ZeRO 0 and 3, the shipped Trainer configs, ``"fp16": {"enabled": "auto"}``
following ``--fp16``), and an Accelerator given what it builds on a GPU (autocast to float16 and a
GradScaler, on the CPU) for ``--fp16`` without DeepSpeed. Checked: the meta steps' hypergradients against
the float32 run of the same program (cosine >= 0.99 at every compared meta step: test_hf_trainer_bf16's
rule, its docstring says why), the model's gradients reaching its
optimizer at their true size (DeepSpeed 0.19 leaves an fp16 ZeRO-0 loss unscaled), and steps skipped for
fp16 overflows (a scale far too high) with sama, whose gradient record must then stay the last step taken.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_hf_trainer import ROOT, fresh_trainer_state, trainer  # noqa: F401 (fixture)
from test_hf_trainer_bf16 import compared_meta_steps, run_low_precision

from scalemlo.testing import allow_deepspeed_fp16_on_cpu

allow_deepspeed_fp16_on_cpu()


def ds_config(tmp_path, stage: int, **fp16) -> str:
    """The shipped Trainer config with DeepSpeed fp16 settings added (``enabled`` stays "auto")."""
    cfg = json.loads((ROOT / "configs" / "ds" / f"trainer_zero{stage}.json").read_text())
    assert cfg["fp16"] == {"enabled": "auto"}
    cfg["fp16"].update(fp16)
    path = tmp_path / f"zero{stage}_fp16.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture
def gpu_like_autocast(monkeypatch):
    """Accelerate's ``--fp16`` as on a GPU (autocast to float16, a GradScaler), on the CPU."""
    from accelerate import Accelerator

    init = Accelerator.__init__
    scaler_kwargs = {}

    def gpu_like(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.scaler is None:
            self.native_amp, self.scaler = True, torch.amp.GradScaler("cpu", **scaler_kwargs)

    monkeypatch.setattr(Accelerator, "__init__", gpu_like)
    return scaler_kwargs


def run(tmp_path, fp16: bool, deepspeed: str | None, **kwargs):
    return run_low_precision(tmp_path, torch.float16, fp16, deepspeed, **kwargs)


def cosines(low, high) -> list[float]:
    assert len(low) == len(high) > 2
    return [float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(low, high)]


@pytest.mark.parametrize(
    "stage, method, shared",
    [(0, "finite_difference", True), (3, "finite_difference", True), (0, "sama", True), (0, "sama", False)],
    ids=["zero0-fd", "zero3-fd", "zero0-sama", "zero0-sama-unshared"],
)
def test_deepspeed_fp16_model_meta_steps_match_float32(tmp_path, stage, method, shared):
    config = ds_config(tmp_path, stage, initial_scale_power=8)  # a scale the tiny model's gradients fit
    low, t = run(tmp_path / "fp16", True, config, hypergradient_method=method, shared_forward=shared)
    assert {p.dtype for p in t.model.parameters()} == {torch.float16} and t.model_wrapped.fp16_enabled()
    high, _ = run(tmp_path / "fp32", False, config, hypergradient_method=method, shared_forward=shared)
    got = compared_meta_steps(cosines(low, high), method)
    assert min(got) >= 0.99, got


def first_moment(t) -> float:
    """|Adam's first moment| over the model's parameters (DeepSpeed's ZeRO-0 fp16 wrapper: its float32 copies)."""
    optimizer = t.model_wrapped.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(float(s["exp_avg"].norm() ** 2) for s in inner.state.values() if "exp_avg" in s) ** 0.5


@pytest.mark.parametrize("accumulation", [1, 2])
def test_an_fp16_zero0_model_steps_on_its_true_gradients(tmp_path, accumulation):
    """DeepSpeed 0.19's engine.backward (the Trainer's) leaves an fp16 ZeRO-0 loss unscaled while its step
    divides by the scale: without scalemlo's hook Adam's first moment is 1/256 of the float32 run's."""
    config = ds_config(tmp_path, 0, initial_scale_power=8)
    kw = {"max_steps": 2, "batch": 8 // accumulation, "accumulation": accumulation}
    _, low = run(tmp_path / "fp16", True, config, **kw)
    _, high = run(tmp_path / "fp32", False, config, **kw)
    assert abs(first_moment(low) / first_moment(high) - 1) < 2e-2


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_deepspeed_overflows_skip_model_steps_and_sama_keeps_the_last_step_taken(tmp_path, shared):
    """Scale 2^40, hysteresis 1: DeepSpeed skips the first steps (its optimizer is not stepped, so sama's
    pre-step hook does not fire). The meta steps due then read the last step taken (a separate meta step
    must not find its kept gradient missing and raise); the run ends with finite parameters everywhere."""
    config = ds_config(tmp_path, 0, initial_scale_power=40, hysteresis=1)
    t = trainer(
        tmp_path,
        deepspeed=config,
        fp16=True,
        reweighting="example",
        hypergradient_method="sama",
        shared_forward=shared,
        max_steps=40,
    )
    t.train()
    skipped = t.model_wrapped.skipped_steps
    assert 5 <= skipped < 35 and t.model_wrapped.optimizer.loss_scale == 2.0 ** (40 - skipped)
    assert t._meta_level.steps >= 30
    tensors = [p for p in t.model.parameters()] + list(t.reweighter.parameters())
    tensors += [m for group in t.model_wrapped.optimizer.fp32_groups for m in group]
    assert all(bool(torch.isfinite(x).all()) for x in tensors)


@pytest.mark.parametrize("method", ["finite_difference", "sama"])
def test_autocast_fp16_model_meta_steps_match_float32(tmp_path, gpu_like_autocast, method):
    """``--fp16`` without DeepSpeed, as on a GPU: the forward under float16 autocast, a GradScaler, the
    Trainer's fused AdamW; the hypergradient in float32 with autocast off (its shared forward central)."""
    gpu_like_autocast["init_scale"] = 2.0**8
    low, t = run(tmp_path / "fp16", True, None, hypergradient_method=method)
    assert t.accelerator.scaler is not None and t.accelerator.native_amp
    assert getattr(t._model_level.backend.torch_optimizer, "_step_supports_amp_scaling", False)  # fused
    high, _ = run(tmp_path / "fp32", False, None, hypergradient_method=method)
    got = compared_meta_steps(cosines(low, high), method)
    assert min(got) >= 0.99, got


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_gradscaler_overflows_skip_model_steps_and_sama_keeps_the_last_step_taken(tmp_path, gpu_like_autocast, shared):
    gpu_like_autocast.update(init_scale=2.0**40, growth_interval=1000)
    t = trainer(
        tmp_path, fp16=True, reweighting="example", hypergradient_method="sama", shared_forward=shared, max_steps=40
    )
    t.train()
    scale = t.accelerator.scaler.get_scale()
    assert scale < 2.0**30  # it was lowered: steps were skipped
    assert t._meta_level.steps >= 30
    tensors = [p for p in t.model.parameters()] + list(t.reweighter.parameters())
    assert all(bool(torch.isfinite(x).all()) for x in tensors)


def test_samas_record_of_a_fused_optimizer_under_gradscaler():
    """torch's GradScaler calls a fused optimizer even on an overflow (with ``found_inf`` set; the optimizer
    skips the update itself) and, when nothing unscaled the gradients before, hands them to it still
    scaled (``grad_scale``). sama's pre-step hook must record the true gradients of a step taken and
    nothing for a step skipped."""
    from scalemlo.backend import TorchBackend
    from scalemlo.hf import ReweightingTrainer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    backend = TorchBackend.adopt(model, list(model.parameters()), optimizer, [0, 0])
    ReweightingTrainer._keep_step_gradients(backend, "sama")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 4)

    def step(factor: float) -> list[torch.Tensor]:
        optimizer.zero_grad()
        loss = model(x).pow(2).mean() * factor
        true = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        scaler.scale(loss).backward()  # no unscale_ before the step
        scaler.step(optimizer)
        scaler.update()
        return list(true)

    true = step(1.0)
    recorded = backend.last_step
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(recorded.grads, true))
    step(float("inf"))  # an overflow: skipped, and not recorded
    assert backend.last_step is recorded and scaler.get_scale() == 2.0**9
