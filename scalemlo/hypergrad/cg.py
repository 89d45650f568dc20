"""Conjugate gradient on (alpha H) w = alpha v.

``cg_alpha`` scales the operator and the right-hand side together, so the
solution is H^{-1} v whatever alpha is (Betty's CG returns a wrongly scaled
vector when alpha != 1).
"""

from __future__ import annotations

from scalemlo.hypergrad import vectors as V
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.hypergrad.registry import register


@register("cg")
def cg(problem: ResponseProblem) -> dict[str, V.Vector]:
    alpha = problem.config.cg_alpha
    w = V.zeros_like(problem.v)
    residual = V.scale(problem.v, alpha)
    direction = V.clone(residual)
    rr = V.dot(residual, residual)
    for _ in range(problem.config.cg_iterations):
        if float(rr) == 0.0:
            break
        a_dir = V.scale(problem.hvp(direction), alpha)
        step = float(rr / V.dot(direction, a_dir))
        V.axpy_(w, direction, step)
        V.axpy_(residual, a_dir, -step)
        rr_next = V.dot(residual, residual)
        direction = V.add(residual, direction, float(rr_next / rr))
        rr = rr_next
    return negate(problem.mixed(w))
