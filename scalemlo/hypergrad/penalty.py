"""Fully first-order penalty method (ScaleBiO / F2SA family).

Keeps an auxiliary copy z of the lower level that tracks
    z* = argmin_z f_X(z) + <v, z> / alpha  ~  p_X - H^{-1} v / alpha,
taking ``penalty_steps`` gradient steps (lr: ``penalty_lr`` or the lower
level's) per call, warm-started from the previous call. Then
    alpha (d f_X/dp_Y (z) - d f_X/dp_Y (p_X))  ~  -(d^2 f_X/dp_Y dp_X) H^{-1} v,
with a bias of O(1/alpha) and no second-order product at all. Unlike
ScaleBiO, the lower level itself keeps training on its own objective; only the
copy carries the penalty. The copy costs one lower-level parameter set.
"""

from __future__ import annotations

from scalemlo.hypergrad import vectors as V
from scalemlo.hypergrad.problem import ResponseProblem
from scalemlo.hypergrad.registry import register


@register("penalty")
def penalty(problem: ResponseProblem) -> dict[str, V.Vector]:
    alpha = problem.config.penalty_alpha
    lr = problem.config.penalty_lr or problem.lower.lr
    params = problem.lower.params
    if "copy" not in problem.state:
        problem.state["copy"] = V.clone(params)
    copy = problem.state["copy"]
    at_lower = problem.upper_grads()
    with V.swapped(params, copy):
        for _ in range(problem.config.penalty_steps):
            grad = problem.lower_grad()
            V.axpy_(grad, problem.v, 1.0 / alpha)
            V.axpy_(params, grad, -lr)
        at_copy = problem.upper_grads()
    return {name: [alpha * (a - b) for a, b in zip(at_copy[name], at_lower[name])] for name in at_lower}
