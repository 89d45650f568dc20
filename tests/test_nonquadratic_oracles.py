"""Every method against float64 oracles on a problem that is not quadratic in the lower parameters.

Per-example reweighting of softmax regression (``scalemlo.testing.ReweightedSoftmax``):

    lower: f(theta, lam) = mean_i 2 sigmoid(lam_i) CE_i(theta) + 0.5 c |theta|^2
    upper: F(theta)      = scale * mean_j CE_val_j(theta)

On the ridge oracles a central difference is exact for any step, so a wrong
step size passes them; here the difference quotient has truncation error that
grows with the step. The upper objective is scaled so that ||w|| ~ 300: a
step that ignored ||w|| would move the parameters ~300x too far. The oracles
(Newton's method, dense solves, autograd through written-out optimizer
updates) share no code with the methods.
"""

import pytest
import torch

from scalemlo import Engine, EngineConfig, LevelConfig
from scalemlo.testing import ExampleWeights, ReweightedSoftmax, SoftmaxModel, VectorModule, reweighted_softmax_engine

PROB = ReweightedSoftmax.make(scale=1e4)
LAM = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64)
THETA = PROB.solution(LAM)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def hypergradient(theta=THETA, model_optimizer=None, **kwargs):
    engine = reweighted_softmax_engine(PROB, LAM, theta, LevelConfig(backend="torch", **kwargs), model_optimizer)
    return engine.hypergradient("weights")[0]


def test_the_problem_defeats_a_step_size_that_ignores_w():
    w_norm = 0.1 * float(torch.autograd.functional.jacobian(PROB.upper, THETA).norm())  # lr * ||v||
    assert w_norm > 100


@pytest.mark.parametrize(
    "kwargs, tolerance",
    [
        ({"method": "exact"}, 1e-10),
        ({"method": "cg", "cg_iterations": 20}, 1e-10),
        ({"method": "cg", "cg_iterations": 20, "cg_alpha": 3.0}, 1e-10),
        ({"method": "neumann", "neumann_iterations": 200, "neumann_alpha": 1.0}, 1e-10),
        ({"method": "cg", "cg_iterations": 20, "second_order": "finite_difference"}, 5e-5),
        (
            {"method": "neumann", "neumann_iterations": 200, "neumann_alpha": 1.0, "second_order": "finite_difference"},
            5e-5,
        ),
    ],
)
def test_implicit_methods_reach_the_closed_form(kwargs, tolerance):
    assert rel_err(hypergradient(**kwargs), PROB.hypergradient(LAM)) <= tolerance


def test_penalty_reaches_the_closed_form():
    """Its copy sits at p - H^{-1} v / alpha, so its bias grows with ||v|| / alpha: here on the
    unscaled problem (||v|| ~ 0.3), where alpha = 1e4 leaves ~4e-5."""
    unit = ReweightedSoftmax.make(scale=1.0)
    config = LevelConfig(backend="torch", method="penalty", penalty_alpha=1e4, penalty_steps=3000, penalty_lr=1.0)
    engine = reweighted_softmax_engine(unit, LAM, THETA, config)
    assert rel_err(engine.hypergradient("weights")[0], unit.hypergradient(LAM)) <= 3e-4


def test_finite_difference_is_autograd_through_one_sgd_step():
    """At theta*, d/dlam F(theta* - lr grad f(theta*, lam)) is exactly what the method approximates;
    its central difference (radius 1e-2) carries ~7e-6 truncation error on this problem."""
    assert rel_err(hypergradient(), PROB.unrolled_hypergradient(LAM, 0.1)) <= 5e-5


class SplitVector(torch.nn.Module):
    """theta as two parameters (two optimizer groups)."""

    def __init__(self, values: torch.Tensor, cut: int):
        super().__init__()
        self.a = torch.nn.Parameter(values[:cut].clone())
        self.b = torch.nn.Parameter(values[cut:].clone())

    def forward(self):
        return torch.cat([self.a, self.b])


def split_engine(method, optimizer_factory, scheduler=None, cut=5):
    module, weights_module = SplitVector(THETA, cut), VectorModule(LAM)
    model = SoftmaxModel(
        "model",
        module,
        optimizer_factory,
        data=[(PROB.x, PROB.y, torch.arange(len(PROB.y)))],
        scheduler=scheduler,
        config=LevelConfig(backend="torch"),
        problem=PROB,
    )
    weights = ExampleWeights(
        "weights",
        weights_module,
        torch.optim.SGD(weights_module.parameters(), lr=0.1),
        [None],
        config=LevelConfig(backend="torch", method=method),
        problem=PROB,
    )
    return Engine([weights, model], {"weights": ["model"]}, EngineConfig(max_steps=0, progress_bar=False))


HALVING = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731


def off_the_optimum(engine):
    """The two levels, the model's parameters moved 0.05 away from theta* (so its gradient is not zero)."""
    model, weights = engine.levels["model"], engine.levels["weights"]
    with torch.no_grad():
        for p in model.params:
            p.add_(0.05)
    return model, weights


def mixed_product_reference(theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """-(d^2 f / dlam dtheta) w at theta, by double backward on the problem's own f."""
    lam = LAM.clone().requires_grad_(True)
    theta = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(PROB.lower(theta, lam), theta, create_graph=True)
    (out,) = torch.autograd.grad(-(g * w).sum(), lam)
    return out


def test_finite_difference_uses_each_groups_lr_of_the_last_step():
    """Two parameter groups (lr 0.1 and 0.02) under StepLR(gamma=0.5): after a step the
    optimizer's lrs have halved; w = lr v must use each group's lr of the step taken."""
    engine = split_engine(
        "finite_difference",
        lambda params: torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.02}]),
        scheduler=HALVING,
    )
    model, weights = off_the_optimum(engine)
    model.step_on_own_loss([weights])
    theta = model.module().detach().clone()
    lr = torch.full_like(THETA, 0.02)
    lr[:5] = 0.1
    reference = mixed_product_reference(theta, lr * torch.autograd.functional.jacobian(PROB.upper, theta))
    assert rel_err(engine.hypergradient("weights")[0], reference) <= 5e-5


def sgd_update(theta, g, buf, lr, momentum, dampening, nesterov):
    """torch.optim.SGD's update written out, differentiable in g (buf None: the first step)."""
    buf = g if buf is None else momentum * buf + (1 - dampening) * g
    return theta - lr * ((g + momentum * buf) if nesterov else buf)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sama_sgd_uses_the_last_steps_lr_and_torchs_first_momentum_step(nesterov):
    """With StepLR(gamma=0.5) the optimizer's lr has halved by the time the hypergradient is
    taken; sama must use the lr of the step it differentiates through. torch's first momentum
    step sets the buffer to g (no dampening); later steps dampen."""
    momentum, dampening = 0.9, 0.0 if nesterov else 0.3
    engine = split_engine(
        "sama",
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov),
        scheduler=HALVING,
    )
    model, weights = off_the_optimum(engine)
    buf, lr = None, 0.1
    for _ in range(2):
        theta_before = model.module().detach().clone()
        g = torch.autograd.functional.jacobian(lambda t: PROB.lower(t, LAM), theta_before)
        model.step_on_own_loss([weights])
        theta = model.module().detach().clone()
        g_var = g.clone().requires_grad_(True)
        new = sgd_update(theta_before, g_var, buf, lr, momentum, dampening, nesterov)
        assert torch.allclose(new.detach(), theta, rtol=0, atol=1e-14), "the written-out update must be torch's"
        v = torch.autograd.functional.jacobian(PROB.upper, theta)
        (sensitivity,) = torch.autograd.grad(new, g_var, grad_outputs=v)  # (du/dg)^T v
        reference = mixed_product_reference(theta, -sensitivity)
        assert rel_err(engine.hypergradient("weights")[0], reference) <= 5e-5
        buf = torch.cat([model.optimizer.state[p]["momentum_buffer"].detach().clone() for p in model.params])
        lr *= 0.5
    assert model.lr == pytest.approx(0.025)


def test_sama_adam_uses_the_last_steps_lr():
    """Adam under StepLR: the sensitivity -(du/dg) scales with the lr the step used."""
    engine = split_engine(
        "sama",
        lambda params: torch.optim.Adam(params, lr=0.05),
        scheduler=HALVING,
    )
    model, weights = off_the_optimum(engine)
    model.step_on_own_loss([weights])
    state = {
        k: torch.cat([model.optimizer.state[p][k].reshape(-1) for p in model.params]) for k in ("exp_avg", "exp_avg_sq")
    }
    theta_before = model.module().detach().clone()
    g = torch.autograd.functional.jacobian(lambda t: PROB.lower(t, LAM), theta_before)
    model.step_on_own_loss([weights])  # the second step, at lr 0.025
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.025
    g_var = g.clone().requires_grad_(True)
    m = b1 * state["exp_avg"] + (1 - b1) * g_var
    s = b2 * state["exp_avg_sq"] + (1 - b2) * g_var * g_var
    new = theta_before - lr / (1 - b1**2) * m / (s.sqrt() / (1 - b2**2) ** 0.5 + eps)
    theta = model.module().detach().clone()
    assert torch.allclose(new.detach(), theta, rtol=0, atol=1e-14)
    v = torch.autograd.functional.jacobian(PROB.upper, theta)
    (sensitivity,) = torch.autograd.grad(new, g_var, grad_outputs=v)
    reference = mixed_product_reference(theta, -sensitivity)
    assert rel_err(engine.hypergradient("weights")[0], reference) <= 5e-5


@pytest.mark.parametrize(
    "method, kwargs, tolerance",
    [("exact", {}, 1e-10), ("cg", {"cg_iterations": 20}, 1e-10), ("finite_difference", {}, 5e-5)],
)
def test_gradient_accumulation_differentiates_every_micro_batch_of_the_step(method, kwargs, tolerance):
    """The training set in two micro-batches, one optimizer step over both: the lower objective
    the step optimized is the whole set's, so the hypergradient is the whole set's closed form
    (the last micro-batch alone gives another answer)."""
    engine = reweighted_softmax_engine(
        PROB,
        LAM,
        THETA,
        LevelConfig(backend="torch", method=method, **kwargs),
        micro_batches=2,
        model_config=LevelConfig(backend="torch", gradient_accumulation=2),
    )
    model, weights = engine.levels["model"], engine.levels["weights"]
    for _ in range(2):
        model.step_on_own_loss([weights])  # at theta* the full-batch step does not move theta
    assert model.steps == 1 and torch.allclose(model.module.p.detach(), THETA, atol=1e-12)
    reference = PROB.unrolled_hypergradient(LAM, 0.1) if method == "finite_difference" else PROB.hypergradient(LAM)
    assert rel_err(engine.hypergradient("weights")[0], reference) <= tolerance
