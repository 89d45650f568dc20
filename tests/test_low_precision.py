"""bf16 levels: hypergradients against the float32 run of the same program (scalemlo.precision).

Program: a tiny GPT-2 in bf16 (DeepSpeed ``"bf16": {"enabled": true}``, ZeRO 0-3) under a
float32 Meta-Weight-Net at ZeRO-0 (levels of different precision in one program). The float32
run is the same program with the bf16 block left out, from the same initial weights and batches.
Every hypergradient of a short run must point where the float32 run's does (cosine >= 0.99):
the bf16 run evaluates its hypergradients in float32 (at its float32 master, or its bf16 point), so what remains
is the small drift of bf16 training. Without that rule a difference quotient of bf16 forwards
cancels (a test below takes the rule out). Also here: the DeepSpeed behaviours bf16 and offload
exposed (gradient partitions not cleared or not read, the bf16 optimizer's initial step), and
offloaded levels against the same levels not offloaded.
"""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from scalemlo import Engine, EngineConfig, Level, LevelConfig  # noqa: E402

VOCAB, SEQ, BATCH, ACCUMULATION = 64, 8, 4, 2


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # both runs start from the same (bf16-representable) weights
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def weight_net() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Sigmoid())


def per_example_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()  # the loss in float32, as HF computes it
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


class Model(Level):
    def training_step(self, ids):
        losses = per_example_loss(self, ids)
        weights = self.uppers["weights"](self.held(losses)[:, None]).squeeze(1)  # bf16 losses -> float32 net
        return (weights * losses).mean()


class SharedModel(Level):
    def per_example_losses(self, ids):
        return per_example_loss(self, ids)

    def example_weights(self, ids, losses):
        return self.uppers["weights"](losses[:, None]).squeeze(1)


class Weights(Level):
    def training_step(self, ids):
        return per_example_loss(self.lowers["model"], ids).mean()


def batches(kind: str, count: int = 8) -> list[torch.Tensor]:
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(10 * i + (kind == "meta"))
        ids = (torch.randint(0, VOCAB, (BATCH, 1), generator=g) + torch.arange(SEQ)) % VOCAB
        if kind == "train":
            ids[::2] = torch.randint(0, VOCAB, (BATCH // 2, SEQ), generator=g)
        out.append(ids)
    return out


def program(model_ds: dict | str, max_steps: int = 0, **kw) -> Engine:
    """The bf16-or-not GPT-2 (``model_ds``: its DeepSpeed config) under the float32 weight net at ZeRO-0;
    ``kw``: the weight net's LevelConfig fields (method and its settings)."""
    lm, net = tiny_gpt2(), weight_net()
    kind = SharedModel if kw.get("shared_forward") else Model
    model = kind(
        "model",
        lm,
        torch.optim.Adam(lm.parameters(), lr=1e-3),
        batches("train"),
        config=LevelConfig(gradient_accumulation=ACCUMULATION, deepspeed_config=model_ds),
    )
    weights = Weights(
        "weights",
        net,
        torch.optim.SGD(net.parameters(), lr=1.0),
        batches("meta"),
        config=LevelConfig(deepspeed_config={"zero_optimization": {"stage": 0}}, **kw),
    )
    config = EngineConfig(max_steps=max_steps, log_every=1, progress_bar=False)
    return Engine([model, weights], {"weights": ["model"]}, config)


def run(stage: int, bf16: bool, method: str, steps: int = 3, **kw) -> list[torch.Tensor]:
    """Every hypergradient the weights stepped on in ``steps`` MLO steps, then one more."""
    ds = {"zero_optimization": {"stage": stage}, **({"bf16": {"enabled": True}} if bf16 else {})}
    return run_with(ds, method, steps, check_dtype=torch.bfloat16 if bf16 else torch.float32, **kw)


def run_with(ds: dict, method: str = "finite_difference", steps: int = 3, check_dtype=None, **kw) -> list[torch.Tensor]:
    """``run`` for any DeepSpeed config of the model level."""
    engine = program(ds, steps * ACCUMULATION, method=method, **kw)
    if check_dtype is not None:
        assert {p.dtype for p in engine.levels["model"].params} == {check_dtype}
    return every_hypergradient(engine)


def every_hypergradient(engine: Engine) -> list[torch.Tensor]:
    """Run the program; every hypergradient the weights stepped on, then one more."""
    out = []
    hypergradient = engine.coordinator.hypergradient

    def recorded(*args, **kwargs):
        grads = hypergradient(*args, **kwargs)
        out.append(torch.cat([g.flatten().double() for g in grads]))
        return grads

    engine.coordinator.hypergradient = recorded
    engine.run()
    engine.hypergradient("weights")
    return out


def cosines(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    assert len(a) == len(b) > 1
    return [round(float(F.cosine_similarity(x, y, dim=0)), 5) for x, y in zip(a, b)]


FD2 = {"second_order": "finite_difference"}
CASES = [
    ("finite_difference", {}, [0, 1, 2, 3]),
    ("sama", {}, [0]),
    ("neumann", {**FD2, "neumann_iterations": 3, "neumann_alpha": 0.1}, [0, 3]),
    ("cg", {**FD2, "cg_iterations": 3}, [0, 1, 2, 3]),
    ("penalty", {"penalty_steps": 2}, [0, 3]),
    ("finite_difference", {"shared_forward": True}, [0, 1, 2, 3]),
    ("sama", {"shared_forward": True}, [0]),
]


@pytest.mark.parametrize(
    "method, kw, stage",
    [(m, kw, st) for m, kw, stages in CASES for st in stages],
    ids=[f"{m}{'-shared' if kw.get('shared_forward') else ''}-zero{st}" for m, kw, stages in CASES for st in stages],
)
def test_bf16_hypergradients_match_float32(method, kw, stage):
    got = cosines(run(stage, True, method, **kw), run(stage, False, method, **kw))
    if method == "sama":
        # After Adam's first step sama's w is lr eps / (|g| + eps)^2 v, dominated by the entries whose gradient
        # is nearest zero, where bf16 and float32 gradients differ most (0.25 measured on 2 ranks): from the second
        got = got[1:]
    assert min(got) >= 0.99, got


@pytest.mark.parametrize("stage", [0, 3])
def test_at_the_same_point_a_bf16_level_gives_the_float32_hypergradient(stage, monkeypatch):
    """Before any step both runs sit at the same (bf16-representable) weights: the bf16 level's
    hypergradient, evaluated in float32 at its own parameters, is the float32 one up to summation
    order. With the rule taken out (evaluated in bf16) it is percents off (4e-2 measured on this tiny
    model; 58 % was measured on a 3.7M GPT-2 at the same radius)."""
    from scalemlo.precision import Float32Evaluation

    def rel_err() -> float:
        (got,) = run(stage, True, "finite_difference", steps=0)
        (want,) = run(stage, False, "finite_difference", steps=0)
        return float((got - want).norm() / want.norm())

    with_rule = rel_err()
    monkeypatch.setattr(Float32Evaluation, "float32", contextlib.contextmanager(lambda self: (yield)))
    without = rel_err()
    assert with_rule < 1e-3 and without > 1e-2, (with_rule, without)


def test_hypergradients_leave_a_bf16_zero3_level_training_as_before():
    """A hypergradient takes gradients of a ZeRO-3 level through DeepSpeed and clears them again. In bf16
    DeepSpeed's local-gradient accessor returns a float32 copy, so zeroing what it returns cleared
    nothing and the next step trained on the hypergradient's gradient too (found by this file)."""
    from deepspeed.utils import safe_get_full_fp32_param

    def trained(with_hypergradients: bool) -> torch.Tensor:
        engine = program({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
        model = engine.levels["model"]
        for _ in range(2 * ACCUMULATION):
            if with_hypergradients:
                engine.hypergradient("weights")
            engine.step_level("model")
        return torch.cat([safe_get_full_fp32_param(p).flatten() for p in model.params])

    assert torch.equal(trained(True), trained(False))


def test_a_bf16_zero0_adam_level_steps_as_torch_adam():
    """DeepSpeed's bf16 ZeRO-0 optimizer steps Adam once on zero gradients when it is built; the
    backend undoes that, so the first real step moves every entry by lr (Adam's first step is
    lr * sign(g)), not 2.35 lr (the bias correction of a second step)."""
    engine = program({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})
    model = engine.levels["model"]
    wrapper = model.backend.optimizer
    masters = [m for group in wrapper.fp32_groups for m in group]
    before = [m.detach().clone() for m in masters]
    assert all(torch.equal(m, p.detach().float()) for m, p in zip(masters, model.params))
    engine.step_level("model")  # one optimizer step (ACCUMULATION micro-steps)
    moves = torch.cat([(m - b).abs().flatten() for m, b in zip(masters, before)])
    moved = moves[moves > 0]
    # |g| >> eps almost everywhere: lr * |g| / (|g| + eps) = lr (a few entries with tiny g move less)
    assert float(moved.max()) <= 1e-3 * (1 + 1e-4), float(moved.max())  # float32 rounding of the differences
    assert float(moved.median()) == pytest.approx(1e-3, rel=1e-4)


def test_a_float32_level_called_with_bf16_tensors_gets_them_in_float32():
    """Levels of different precision in one program: a level's module receives floating inputs in its
    own dtype when one side is bf16/fp16 (float64 vs float32 is left alone: that is a user's mistake)."""
    net = weight_net()
    level = Weights(
        "weights", net, torch.optim.SGD(net.parameters(), lr=1.0), batches("meta"), config=LevelConfig(backend="torch")
    )
    out = level(torch.ones(3, 1, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    with pytest.raises(RuntimeError):
        level(torch.ones(3, 1, dtype=torch.float64))


@pytest.mark.parametrize("stage", [0, 3])
def test_the_shipped_bf16_configs_run_an_mlo_step(stage):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "ds" / f"zero{stage}_bf16.json"
    engine = program(str(path), max_steps=2)
    model = engine.levels["model"]
    history = engine.run()
    assert {p.dtype for p in model.params} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(v)) for row in history for v in row.values() if isinstance(v, float))
    assert history[-1]["weights/hypergrad_norm"] > 0


@pytest.mark.parametrize("stage", [0, 3])
def test_the_float32_masters_are_evaluated_in_place_and_left_bit_identical(stage):
    """Where the optimizer holds a float32 master of what a bf16 level swaps (ZeRO-0: whole parameters,
    ZeRO-3: this rank's partitions), the evaluation uses it in place (no float32 copy), and every
    method's perturbations of it are undone exactly: masters and bf16 parameters bit-identical after."""
    from deepspeed.utils import safe_get_local_fp32_param

    engine = program({"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}})
    model = engine.levels["model"]
    engine.step_level("model")
    backend = model.backend
    masters = [safe_get_local_fp32_param(p) if stage == 3 else backend.stepped_tensor(p) for p in model.params]
    with backend.precision.float32():
        swapped = {t.untyped_storage().data_ptr() for t in backend.precision._copies}
    assert swapped <= {m.untyped_storage().data_ptr() for m in masters}
    before = [m.clone() for m in masters] + [t.clone() for t in backend.local_shards]
    for method, kw in [("finite_difference", {}), ("cg", FD2), ("penalty", {"penalty_steps": 2})]:
        engine.levels["weights"].config = LevelConfig(method=method, **kw)
        engine.hypergradient("weights")
    after = [m for m in masters] + list(backend.local_shards)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert {t.dtype for t in backend.local_shards} == {torch.bfloat16}


OFFLOAD = {
    "zero3-offload-param-optimizer": {
        "stage": 3,
        "offload_param": {"device": "cpu"},
        "offload_optimizer": {"device": "cpu"},
    },
    "zero2-offload-optimizer": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OFFLOAD))
def test_an_offloaded_level_gives_the_hypergradients_of_the_same_level_not_offloaded(name, bf16):
    """Optimizer (and parameter) offload of the lower level changes where its state lives, not the MLO: every
    hypergradient of a 3-step run is the one without offload, to float32 summation order. Found on the way:
    with offload_optimizer ZeRO-3 copies gradient partitions into the buffer its accessor reads only when
    its step finalizes a boundary, so every hypergradient read zeros (a zero hypergradient, silently);
    and the hypergradient's gradient left in ZeRO-3's flat partition buffer was accumulated into the next
    training step."""
    zero = OFFLOAD[name]
    precision = {"bf16": {"enabled": True}} if bf16 else {}
    base = run_with({"zero_optimization": {"stage": zero["stage"]}, **precision})
    offloaded = run_with({"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False, **precision})
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(offloaded, base)]
    assert len(rel) > 3 and max(rel) < 1e-5, rel


def test_the_initial_step_is_undone_only_when_nothing_else_was_stepped():
    """A backend adopted after real steps (a Trainer resumed from a checkpoint) keeps the optimizer's
    state and masters: only the zero-gradient step's state is dropped."""
    from scalemlo.backend import DeepSpeedBackend

    engine = program({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})
    model = engine.levels["model"]
    engine.step_level("model")
    backend = model.backend
    masters = [m.clone() for group in backend.optimizer.fp32_groups for m in group]
    steps = [float(backend.optimizer_state(p)["step"]) for p in model.params]
    adopted = DeepSpeedBackend.adopt(backend.engine, model.params, backend.group_index)
    assert [float(adopted.optimizer_state(p)["step"]) for p in model.params] == steps == [1.0] * len(steps)
    assert all(torch.equal(a, b) for a, b in zip(masters, [m for g in backend.optimizer.fp32_groups for m in g]))
