"""A ZeRO-3 level with levels below it (a partitioned upper level): it steps on its hypergradient through its engine.

One process here (``tests/test_distributed_zero.py`` runs the reweighting program with a ZeRO-3 weight net
on 2 ranks against the float64 reference). The three-level quadratic chain of ``tests/test_chain.py`` in
float32, its middle level B at ZeRO-3 (a lower level of A, perturbed in its partitions, and an upper
level of C, stepping on its hypergradient), against the closed form of the one-step-unrolled
hypergradient, and a whole training run against the same chain with every level at ZeRO-0.
"""

import dataclasses
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from scalemlo import Engine, EngineConfig, LevelConfig  # noqa: E402
from scalemlo.testing import ChainA, ChainB, ChainC, ChainProblem, VectorModule  # noqa: E402

PROB64 = ChainProblem.make()
PROB = ChainProblem(
    **{
        f.name: (v.float() if torch.is_tensor(v) else v)
        for f in dataclasses.fields(PROB64)
        for v in [getattr(PROB64, f.name)]
    }
)
A = torch.tensor([0.3, -1.2, 0.7])
LR = (0.1, 0.05, 0.2)


def chain(middle_stage: int, method: str = "finite_difference", max_steps: int = 0, **kw) -> Engine:
    b, c = PROB64.b_star(A.double()).float() + 0.1, PROB64.c_star(PROB64.b_star(A.double())).float() - 0.2
    levels = []
    for cls, name, value, lr in ((ChainA, "A", A, LR[0]), (ChainB, "B", b, LR[1]), (ChainC, "C", c, LR[2])):
        module = VectorModule(value)
        stage = middle_stage if name == "B" else 0
        config = LevelConfig(method=method, deepspeed_config={"zero_optimization": {"stage": stage}}, **kw)
        levels.append(cls(name, module, torch.optim.SGD(module.parameters(), lr=lr), data=[PROB], config=config))
    return Engine(levels, {"A": ["B"], "B": ["C"]}, EngineConfig(max_steps=max_steps, progress_bar=False))


def test_the_middle_level_is_partitioned():
    engine = chain(3)
    assert engine.levels["B"].backend.partitioned and not engine.levels["A"].backend.partitioned


def test_a_zero3_middle_level_gives_the_unrolled_closed_form():
    """A's and B's hypergradients (finite_difference: H^{-1} ~ lr I per level) at ZeRO-3 B."""
    engine = chain(3)
    b = engine.levels["B"].module.p.ds_tensor.detach().double().clone()
    c = engine.levels["C"].module.p.detach().double().clone()
    v_b = (b - PROB64.t_b) + LR[2] * PROB64.p.T @ (c - PROB64.t_c)
    want_a = PROB64.gamma * A.double() + LR[1] * PROB64.r.T @ v_b
    got_a = engine.hypergradient("A")[0].double()
    assert float((got_a - want_a).norm() / want_a.norm()) < 1e-4
    # B's own (ZeRO-3: its partition, the whole vector on one rank): d f_B/db + lr_C P^T s
    want_b = PROB64.a_b @ b - PROB64.r @ A.double() + LR[2] * PROB64.p.T @ PROB64.s
    got_b = engine.hypergradient("B")[0].double()
    assert float((got_b - want_b).norm() / want_b.norm()) < 1e-4


@pytest.mark.parametrize(
    "method, kw",
    [
        ("finite_difference", {}),
        ("cg", {"second_order": "finite_difference", "cg_iterations": 3}),
        ("penalty", {"penalty_steps": 2}),
    ],
)
def test_a_zero3_middle_level_trains_as_at_zero0(method, kw):
    """30 global steps of the whole chain (B steps on its hypergradient every step, A on its own): the
    same parameters as the chain with B at ZeRO-0, to float32 rounding."""

    def trained(stage: int) -> torch.Tensor:
        engine = chain(stage, method, max_steps=30, **kw)
        engine.run()
        b = engine.levels["B"]
        b_value = b.module.p.ds_tensor if b.backend.partitioned else b.module.p
        assert b.backend.steps == 30
        return torch.cat([engine.levels["A"].module.p.detach(), b_value.detach(), engine.levels["C"].module.p.detach()])

    start = chain(0)
    initial = torch.cat([start.levels[n].module.p.detach() for n in "ABC"])
    zero3, zero0 = trained(3), trained(0)
    assert float((zero0 - initial).norm()) > 0.1  # the run moved
    assert float((zero3 - zero0).norm() / zero0.norm()) < 1e-5
