"""fp16 levels on the CPU: loss scaling that covers the hypergradient's passes, and hypergradients against fp32.

DeepSpeed's fp16 needs a GPU, so these run the same policy through the torch backend, whose fp16 levels
step float32 masters under `scalemlo.loss_scale.DynamicLossScale` (DeepSpeed's scaler, step for
step, checked below against DeepSpeed's own class). The program is ``test_low_precision``'s: a tiny
GPT-2 (here fp16, torch backend) under a float32 Meta-Weight-Net at ZeRO-0. What is checked:

- every method's hypergradients against the float32 run of the same program (cosine >= 0.99);
- an overflow in a lower step (a loss scale far too high) skips exactly those steps, halves the scale,
  and writes nothing non-finite; training then proceeds as with a sane scale;
- an overflow inside a hypergradient (forced: the meta loss is inf once) skips the upper step (its
  parameters and optimizer state untouched), lowers the fp16 level's scale, is logged and raises nothing
  even with ``nonfinite="raise"``; the 2-rank launch of ``tests/test_failing_rank.py`` checks that an
  overflow on one rank skips on every rank;
- DeepSpeed fp16 levels are configured, and both fp16 and bf16 at once is refused.
"""

import logging
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from test_low_precision import (  # noqa: E402
    ACCUMULATION,
    CASES,
    Model,
    SharedModel,
    Weights,
    batches,
    cosines,
    every_hypergradient,
    tiny_gpt2,
    weight_net,
)

from scalemlo import Engine, EngineConfig, LevelConfig  # noqa: E402
from scalemlo.loss_scale import DynamicLossScale  # noqa: E402


def fp16_representable(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


class Inf(Weights):
    """The meta objective, inf on the given global steps (a forced overflow inside the hypergradient)."""

    at: set[int] = set()
    engine: Engine | None = None

    def training_step(self, ids):
        loss = super().training_step(ids)
        return loss * float("inf") if self.engine.global_step in self.at else loss


def program(
    fp16: bool, max_steps: int = 0, scaling: dict | None = None, nonfinite: str = "raise", meta=Weights, **kw
) -> Engine:
    lm, net = fp16_representable(tiny_gpt2()), weight_net()
    if fp16:
        lm = lm.half()
    kind = SharedModel if kw.get("shared_forward") else Model
    model = kind(
        "model",
        lm,
        torch.optim.Adam(lm.parameters(), lr=1e-3),
        batches("train"),
        config=LevelConfig(
            backend="torch", gradient_accumulation=ACCUMULATION, fp16_loss_scaling=scaling if fp16 else None
        ),
    )
    weights = meta(
        "weights",
        net,
        torch.optim.Adam(net.parameters(), lr=1e-2),
        batches("meta"),
        config=LevelConfig(deepspeed_config={"zero_optimization": {"stage": 0}}, **kw),
    )
    config = EngineConfig(max_steps=max_steps, log_every=1, progress_bar=False, nonfinite=nonfinite)
    engine = Engine([model, weights], {"weights": ["model"]}, config)
    Inf.engine = engine
    return engine


def hypergradients(fp16: bool, method: str, steps: int = 3, **kw) -> list[torch.Tensor]:
    engine = program(fp16, steps * ACCUMULATION, method=method, **kw)
    assert {p.dtype for p in engine.levels["model"].params} == {torch.float16 if fp16 else torch.float32}
    return every_hypergradient(engine)


@pytest.mark.parametrize(
    "method, kw",
    [(m, kw) for m, kw, _ in CASES],
    ids=[f"{m}{'-shared' if kw.get('shared_forward') else ''}" for m, kw, _ in CASES],
)
def test_fp16_hypergradients_match_float32(method, kw):
    got = cosines(hypergradients(True, method, **kw), hypergradients(False, method, **kw))
    if method == "sama":
        got = got[1:]  # see test_low_precision: the first sama hypergradient is ill-conditioned in any precision
    assert min(got) >= 0.99, got


def test_at_the_same_point_an_fp16_level_gives_the_float32_hypergradient(monkeypatch):
    """Before any step both runs sit at the same (fp16-representable) weights: evaluated in float32 at its
    masters, the fp16 level's hypergradient is the float32 one exactly; evaluated in fp16 (the rule taken
    out) it is 4e-3 off (measured; fp16's 11 significant bits cancel less than bf16's 8)."""
    import contextlib

    from scalemlo.precision import Float32Evaluation

    def rel_err() -> float:
        (got,) = hypergradients(True, "finite_difference", steps=0)
        (want,) = hypergradients(False, "finite_difference", steps=0)
        return float((got - want).norm() / want.norm())

    with_rule = rel_err()
    monkeypatch.setattr(Float32Evaluation, "float32", contextlib.contextmanager(lambda self: (yield)))
    without = rel_err()
    assert with_rule < 1e-6 and without > 1e-3, (with_rule, without)


def test_the_scaler_is_deepspeeds_step_for_step():
    """The same overflow pattern through DeepSpeed's DynamicLossScaler and ours: the same scales."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from scalemlo.distributed import ensure_distributed

    ensure_distributed()  # DeepSpeed's scaler asks for the rank when it logs
    g = torch.Generator().manual_seed(0)
    pattern = [bool(x) for x in (torch.rand(400, generator=g) < 0.05)] + [False] * 50 + [True] * 3
    for window, hysteresis, consecutive in [(10, 2, False), (7, 1, False), (5, 3, True)]:
        theirs = DynamicLossScaler(
            init_scale=2.0**16,
            scale_window=window,
            min_scale=1.0,
            delayed_shift=hysteresis,
            consecutive_hysteresis=consecutive,
        )
        ours = DynamicLossScale(
            {
                "initial_scale_power": 16,
                "loss_scale_window": window,
                "hysteresis": hysteresis,
                "consecutive_hysteresis": consecutive,
            }
        )
        for overflow in pattern:
            theirs.update_scale(overflow)
            ours.update(overflow)
            assert ours.scale == theirs.cur_scale and ours.hysteresis == theirs.cur_hysteresis


def test_an_overflow_at_the_minimum_scale_is_an_error():
    scale = DynamicLossScale({"initial_scale_power": 1, "hysteresis": 1, "min_loss_scale": 1}, "model")
    scale.update(True)
    assert scale.scale == 1.0
    with pytest.raises(FloatingPointError, match="minimum loss scale 1: the level has diverged"):
        scale.update(True)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"initial_scale_power": -1}, "initial_scale_power must be an integer >= 0"),
        ({"loss_scale_window": 0}, "loss_scale_window must be an integer >= 1"),
        ({"scale_power": 3}, "unknown fp16 loss-scaling keys"),
    ],
)
def test_bad_loss_scaling_is_refused_when_configured(bad, words):
    with pytest.raises(ValueError, match=words):
        LevelConfig(backend="torch", fp16_loss_scaling=bad)


def test_loss_scaling_is_for_the_torch_backend_only():
    with pytest.raises(ValueError, match='the "fp16" section of its deepspeed_config'):
        LevelConfig(fp16_loss_scaling={})


def finite_everywhere(engine: Engine) -> bool:
    tensors = [p for lv in engine.levels.values() for p in lv.params]
    tensors += [m for lv in engine.levels.values() for m in getattr(lv.backend, "_masters", {}).values()]
    tensors += [
        v
        for lv in engine.levels.values()
        for s in lv.backend.torch_optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.is_floating_point()
    ]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_a_scale_far_too_high_skips_steps_until_it_is_lowered(caplog):
    """Initial scale 2^40: the scaled fp16 gradients overflow, so the first steps are skipped (parameters
    and masters untouched), the scale halves per skipped step (hysteresis 1) down to one that fits, and no
    inf or NaN reaches a parameter, a master or an optimizer state. Then training proceeds."""
    engine = program(True, scaling={"initial_scale_power": 40, "hysteresis": 1})
    model = engine.levels["model"]
    start = [p.detach().clone() for p in model.params]
    scales, stepped = [], []
    with caplog.at_level(logging.WARNING, logger="scalemlo"):
        for _ in range(40):
            engine.step_level("model")
            scales.append(model.backend.loss_scale)
            stepped.append(model.backend.steps)
    skipped = model.overflow_steps
    overflowed = [now == before for now, before in zip(stepped, [0] + stepped[:-1])]
    assert 5 <= skipped < 30 and sum(overflowed) == skipped and all(overflowed[:5]), scales
    assert scales == [2.0 ** (40 - sum(overflowed[: k + 1])) for k in range(40)]  # halved per overflow, only
    assert model.skipped_steps == 0  # an overflow is not a non-finite step
    assert sum("fp16 overflow in level 'model'" in r.message for r in caplog.records) == skipped
    assert finite_everywhere(engine)
    assert any(not torch.equal(a, b) for a, b in zip(start, model.params))


def test_an_overflow_inside_a_hypergradient_skips_the_upper_step_and_lowers_the_scale(caplog):
    """The meta loss is inf at global step 2 (an overflow in the hypergradient's passes): with
    nonfinite="raise" nothing raises; the weight net's step is skipped (its parameters and Adam state as
    after step 1), the fp16 level's scale drops one notch (hysteresis 1), the warning names both, and the
    run goes on to finite parameters everywhere."""
    Inf.at = {2}
    engine = program(True, 4 * ACCUMULATION, scaling={"hysteresis": 1}, meta=Inf)
    weights, model = engine.levels["weights"], engine.levels["model"]
    snapshots = {}

    def watch():
        snapshots[engine.global_step] = (
            [p.detach().clone() for p in weights.params],
            {k: v.clone() for k, v in weights.backend.optimizer_state(weights.params[0]).items()},
            model.backend.loss_scale,
        )

    with caplog.at_level(logging.WARNING, logger="scalemlo"):
        history = []
        for _ in range(4 * ACCUMULATION):
            history.append(engine.step())
            watch()
    # The weight net steps every ACCUMULATION global steps (unroll 1 over a level accumulating 2 batches)
    upper_keys = ("weights/hypergrad_norm", "weights/meta_overflows")
    upper_steps = [s for s, row in enumerate(history, 1) if any(key in row for key in upper_keys)]
    assert 2 in upper_steps, upper_steps
    params_before, state_before, scale_before = snapshots[1]
    params_after, state_after, scale_after = snapshots[2]
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    assert scale_after == scale_before / 2
    assert history[1]["weights/meta_overflows"] == 1 and weights.skipped_steps == 1
    messages = [r.message for r in caplog.records if "hypergradient of level 'weights'" in r.message]
    assert len(messages) == 1 and "'model' 65536 -> 32768" in messages[0], messages
    assert finite_everywhere(engine)
    assert all(not torch.equal(a, b) for a, b in zip(params_after, snapshots[4 * ACCUMULATION][0]))


def test_without_fp16_a_nonfinite_hypergradient_still_raises():
    Inf.at = {2}
    engine = program(False, 4 * ACCUMULATION, meta=Inf)
    with pytest.raises(FloatingPointError, match="the hypergradient .* is not finite"):
        engine.run()


def test_an_fp16_level_resumes_with_its_masters_and_scale(tmp_path):
    """The masters and the loss scale are in the checkpoint: a resumed run ends where an uninterrupted one does."""

    def finish(engine: Engine) -> torch.Tensor:
        engine.run()
        return torch.cat([p.detach().float().flatten() for lv in engine.levels.values() for p in lv.params])

    scaling = {"initial_scale_power": 20, "hysteresis": 1, "loss_scale_window": 2}
    whole = finish(program(True, 3 * ACCUMULATION, scaling=scaling))
    first = program(True, ACCUMULATION, scaling=scaling)
    first.run()
    first.save_checkpoint(tmp_path / "ckpt")
    saved_scale = first.levels["model"].backend.loss_scale
    second = program(True, 3 * ACCUMULATION, scaling=scaling)
    second.load_checkpoint(tmp_path / "ckpt")
    assert second.levels["model"].backend.loss_scale == saved_scale != 2.0**20
    assert torch.equal(finish(second), whole)


def test_deepspeed_fp16_configs_are_accepted_and_checked():
    from scalemlo.backend import deepspeed_config_for

    ok = deepspeed_config_for(LevelConfig(deepspeed_config={"fp16": {"enabled": True}}), "model")
    assert ok["fp16"] == {"enabled": True}
    with pytest.raises(ValueError, match='enables both "fp16" and "bf16"'):
        deepspeed_config_for(LevelConfig(deepspeed_config={"fp16": {"enabled": True}, "bf16": {"enabled": True}}), "m")
    with pytest.raises(ValueError, match="auto_cast"):
        deepspeed_config_for(LevelConfig(deepspeed_config={"fp16": {"enabled": True, "auto_cast": True}}), "m")


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_a_bf16_zero0_level_skipping_a_nonfinite_step_changes_nothing(fault):
    """DeepSpeed's bf16 ZeRO-0 optimizer stepped a parameter without a gradient on zeros: a "skipped" step
    moved every parameter by Adam's momentum and advanced its step count (found here; 0.0078 moved). Now
    its own overflow check skips the step."""
    from test_low_precision import program as bf16_program

    engine = bf16_program({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})
    engine.config = EngineConfig(max_steps=0, log_every=0, progress_bar=False, nonfinite="skip")
    model = engine.levels["model"]
    engine.step_level("model")
    before = [p.detach().clone() for p in model.params]
    state = {k: v.clone() for k, v in model.backend.optimizer_state(model.params[0]).items()}
    original = model.training_step

    def poisoned(ids):
        loss = original(ids)
        if fault == "loss":
            return loss * float("nan")
        return loss + torch.sqrt(sum((p * 0).sum() for p in model.module.parameters()))

    model.training_step = poisoned
    engine.step_level("model")
    assert model.skipped_steps == 1 or model.skipped_batches == ACCUMULATION
    assert all(torch.equal(a, b) for a, b in zip(before, model.params))
    after = model.backend.optimizer_state(model.params[0])
    assert all(torch.equal(state[k], after[k]) for k in state)
