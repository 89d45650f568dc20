"""Fully first-order penalty method (ScaleBiO / F2SA family).

Keeps an auxiliary copy z of the lower level X that tracks

    z* = argmin_z  f_X(z) - <g, z> + <v, z> / alpha  ~  p_X - H^{-1} v / alpha,

where g = df_X/dp_X at the current p_X. The tilt -<g, z> makes p_X itself the
stationary point of the unpenalized objective, so the estimate is right for
quadratics at any p_X, not only at the lower optimum (which a level that
itself learns through levels below it never sits at). ``penalty_steps``
gradient steps (lr: ``penalty_lr``, or per parameter group the lower level's last step's) are taken per call,
warm-started from the previous call's offset z - p_X. Then

    alpha (df_X/dp_Y (z) - df_X/dp_Y (p_X))  ~  -(d^2 f_X/dp_Y dp_X) H^{-1} v,

with a bias of O(1/alpha) and no second-order product at all. Unlike
ScaleBiO, the lower level keeps training on its own objective; only the copy
carries the penalty. The offset and a working copy cost two lower-level
parameter sets.
"""

from __future__ import annotations

from scalemlo import vectors
from scalemlo.hypergrad.problem import ResponseProblem
from scalemlo.methods import register


@register(
    "penalty",
    shared_forward=False,
    cost="`penalty_steps` + 1 lower gradients, 2 upper gradients; 2 copies of the lower parameters",
)
def penalty(problem: ResponseProblem) -> dict[str, vectors.Vector]:
    alpha = problem.config.penalty_alpha
    lrs = problem.lower.backend.step_lrs()
    if problem.config.penalty_lr:
        lrs = [problem.config.penalty_lr] * len(lrs)
    params = problem.local_shards
    # The copy is kept as an offset from p_X: p_X moves between calls, and a copy
    # kept in absolute terms would lag behind it by an error amplified by alpha.
    offset = problem.state.setdefault("offset", vectors.zeros_like(params))
    tilt = problem.lower_grad()
    at_lower = problem.upper_grads()
    copy = vectors.add(params, offset)
    with vectors.swapped_(params, copy):  # params hold the copy z, ``copy`` holds p_X
        for _ in range(problem.config.penalty_steps):
            grad = problem.lower_grad()
            vectors.axpy_(grad, tilt, -1.0)
            vectors.axpy_(grad, problem.v, 1.0 / alpha)
            for p, g, lr in zip(params, grad, lrs):
                vectors.axpy_([p], [g], -lr)
        at_copy = problem.upper_grads()
        for o, z, p in zip(offset, params, copy):
            o.copy_(z.detach() - p.detach())
    return {name: [alpha * (a - b) for a, b in zip(at_copy[name], at_lower[name])] for name in at_lower}
