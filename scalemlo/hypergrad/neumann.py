"""Truncated Neumann series: H^{-1} v ~ alpha * sum_{k=0..K} (I - alpha H)^k v.

Converges when 0 < alpha < 2 / lambda_max(H). Hessian-vector and mixed
products by double backward or by differences (``LevelConfig.second_order``).
"""

from __future__ import annotations

from scalemlo.hypergrad import vectors as V
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.hypergrad.registry import register


@register("neumann")
def neumann(problem: ResponseProblem) -> dict[str, V.Vector]:
    alpha = problem.config.neumann_alpha
    term = V.clone(problem.v)
    total = V.clone(problem.v)
    for _ in range(problem.config.neumann_iterations):
        V.axpy_(term, problem.hvp(term), -alpha)
        V.axpy_(total, term)
    return negate(problem.mixed(V.scale(total, alpha)))
