"""The MLO loop: schedule, accumulation, warm-up, data, validation, backends."""

import json

import pytest
import torch

from scalemlo import Engine, EngineConfig, Level, LevelConfig
from scalemlo.testing import VectorModule


class Lower(Level):
    """f(theta, lam) = 0.5 theta^T A theta - theta^T B lam (+ batch noise)."""

    def training_step(self, batch):
        a, b, noise = batch
        theta = self.module()
        return 0.5 * theta @ a @ theta - theta @ (b @ self.uppers["upper"]() + noise)


class Upper(Level):
    """F(theta, lam) = 0.5 |theta - t|^2 + 0.5 gamma |lam|^2."""

    gamma = 0.1

    def training_step(self, batch):
        t = batch
        lam = self.module()
        return 0.5 * ((self.lowers["lower"]() - t) ** 2).sum() + 0.5 * self.gamma * (lam**2).sum()

    def validation_step(self):
        return {"lam_norm": float(self.module().norm())}


def problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(4, 4, generator=g, dtype=dtype)
    a = m @ m.T / 4 + torch.eye(4, dtype=dtype)
    b = torch.randn(4, 3, generator=g, dtype=dtype)
    t = torch.randn(4, generator=g, dtype=dtype)
    return a, b, t


def build(
    upper_config,
    lower_config=None,
    lower_batches=None,
    max_steps=10,
    dtype=torch.float64,
    lr=(0.1, 0.2),
    optimizer=torch.optim.SGD,
    **engine_kwargs,
):
    a, b, t = problem(dtype=dtype)
    lower_batches = lower_batches or [(a, b, torch.zeros(4, dtype=dtype))]
    lower_module, upper_module = VectorModule(torch.zeros(4, dtype=dtype)), VectorModule(torch.zeros(3, dtype=dtype))
    lower = Lower(
        "lower",
        lower_module,
        optimizer(lower_module.parameters(), lr=lr[1]),
        lower_batches,
        config=lower_config or LevelConfig(backend=upper_config.backend),
    )
    upper = Upper("upper", upper_module, optimizer(upper_module.parameters(), lr=lr[0]), [t], config=upper_config)
    config = EngineConfig(max_steps=max_steps, progress_bar=False, **engine_kwargs)
    return Engine([lower, upper], {"upper": ["lower"]}, config)


def test_unroll_schedule_and_warmup():
    engine = build(LevelConfig(method="cg", backend="torch", unroll_steps=3, warmup_steps=6), max_steps=12)
    engine.run()
    assert engine.levels["lower"].steps == 12
    assert engine.levels["upper"].steps == 2  # iterations 9 and 12; 3 and 6 are warm-up


def test_three_level_periods():
    from scalemlo.testing import ChainProblem, chain_engine

    prob = ChainProblem.make()
    z = torch.zeros
    engine = chain_engine(
        prob,
        z(3, dtype=torch.float64),
        z(4, dtype=torch.float64),
        z(5, dtype=torch.float64),
        LevelConfig(method="cg", backend="torch", unroll_steps=2),
        max_steps=8,
    )
    engine.run()
    assert [engine.levels[n].steps for n in "ABC"] == [2, 4, 8]


def test_data_cycles_and_counts_epochs():
    a, b, _ = problem()
    batches = [(a, b, torch.full((4,), float(i), dtype=torch.float64)) for i in range(3)]
    engine = build(LevelConfig(method="cg", backend="torch"), lower_batches=batches, max_steps=7)
    engine.run()
    lower = engine.levels["lower"]
    assert lower.epoch == 2 and float(lower.batch[2][0]) == 0.0  # 7th batch is the first of the third epoch


def test_gradient_accumulation_averages_batches():
    """Two batches with noise +e and -e, accumulated, equal one step on the noise-free batch."""
    a, b, _ = problem()
    e = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    acc = build(
        LevelConfig(method="cg", backend="torch", warmup_steps=100),
        lower_config=LevelConfig(backend="torch", gradient_accumulation=2),
        lower_batches=[(a, b, e), (a, b, -e)],
        max_steps=3,
    )
    plain = build(LevelConfig(method="cg", backend="torch", warmup_steps=100), max_steps=3)
    acc.run()
    plain.run()
    assert torch.allclose(acc.levels["lower"].module.p, plain.levels["lower"].module.p, rtol=0, atol=1e-14)
    assert acc.levels["lower"].steps == 3 and acc.levels["lower"].epoch == 2


def test_validation_hook_and_callbacks():
    seen = []
    engine = build(
        LevelConfig(method="cg", backend="torch"),
        max_steps=6,
        valid_every=3,
        log_every=2,
    )
    engine.callbacks.append(lambda eng, metrics: seen.append((eng.global_step, dict(metrics))))
    history = engine.run()
    assert [h["step"] for h in history] == [2, 3, 4, 6]
    assert "valid/upper/lam_norm" in history[1] and "valid/upper/lam_norm" not in history[0]
    assert [s for s, _ in seen] == [2, 3, 4, 6]
    assert history[-1]["upper/hypergrad_norm"] > 0 and "lower/loss" in history[-1]


def test_penalty_converges_to_the_known_bilevel_optimum():
    """lam* = argmin 0.5 |K lam - t|^2 + 0.5 gamma |lam|^2 with K = A^{-1} B (theta* = K lam)."""
    a, b, t = problem()
    k = torch.linalg.solve(a, b)
    lam_star = torch.linalg.solve(k.T @ k + Upper.gamma * torch.eye(3, dtype=torch.float64), k.T @ t)
    config = LevelConfig(
        method="penalty", backend="torch", unroll_steps=5, penalty_alpha=1e3, penalty_steps=5, penalty_lr=0.3
    )
    engine = build(config, max_steps=5 * 400, lr=(0.3, 0.3))
    engine.run()
    lam = engine.levels["upper"].module.p.detach()
    assert float((lam - lam_star).norm() / lam_star.norm()) <= 1e-2
    assert float(lam_star.norm()) > 0.1  # the optimum is not the starting point


def test_deepspeed_and_torch_backends_follow_the_same_trajectory():
    """Same program, float32, Adam, clipping, accumulation: one level per DeepSpeed
    engine (ZeRO-0) against plain torch optimizers."""
    a, b, _ = problem(dtype=torch.float32)
    e = torch.tensor([1.0, -2.0, 0.5, 3.0])
    batches = [(a, b, e), (a, b, -0.5 * e)]
    runs = {}
    for backend in ("deepspeed", "torch"):
        engine = build(
            LevelConfig(method="finite_difference", backend=backend, unroll_steps=2, gradient_clipping=0.5),
            lower_config=LevelConfig(backend=backend, gradient_accumulation=2, gradient_clipping=1.0),
            lower_batches=batches,
            max_steps=20,
            dtype=torch.float32,
            optimizer=torch.optim.Adam,
            lr=(0.05, 0.05),
        )
        if backend == "deepspeed":
            assert type(engine.levels["lower"].backend).__name__ == "DeepSpeedBackend"
        engine.run()
        runs[backend] = [engine.levels[n].module.p.detach().clone() for n in ("lower", "upper")]
    for ds, pt in zip(runs["deepspeed"], runs["torch"]):
        assert float(pt.norm()) > 0.1
        assert torch.allclose(ds, pt, rtol=1e-5, atol=1e-6)


def test_deepspeed_default_clipping_is_not_applied():
    """DeepSpeed 0.19 clips at norm 1 when its config says nothing; a level that
    asked for no clipping must take the full step."""
    engine = build(
        LevelConfig(method="cg", backend="deepspeed", warmup_steps=100), max_steps=1, dtype=torch.float32, lr=(0.1, 1.0)
    )
    a, b, t = problem(dtype=torch.float32)
    lower = engine.levels["lower"]
    assert lower.backend.engine.gradient_clipping() == 0.0
    engine.run()
    # from theta = 0 and lam = 0, the gradient is 0, so use a non-zero start instead
    with torch.no_grad():
        lower.module.p.fill_(10.0)
    expected = lower.module.p.detach() - 1.0 * (a @ lower.module.p.detach())
    engine.step()
    assert torch.allclose(lower.module.p.detach(), expected, rtol=1e-6)


def test_user_deepspeed_config_must_agree_with_level_config(tmp_path):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 0}}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 but LevelConfig.gradient_accumulation=1"):
        build(LevelConfig(method="cg", deepspeed_config=str(path)), dtype=torch.float32)
    path.write_text(json.dumps({"gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    engine = build(LevelConfig(method="cg", deepspeed_config=str(path), gradient_clipping=2.0), dtype=torch.float32)
    assert engine.levels["upper"].backend.engine.gradient_clipping() == 2.0


def test_hypergradient_of_a_level_without_lowers_is_an_error():
    engine = build(LevelConfig(method="cg", backend="torch"))
    with pytest.raises(ValueError, match="'lower' has no level below it"):
        engine.hypergradient("lower")
    with pytest.raises(ValueError, match="unknown level 'nope'"):
        engine.hypergradient("nope")


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_scheduler_factory_steps_with_the_optimizer(backend):
    a, b, t = problem(dtype=torch.float32)
    lower_module, upper_module = VectorModule(torch.zeros(4)), VectorModule(torch.zeros(3))
    lower = Lower(
        "lower",
        lower_module,
        lambda params: torch.optim.SGD(params, lr=0.2),
        [(a, b, torch.zeros(4))],
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        config=LevelConfig(backend=backend),
    )
    upper = Upper(
        "upper",
        upper_module,
        torch.optim.SGD(upper_module.parameters(), lr=0.1),
        [t],
        config=LevelConfig(method="cg", backend=backend),
    )
    engine = Engine([lower, upper], {"upper": ["lower"]}, EngineConfig(max_steps=3, progress_bar=False))
    engine.run()
    assert lower.lr == pytest.approx(0.2 * 0.5**3) and upper.lr == pytest.approx(0.1)


def test_shipped_deepspeed_config_builds():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "ds" / "zero0_fp32.json"
    engine = build(LevelConfig(method="cg", deepspeed_config=str(path), gradient_accumulation=2), dtype=torch.float32)
    ds = engine.levels["upper"].backend.engine
    assert ds.gradient_accumulation_steps() == 2 and ds.gradient_clipping() == 0.0


def test_inner_loop_start_hook_runs_before_the_first_step_and_after_each_upper_step():
    calls = []

    class Hooked(Lower):
        def on_inner_loop_start(self):
            calls.append((self.steps, self.uppers["upper"].steps))

    a, b, t = problem()
    lower_module, upper_module = (
        VectorModule(torch.zeros(4, dtype=torch.float64)),
        VectorModule(torch.zeros(3, dtype=torch.float64)),
    )
    lower = Hooked(
        "lower",
        lower_module,
        torch.optim.SGD(lower_module.parameters(), lr=0.1),
        [(a, b, torch.zeros(4, dtype=torch.float64))],
        config=LevelConfig(backend="torch"),
    )
    upper = Upper(
        "upper",
        upper_module,
        torch.optim.SGD(upper_module.parameters(), lr=0.1),
        [t],
        config=LevelConfig(method="cg", backend="torch", unroll_steps=3),
    )
    Engine([lower, upper], {"upper": ["lower"]}, EngineConfig(max_steps=7, progress_bar=False)).run()
    assert calls == [(0, 0), (3, 1), (6, 2)]


def test_a_non_finite_hypergradient_stops_the_run_before_any_step():
    config = LevelConfig(method="neumann", backend="torch", neumann_alpha=1e6, neumann_iterations=200)
    engine = build(config, max_steps=3)
    upper = engine.levels["upper"]
    before = upper.module.p.detach().clone()
    with pytest.raises(
        FloatingPointError, match="level 'upper': the hypergradient \\(method 'neumann'\\) is not finite"
    ):
        engine.run()
    assert torch.equal(upper.module.p.detach(), before)


def test_validation_runs_in_eval_mode_and_restores_each_modules_mode():
    """Dropout off and BatchNorm statistics untouched during validation_step; afterwards every
    submodule is back in its own mode (one the user had put in eval stays in eval)."""
    seen = {}

    class Net(Level):
        def training_step(self, batch):
            return self.module(batch).pow(2).mean()

        def validation_step(self):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
            seen["modes"] = [m.training for m in self.module.modules()]
            seen["repeatable"] = torch.equal(self.module(x), self.module(x))
            return {"out": float(self.module(x).sum())}

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)
    )
    module[3].eval()  # the user's choice, to be kept
    data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    level = Net("net", module, torch.optim.SGD(module.parameters(), lr=0.1), data, config=LevelConfig(backend="torch"))
    engine = Engine([level], {}, EngineConfig(max_steps=2, progress_bar=False))
    engine.run()
    modes_before = [m.training for m in module.modules()]
    stats_before = (module[1].running_mean.clone(), module[1].running_var.clone(), int(module[1].num_batches_tracked))
    metrics = engine.validate()
    assert "valid/net/out" in metrics
    assert seen["modes"] == [False] * len(modes_before) and seen["repeatable"]
    assert [m.training for m in module.modules()] == modes_before == [True, True, True, True, False]
    assert torch.equal(module[1].running_mean, stats_before[0]) and torch.equal(module[1].running_var, stats_before[1])
    assert int(module[1].num_batches_tracked) == stats_before[2]


def test_metrics_go_to_jsonl_and_tensorboard_on_rank_0(tmp_path):
    engine = build(
        LevelConfig(method="cg", backend="torch"),
        max_steps=4,
        log_every=2,
        report_to=("jsonl", "tensorboard"),
        logging_dir=str(tmp_path),
    )
    history = engine.run()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{k: pytest.approx(v) for k, v in h.items()} for h in history] and [h["step"] for h in lines] == [
        2,
        4,
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Scalars("upper/hypergrad_norm")
    assert [s.step for s in scalars] == [2, 4]
    assert scalars[-1].value == pytest.approx(history[-1]["upper/hypergrad_norm"], rel=1e-6)


def test_report_to_needs_a_directory_and_a_known_sink():
    with pytest.raises(ValueError, match="needs EngineConfig.logging_dir"):
        EngineConfig(report_to=("jsonl",))
    with pytest.raises(ValueError, match="report_to='mlflow' is not known; allowed values: jsonl, tensorboard, wandb"):
        EngineConfig(report_to=("mlflow",), logging_dir="x")
