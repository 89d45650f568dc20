"""DeepSpeed's own fp16 engines (ZeRO 0-3) under scalemlo, on the CPU.

DeepSpeed refuses fp16 on a CPU without native fp16 arithmetic, but its fp16 optimizers and loss scaler
are torch code: `scalemlo.testing.allow_deepspeed_fp16_on_cpu` lets it build them, so the engine a
GPU user gets (FP16_UnfusedOptimizer at ZeRO-0, the ZeRO optimizers at 1-3, DeepSpeed's dynamic loss
scaler and overflow checks) runs here. The program is ``test_low_precision``'s: a tiny GPT-2, here in
DeepSpeed fp16, under a float32 Meta-Weight-Net at ZeRO-0, against the float32 run of the same program
from the same (fp16-representable) weights.

What it guards:

- ZeRO-0: DeepSpeed 0.19's ``engine.backward`` does not scale the loss of an fp16 ZeRO-0 engine while its
  step divides the gradients by the scale (DeepSpeed pull request 8393): without a fix Adam's moments hold
  the gradients over 256 (the scale here) and sama's hypergradients are 35-1000x too large (cosine 0.66
  against float32); ``scalemlo.backend.scale_fp16_zero0_loss`` scales them.
- ZeRO-3: DeepSpeed refuses a backward called directly on a loss-scaled engine ("Loss scaling is required
  for this configuration"): the level's own backward goes through ``engine.scale``.
"""

import logging
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import test_low_precision as tlp  # noqa: E402
from test_fp16 import fp16_representable  # noqa: E402

from scalemlo import Engine, EngineConfig, LevelConfig  # noqa: E402
from scalemlo.testing import allow_deepspeed_fp16_on_cpu  # noqa: E402

allow_deepspeed_fp16_on_cpu()


@pytest.fixture(autouse=True)
def fp16_representable_weights(monkeypatch):
    whole = tlp.tiny_gpt2
    monkeypatch.setattr(tlp, "tiny_gpt2", lambda: fp16_representable(whole()))


def fp16(stage: int, **scaling) -> dict:
    # 2^8: the tiny model's scaled gradients fit, so the fp16 run takes the float32 run's steps
    return {"zero_optimization": {"stage": stage}, "fp16": {"enabled": True, "initial_scale_power": 8, **scaling}}


@pytest.mark.parametrize(
    "method, kw, stage",
    [(m, kw, st) for m, kw, stages in tlp.CASES for st in stages],
    ids=[
        f"{m}{'-shared' if kw.get('shared_forward') else ''}-zero{st}" for m, kw, stages in tlp.CASES for st in stages
    ],
)
def test_deepspeed_fp16_hypergradients_match_float32(method, kw, stage):
    low = tlp.run_with(fp16(stage), method, check_dtype=torch.float16, **kw)
    high = tlp.run_with({"zero_optimization": {"stage": stage}}, method, check_dtype=torch.float32, **kw)
    got = tlp.cosines(low, high)
    if method == "sama":
        got = got[1:]  # see test_low_precision: the first sama hypergradient is ill-conditioned in any precision
    assert min(got) >= 0.99, got


def first_moment_ratio() -> float:
    """|Adam's first moment| of the fp16 ZeRO-0 level after two steps over the float32 run's."""
    norms = []
    for ds in (fp16(0), {"zero_optimization": {"stage": 0}}):
        engine = tlp.program(ds)
        model = engine.levels["model"]
        for _ in range(2 * tlp.ACCUMULATION):
            engine.step_level("model")
        norms.append(sum(float(model.backend.optimizer_state(p)["exp_avg"].norm() ** 2) for p in model.params) ** 0.5)
    return norms[0] / norms[1]


def test_an_fp16_zero0_level_steps_on_its_true_gradients():
    """DeepSpeed 0.19 does not scale an fp16 ZeRO-0 loss but unscales its gradients, which leaves Adam's first
    moment 1/256 of the float32 run's (0.0039 measured with scalemlo's scaling taken out); scalemlo scales the
    loss, so the two agree to fp16 rounding."""
    assert abs(first_moment_ratio() - 1) < 1e-2


def test_the_zero0_fix_leaves_a_deepspeed_that_scales_the_loss_alone(monkeypatch):
    """A DeepSpeed with pull request 8393 scales the loss itself; the fix must not scale it twice."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    backward = DeepSpeedEngine.backward

    def fixed(self, loss, *args, **kwargs):
        if self.fp16_enabled() and not self.zero_optimization():
            loss = loss * self.optimizer.loss_scale
        return backward(self, loss, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "backward", fixed)
    assert abs(first_moment_ratio() - 1) < 1e-2


def test_without_the_zero0_fix_the_gradients_are_unscaled(monkeypatch):
    """The check above can fail: with the fix taken out the first moment is 1/scale of float32's."""
    import scalemlo.backend.deepspeed

    monkeypatch.setattr(scalemlo.backend.deepspeed, "scale_fp16_zero0_loss", lambda engine, loss: None)
    assert abs(first_moment_ratio() * 256 - 1) < 1e-2


def finite_everywhere(engine: Engine) -> bool:
    tensors = []
    for level in engine.levels.values():
        backend = level.backend
        tensors += list(backend.local_shards)
        tensors += [
            v
            for s in backend.torch_optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.is_floating_point()
        ]
        wrapper = backend.optimizer
        for name in ("fp32_groups", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            groups = getattr(wrapper, name, None) or []
            tensors += [t for g in groups for t in (g if isinstance(g, (list, tuple)) else [g])]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def shards(level) -> list[torch.Tensor]:
    return [t.detach().clone() for t in level.backend.local_shards]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_scale_far_too_high_skips_deepspeed_steps_until_it_is_lowered(stage, caplog):
    """Initial scale 2^40 (hysteresis 1): DeepSpeed's own overflow check skips the first steps (parameters
    untouched), each skip halves its scale, scalemlo counts and logs each one, no inf or NaN is written
    anywhere, and then the level trains."""
    engine = tlp.program(fp16(stage, initial_scale_power=40, hysteresis=1))
    model = engine.levels["model"]
    start, scales, moved = shards(model), [], []
    with caplog.at_level(logging.WARNING, logger="scalemlo"):
        for _ in range(40):
            before = shards(model)
            engine.step_level("model")
            scales.append(model.backend.loss_scale)
            moved.append(any(not torch.equal(a, b) for a, b in zip(before, shards(model))))
    skipped, overflowed = model.overflow_steps, [not m for m in moved]
    # a step moved the parameters exactly when it was not counted as skipped; the first ones all overflow
    assert 5 <= skipped < 35 and sum(overflowed) == skipped and all(overflowed[:5]), (scales, moved)
    assert scales == [2.0 ** (40 - sum(overflowed[: k + 1])) for k in range(40)]  # halved per overflow, only
    assert model.skipped_steps == 0  # an overflow is not a non-finite step
    assert sum("fp16 overflow in level 'model'" in r.message for r in caplog.records) == skipped
    assert finite_everywhere(engine)
    assert any(not torch.equal(a, b) for a, b in zip(start, shards(model)))


class Inf(tlp.Weights):
    """The meta objective, inf at global step 2 (a forced overflow inside the hypergradient)."""

    engine: Engine | None = None

    def training_step(self, ids):
        loss = super().training_step(ids)
        return loss * float("inf") if self.engine.global_step == 2 else loss


@pytest.mark.parametrize("stage", [0, 3])
def test_an_overflow_inside_a_hypergradient_skips_the_upper_step_and_lowers_deepspeeds_scale(stage, caplog):
    """With nonfinite="raise" nothing raises: the weight net's step is skipped (its parameters as after
    step 1), DeepSpeed's scale of the fp16 level drops one notch (hysteresis 1), the warning names both,
    and the run goes on to finite parameters everywhere."""
    lm, net = tlp.tiny_gpt2(), tlp.weight_net()
    config = LevelConfig(gradient_accumulation=tlp.ACCUMULATION, deepspeed_config=fp16(stage, hysteresis=1))
    model = tlp.Model("model", lm, torch.optim.Adam(lm.parameters(), lr=1e-3), tlp.batches("train"), config=config)
    weights = Inf(
        "weights",
        net,
        torch.optim.SGD(net.parameters(), lr=1.0),
        tlp.batches("meta"),
        config=LevelConfig(deepspeed_config={"zero_optimization": {"stage": 0}}),
    )
    engine = Engine(
        [model, weights],
        {"weights": ["model"]},
        EngineConfig(max_steps=0, log_every=1, progress_bar=False, nonfinite="raise"),
    )
    Inf.engine = engine
    snapshots, history = {}, []
    with caplog.at_level(logging.WARNING, logger="scalemlo"):
        for _ in range(4 * tlp.ACCUMULATION):
            history.append(engine.step())
            snapshots[engine.global_step] = (shards(weights), model.backend.loss_scale)
    (params_1, scale_1), (params_2, scale_2) = snapshots[1], snapshots[2]
    assert history[1]["weights/meta_overflows"] == 1 and weights.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params_1, params_2))
    assert scale_2 == scale_1 / 2 == 128
    messages = [r.message for r in caplog.records if "hypergradient of level 'weights'" in r.message]
    assert len(messages) == 1 and "'model' 256 -> 128" in messages[0], messages
    assert finite_everywhere(engine)
    assert any(not torch.equal(a, b) for a, b in zip(params_2, snapshots[4 * tlp.ACCUMULATION][0]))


@pytest.mark.parametrize("name", list(tlp.OFFLOAD))
def test_an_offloaded_fp16_level_gives_the_hypergradients_of_the_same_level_not_offloaded(name):
    """As for fp32 and bf16 (test_low_precision): offload moves the fp16 level's state, not its MLO."""
    zero = tlp.OFFLOAD[name]
    base = tlp.run_with(fp16(zero["stage"]), check_dtype=torch.float16)
    ds = fp16(zero["stage"])
    offloaded = tlp.run_with({**ds, "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False})
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(offloaded, base)]
    assert len(rel) > 3 and max(rel) < 1e-5, rel


@pytest.mark.parametrize("stage", [0, 3])
def test_a_deepspeed_fp16_level_resumes_bit_for_bit(stage, tmp_path):
    """DeepSpeed's checkpoint holds the fp16 engine's masters and loss scale (moved by overflows and a short
    window here): a run stopped after one step and resumed ends where an uninterrupted one does."""
    ds = fp16(stage, initial_scale_power=20, hysteresis=1, loss_scale_window=2)

    def masters(engine: Engine) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        model = engine.levels["model"]
        full = (
            [safe_get_full_fp32_param(p) for p in model.params]
            if stage == 3
            else [model.backend.stepped_tensor(p) for p in model.params]
        )
        return torch.cat([t.detach().float().flatten() for t in full + shards(engine.levels["weights"])])

    def finish(engine: Engine) -> torch.Tensor:
        engine.run()
        return masters(engine)

    whole = finish(tlp.program(ds, 3 * tlp.ACCUMULATION))
    first = tlp.program(ds, tlp.ACCUMULATION)
    first.run()
    first.save_checkpoint(tmp_path / "ckpt")
    saved_scale = first.levels["model"].backend.loss_scale
    second = tlp.program(ds, 3 * tlp.ACCUMULATION)
    second.load_checkpoint(tmp_path / "ckpt")
    assert second.levels["model"].backend.loss_scale == saved_scale != 2.0**20
    assert torch.equal(finish(second), whole)
