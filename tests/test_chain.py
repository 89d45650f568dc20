"""Three-level chains A -> B -> C of quadratics, every method against a closed form.

Betty refuses neumann and cg on more than two levels; here every method
chains, and each is checked against the closed form of its own approximation:
the implicit-function hypergradient for exact / cg / neumann / penalty, the
one-step-unrolled one (H^{-1} ~ lr I per level) for finite_difference and sama
with SGD levels.
"""

import pytest
import torch

from scalemlo import LevelConfig
from scalemlo.testing import ChainProblem, chain_engine

PROB = ChainProblem.make()
A = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
LR = (0.1, 0.05, 0.2)


def at_optimum():
    b = PROB.b_star(A)
    return b, PROB.c_star(b)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def unrolled_closed_form(b, c):
    """dF_A/da when each lower level's H^{-1} is its learning rate times I."""
    v_b = (b - PROB.t_b) + LR[2] * PROB.p.T @ (c - PROB.t_c)
    return PROB.gamma * A + LR[1] * PROB.r.T @ v_b


@pytest.mark.parametrize(
    "method, kwargs, tol",
    [
        ("exact", {}, 1e-10),
        ("cg", {"cg_iterations": 30}, 1e-8),
        ("cg", {"cg_iterations": 30, "cg_alpha": 0.2}, 1e-8),
        ("neumann", {"neumann_iterations": 600, "neumann_alpha": 0.2}, 1e-6),
        ("penalty", {"penalty_alpha": 1e4, "penalty_steps": 3000, "penalty_lr": 0.2}, 1e-3),
    ],
)
def test_implicit_methods_on_a_chain(method, kwargs, tol):
    b, c = at_optimum()
    engine = chain_engine(PROB, A, b, c, LevelConfig(method=method, backend="torch", **kwargs), LR)
    assert rel_err(engine.hypergradient("A")[0], PROB.hypergradient_a(A, b, c)) <= tol


@pytest.mark.parametrize("method", ["finite_difference", "sama"])
def test_unrolled_methods_on_a_chain(method):
    b, c = at_optimum()
    b, c = b + 0.1, c - 0.2  # away from the optimum: the formula holds anywhere
    engine = chain_engine(PROB, A, b, c, LevelConfig(method=method, backend="torch"), LR)
    assert rel_err(engine.hypergradient("A")[0], unrolled_closed_form(b, c)) <= 1e-8


def test_middle_level_hypergradient_goes_through_the_bottom_level():
    b, c = at_optimum()
    engine = chain_engine(PROB, A, b, c, LevelConfig(method="exact", backend="torch"), LR)
    direct = PROB.a_b @ b - PROB.r @ A  # d f_B / d b with c held fixed
    assert rel_err(engine.hypergradient("B")[0], direct + PROB.hypergradient_b(c)) <= 1e-10


def test_chain_training_reaches_the_trilevel_optimum():
    """Run the whole program with cg and compare A with the minimizer of
    F_A(a, b*(a), c*(b*(a))), which is a quadratic in a solved in closed form."""
    # Total map a -> (b, c) is affine: b = K_b a + k_b, c = K_c a + k_c.
    eye = torch.eye(3, dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    k_b = PROB.b_star(zeros)
    big_kb = torch.stack([PROB.b_star(e) - k_b for e in eye], 1)
    k_c = PROB.c_star(k_b)
    big_kc = torch.stack([PROB.c_star(PROB.b_star(e)) - k_c for e in eye], 1)
    lhs = big_kc.T @ big_kc + big_kb.T @ big_kb + PROB.gamma * eye
    rhs = big_kc.T @ (PROB.t_c - k_c) + big_kb.T @ (PROB.t_b - k_b)
    a_star = torch.linalg.solve(lhs, rhs)

    config = LevelConfig(method="cg", backend="torch", cg_iterations=10, unroll_steps=10)
    start_b, start_c = torch.zeros(4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    engine = chain_engine(PROB, zeros, start_b, start_c, config, (0.2, 0.3, 0.3), max_steps=10 * 10 * 40)
    engine.run()
    a_final = engine.levels["A"].module.p.detach()
    assert rel_err(a_final, a_star) <= 1e-3


def test_sama_with_adam_reads_every_level_below():
    """A's sama needs C's last Adam gradient too, two levels down."""
    b, c = at_optimum()
    engine = chain_engine(
        PROB, A, b, c, LevelConfig(method="sama", backend="torch"), LR, max_steps=4, optimizer=torch.optim.Adam
    )
    engine.run()
    assert engine.levels["C"].backend.last_step.grads is not None
    assert torch.isfinite(engine.hypergradient("A")[0]).all()
