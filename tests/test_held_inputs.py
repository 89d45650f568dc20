"""Level.held: a weighting model's inputs stay constants of the step in every hypergradient evaluation.

A Meta-Weight-Net-style program: the lower objective is

    f(theta, lam) = mean_i m_lam(s_i) CE_i(theta) + 0.5 c |theta|^2,   m_lam(s) = 2 sigmoid(a s + b)

with s_i = CE_i(theta) *detached*: the step never differentiates through s_i, so the
training dynamics' mixed product is -(d/dlam) mean_i m_lam(s_i) (grad CE_i . w) with s_i
fixed. A central difference that recomputes s_i at theta +- eps w adds
mean_i dm/dlam ds (grad CE_i . w) CE_i; ``held`` keeps s_i as first evaluated.
The references are written out with autograd and share no code with the methods.
"""

import pytest
import torch
import torch.nn.functional as F

from scalemlo import Engine, EngineConfig, Level, LevelConfig
from scalemlo.testing import ReweightedSoftmax, VectorModule

PROB = ReweightedSoftmax.make(scale=1.0, n=40)
LAM = torch.tensor([0.8, -0.5], dtype=torch.float64)  # (a, b)
THETA = PROB.solution(torch.zeros(len(PROB.y), dtype=torch.float64)) + 0.3  # off any optimum: grad CE_i . w matters
LR = 0.1


def weights_of(lam, s):
    return 2 * torch.sigmoid(lam[0] * s + lam[1])


def lower_objective(theta, lam, s=None):
    """f with s_i fixed (given) or recomputed from theta (None: the undetached objective)."""
    losses = PROB.per_example(theta, PROB.x, PROB.y)
    s = losses if s is None else s
    return (weights_of(lam, s) * losses).mean() + 0.5 * PROB.c * (theta**2).sum()


def mixed_reference(theta, w, held: bool):
    """-(d^2 f / dlam dtheta) w at theta, s_i held at CE_i(theta) or recomputed from theta."""
    lam = LAM.clone().requires_grad_(True)
    theta = theta.clone().requires_grad_(True)
    s = PROB.per_example(theta, PROB.x, PROB.y).detach() if held else None
    (g,) = torch.autograd.grad(lower_objective(theta, lam, s), theta, create_graph=True)
    (out,) = torch.autograd.grad(-(g * w).sum(), lam)
    return out


def one_step_reference(theta, held: bool):
    """The one-SGD-step hypergradient (w = lr v)."""
    return mixed_reference(theta, LR * torch.autograd.functional.jacobian(PROB.upper, theta), held)


class Model(Level):
    def __init__(self, *args, hold: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = hold

    def training_step(self, batch):
        x, y = batch
        theta = self.module()
        losses = F.cross_entropy(x @ theta.view(x.shape[1], PROB.classes), y, reduction="none")
        s = self.held(losses) if self.hold else losses.detach()
        lam = self.uppers["weighting"]()
        return (weights_of(lam, s) * losses).mean() + 0.5 * PROB.c * (theta**2).sum()


class Weighting(Level):
    def training_step(self, batch):
        return PROB.upper(self.lowers["model"]())


def engine(hold: bool, model_optimizer=None, **config) -> Engine:
    model = Model(
        "model",
        VectorModule(THETA),
        model_optimizer or (lambda p: torch.optim.SGD(p, lr=LR)),
        data=[(PROB.x, PROB.y)],
        config=LevelConfig(backend="torch"),
        hold=hold,
    )
    lam = VectorModule(LAM)
    weighting = Weighting(
        "weighting",
        lam,
        torch.optim.SGD(lam.parameters(), lr=0.1),
        [None],
        config=LevelConfig(backend="torch", **config),
    )
    return Engine([weighting, model], {"weighting": ["model"]}, EngineConfig(max_steps=0, progress_bar=False))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_the_detached_input_term_is_large_here():
    """Otherwise the tests below could not tell the two mixed products apart."""
    assert rel_err(one_step_reference(THETA, held=False), one_step_reference(THETA, held=True)) > 0.3


@pytest.mark.parametrize("radius", [1e-2, 1e-4])
def test_finite_difference_with_held_inputs_is_the_training_dynamics_mixed_product(radius):
    out = engine(hold=True, method="finite_difference", fd_radius=radius).hypergradient("weighting")[0]
    assert rel_err(out, one_step_reference(THETA, held=True)) <= 1e-4


def test_finite_difference_without_held_inputs_differentiates_through_the_detach():
    """What ``losses.detach()`` alone gives: the undetached objective's mixed product."""
    out = engine(hold=False, method="finite_difference", fd_radius=1e-3).hypergradient("weighting")[0]
    assert rel_err(out, one_step_reference(THETA, held=False)) <= 1e-4
    assert rel_err(out, one_step_reference(THETA, held=True)) > 0.3


@pytest.mark.parametrize("method", ["neumann", "cg"])
def test_difference_products_agree_with_autograd_when_inputs_are_held(method):
    """Double backward at theta treats a detached s_i as a constant already; with held inputs
    the central differences (Hessian and mixed products) give the same hypergradient."""
    kwargs = {"neumann": {"neumann_iterations": 20, "neumann_alpha": 0.5}, "cg": {"cg_iterations": 10}}[method]
    autograd = engine(hold=True, method=method, **kwargs).hypergradient("weighting")[0]
    held = engine(hold=True, method=method, second_order="finite_difference", **kwargs).hypergradient("weighting")[0]
    detached = engine(hold=False, method=method, second_order="finite_difference", **kwargs)
    assert rel_err(held, autograd) <= 1e-4
    assert rel_err(detached.hypergradient("weighting")[0], autograd) > 0.1


def test_sama_with_held_inputs_is_the_mixed_product_along_the_adam_steps_sensitivity():
    """After one Adam step, sama's w is -(du/dg)^T v of that step (written out here); the
    mixed product along it must keep s_i fixed, like the step did."""
    eng = engine(hold=True, method="sama", model_optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    model, weighting = eng.levels["model"], eng.levels["weighting"]
    model.step_on_own_loss([weighting])
    theta = model.module().detach().clone()
    s0 = PROB.per_example(THETA, PROB.x, PROB.y).detach()
    g = torch.autograd.functional.jacobian(lambda t: lower_objective(t, LAM, s0), THETA)
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.05
    g_var = g.clone().requires_grad_(True)
    m, sq = (1 - b1) * g_var, (1 - b2) * g_var * g_var
    new = THETA - lr / (1 - b1) * m / (sq.sqrt() / (1 - b2) ** 0.5 + eps)
    assert torch.allclose(new.detach(), theta, rtol=0, atol=1e-14), "the written-out update must be torch's"
    (sensitivity,) = torch.autograd.grad(new, g_var, grad_outputs=torch.autograd.functional.jacobian(PROB.upper, theta))
    reference = mixed_reference(theta, -sensitivity, held=True)
    assert rel_err(eng.hypergradient("weighting")[0], reference) <= 1e-4
    assert rel_err(mixed_reference(theta, -sensitivity, held=False), reference) > 0.1


class Probe(Level):
    def training_step(self, batch):
        self.held(batch[: self.n])
        return self.module().sum()


def test_held_is_detach_outside_a_hypergradient_and_refuses_inconsistent_calls():
    probe = Probe("probe", VectorModule(torch.zeros(2)), lambda p: torch.optim.SGD(p, lr=0.1), data=[None])
    x = torch.ones(3, requires_grad=True)
    out = probe.held(x * 2)
    assert not out.requires_grad and torch.equal(out, torch.full((3,), 2.0))
    batch = torch.arange(4.0)
    with probe.holding():
        probe.n = 2
        probe.loss(batch)
        probe.loss(batch)  # the same call: fine
        probe.n = 3
        with pytest.raises(RuntimeError, match="held\\(\\) the same number of times"):
            probe.loss(batch)
    probe.loss(batch)  # outside the scope nothing is held
