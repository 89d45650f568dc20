"""Every method against an independent float64 oracle on ridge regression.

Lower: f(theta, lambda) = 0.5 mean((X theta - y)^2) + 0.5 sum(exp(lambda) theta^2)
Upper: F(theta)         = 0.5 mean((X_val theta - y_val)^2)
The oracles below are written with autograd or dense solves, not with scalemlo.
"""

import copy

import pytest
import torch

from scalemlo import LevelConfig
from scalemlo.testing import RidgeData, ridge_engine

DATA = RidgeData.make()
LOG_LAMBDA = torch.linspace(-1.0, 0.5, 6, dtype=torch.float64)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def cosine(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def f_lower(theta, log_lambda):
    return 0.5 * ((DATA.x @ theta - DATA.y) ** 2).mean() + 0.5 * (log_lambda.exp() * theta**2).sum()


def f_upper(theta):
    return 0.5 * ((DATA.x_val @ theta - DATA.y_val) ** 2).mean()


def hypergradient(method, theta=None, optimizer="sgd", lr=0.1, **kwargs):
    theta = DATA.solution(LOG_LAMBDA) if theta is None else theta
    engine = ridge_engine(DATA, LOG_LAMBDA, theta, LevelConfig(method=method, backend="torch", **kwargs), optimizer, lr)
    return engine.hypergradient("hyper")[0]


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("neumann", dict(neumann_iterations=300, neumann_alpha=0.3)),
        ("cg", dict(cg_iterations=12)),
        ("cg", dict(cg_iterations=12, cg_alpha=0.25)),
        ("cg", dict(cg_iterations=12, cg_alpha=7.0)),
        ("cg", dict(cg_iterations=12, second_order="finite_difference")),
        ("neumann", dict(neumann_iterations=300, neumann_alpha=0.3, second_order="finite_difference")),
    ],
)
def test_implicit_methods_reach_the_closed_form(method, kwargs):
    reference = DATA.hypergradient(LOG_LAMBDA)
    result = hypergradient(method, **kwargs)
    assert cosine(result, reference) >= 0.9999
    assert rel_err(result, reference) <= 1e-3


@pytest.mark.parametrize("method, key", [("neumann", "neumann_iterations"), ("cg", "cg_iterations")])
def test_more_iterations_means_less_error(method, key):
    reference = DATA.hypergradient(LOG_LAMBDA)
    extra = {"neumann_alpha": 0.3} if method == "neumann" else {}
    errors = [rel_err(hypergradient(method, **{key: k}, **extra), reference) for k in (1, 3, 6)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1e-2  # a single iteration is visibly not converged: the test can fail


def test_exact_matches_closed_form_to_1e8():
    assert rel_err(hypergradient("exact"), DATA.hypergradient(LOG_LAMBDA)) <= 1e-8


def test_exact_refuses_large_levels():
    with pytest.raises(ValueError, match="exceed exact_max_params=3"):
        hypergradient("exact", exact_max_params=3)


def test_finite_difference_is_autograd_through_one_sgd_step_at_the_optimum():
    """At theta*, one SGD step starts and ends at theta*, so the unrolled objective
    U(lambda) = F(theta* - lr grad_theta f(theta*, lambda)) has the exact derivative
    that the finite difference approximates; compare with autograd through the step."""
    lr = 0.1
    theta = DATA.solution(LOG_LAMBDA)
    log_lambda = LOG_LAMBDA.clone().requires_grad_(True)
    theta_leaf = theta.clone().requires_grad_(True)
    inner = torch.autograd.grad(f_lower(theta_leaf, log_lambda), theta_leaf, create_graph=True)[0]
    (reference,) = torch.autograd.grad(f_upper(theta - lr * inner), log_lambda)
    assert rel_err(hypergradient("finite_difference", theta, lr=lr), reference) <= 1e-4


def test_finite_difference_after_a_real_step_matches_the_linearized_unroll():
    """Away from the optimum: the method's own math, -lr (d^2 f/dlambda dtheta) dF/dtheta
    at the current point, taken by double backward."""
    lr = 0.05
    engine = ridge_engine(
        DATA, LOG_LAMBDA, torch.zeros(6, dtype=torch.float64), LevelConfig(backend="torch"), "sgd", lr
    )
    model, hyper = engine.levels["model"], engine.levels["hyper"]
    for _ in range(3):
        model.step_on_own_loss([hyper])
    theta = model.module.p.detach().clone()
    result = engine.hypergradient("hyper")[0]
    v = torch.autograd.functional.jacobian(f_upper, theta)
    log_lambda = LOG_LAMBDA.clone().requires_grad_(True)
    theta_leaf = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(f_lower(theta_leaf, log_lambda), theta_leaf, create_graph=True)[0]
    (reference,) = torch.autograd.grad(-lr * (g * v).sum(), log_lambda)
    assert rel_err(result, reference) <= 1e-4


def reference_adam_step(theta_prev, g, m_prev, s_prev, step, lr, betas, eps, weight_decay, decoupled):
    """torch.optim.Adam/AdamW's update written out, differentiable in g."""
    b1, b2 = betas
    if weight_decay and decoupled:
        theta_prev = theta_prev * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * theta_prev
    m = b1 * m_prev + (1 - b1) * g
    s = b2 * s_prev + (1 - b2) * g * g
    denom = s.sqrt() / (1 - b2**step) ** 0.5 + eps
    return theta_prev - lr / (1 - b1**step) * m / denom


def reference_sgd_step(theta_prev, g, buf_prev, lr, momentum, dampening, nesterov):
    buf = momentum * buf_prev + (1 - dampening) * g
    return theta_prev - lr * ((g + momentum * buf) if nesterov else buf)


@pytest.mark.parametrize(
    "optimizer, options",
    [
        ("adam", {}),
        ("adam", {"weight_decay": 0.1}),
        ("adamw", {"weight_decay": 0.1}),
        ("sgd", {"momentum": 0.9}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),
    ],
)
def test_sama_is_autograd_through_the_last_optimizer_step(optimizer, options):
    """SAMA's w is -(du/dg) v for the step just taken. The oracle differentiates a
    written-out optimizer update (checked against torch's own step) with autograd,
    then forms the mixed product by double backward at the current point."""
    lr = 0.05
    engine = ridge_engine(
        DATA,
        LOG_LAMBDA,
        torch.zeros(6, dtype=torch.float64),
        LevelConfig(method="sama", backend="torch"),
        optimizer,
        lr,
    )
    model, hyper = engine.levels["model"], engine.levels["hyper"]
    opt = model.optimizer
    for group in opt.param_groups:
        group.update(options)
    for _ in range(3):
        model.step_on_own_loss([hyper])
    p = model.module.p
    state_before = copy.deepcopy(opt.state[p])
    theta_prev = p.detach().clone()
    theta_leaf = theta_prev.clone().requires_grad_(True)
    g_last = torch.autograd.grad(f_lower(theta_leaf, LOG_LAMBDA), theta_leaf)[0]
    model.step_on_own_loss([hyper])
    theta = p.detach().clone()
    group = opt.param_groups[0]

    g_var = g_last.clone().requires_grad_(True)
    if optimizer == "sgd":
        new = reference_sgd_step(
            theta_prev,
            g_var,
            state_before["momentum_buffer"],
            lr,
            group["momentum"],
            group["dampening"],
            group["nesterov"],
        )
    else:
        new = reference_adam_step(
            theta_prev,
            g_var,
            state_before["exp_avg"],
            state_before["exp_avg_sq"],
            float(state_before["step"]) + 1,
            lr,
            group["betas"],
            group["eps"],
            group["weight_decay"],
            optimizer == "adamw",
        )
    assert torch.allclose(new.detach(), theta, rtol=0, atol=1e-12), "the written-out update must be torch's"
    v = torch.autograd.functional.jacobian(f_upper, theta)
    (sensitivity,) = torch.autograd.grad(new, g_var, grad_outputs=v)  # (du/dg)^T v, diagonal here
    log_lambda = LOG_LAMBDA.clone().requires_grad_(True)
    theta_leaf = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(f_lower(theta_leaf, log_lambda), theta_leaf, create_graph=True)[0]
    (reference,) = torch.autograd.grad((g * sensitivity).sum(), log_lambda)

    result = engine.hypergradient("hyper")[0]
    assert rel_err(result, reference) <= 1e-4


def test_sama_refuses_unsupported_optimizers():
    engine = ridge_engine(DATA, LOG_LAMBDA, DATA.solution(LOG_LAMBDA), LevelConfig(method="sama", backend="torch"))
    model = engine.levels["model"]
    model.backend.optimizer = torch.optim.RMSprop(model.params, lr=0.1)
    with pytest.raises(ValueError, match="optimizer RMSprop is not supported"):
        engine.hypergradient("hyper")


def test_penalty_response_matches_closed_form_at_the_optimum():
    reference = DATA.hypergradient(LOG_LAMBDA)
    result = hypergradient("penalty", penalty_alpha=1e4, penalty_steps=2000, penalty_lr=0.3)
    assert cosine(result, reference) >= 0.9999
    assert rel_err(result, reference) <= 1e-3


def test_cg_stops_at_convergence_instead_of_dividing_by_an_underflowed_curvature():
    """float32, tiny curvature and a tiny upper gradient: iterating past convergence would give
    <d, Ad> = 0 and a NaN hypergradient; CG stops at convergence instead."""
    import math

    from scalemlo import Engine, EngineConfig, Level
    from scalemlo.testing import VectorModule

    class Lower(Level):
        def training_step(self, batch):
            return 0.5 * (self.uppers["up"]().exp() * self.module() ** 2).sum()

    class Upper(Level):
        def training_step(self, batch):
            return 1e-22 * self.lowers["low"]().sum()

    results = {}
    for method in ("cg", "exact"):
        lm, um = VectorModule(torch.ones(4)), VectorModule(torch.full((4,), math.log(1e-3)))
        low = Lower("low", lm, torch.optim.SGD(lm.parameters(), lr=0.1), [None], config=LevelConfig(backend="torch"))
        up = Upper(
            "up",
            um,
            torch.optim.SGD(um.parameters(), lr=0.1),
            [None],
            config=LevelConfig(method=method, cg_iterations=5, backend="torch"),
        )
        engine = Engine([up, low], {"up": ["low"]}, EngineConfig(max_steps=0, progress_bar=False))
        results[method] = engine.hypergradient("up")[0]
    assert torch.isfinite(results["cg"]).all()
    assert torch.allclose(results["cg"], results["exact"], rtol=1e-5, atol=0)
