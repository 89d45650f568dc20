"""Truncated Neumann series: H^{-1} v ~ alpha * sum_{k=0..K} (I - alpha H)^k v.

Converges when 0 < alpha < 2 / lambda_max(H). Hessian-vector and mixed
products by double backward or by differences (``LevelConfig.second_order``).
"""

from __future__ import annotations

from scalemlo import vectors
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.methods import register


@register(
    "neumann",
    double_backward="second_order",
    cost="`neumann_iterations` Hessian-vector products, 1 mixed product",
)
def neumann(problem: ResponseProblem) -> dict[str, vectors.Vector]:
    alpha = problem.config.neumann_alpha
    term = vectors.clone(problem.v)
    total = vectors.clone(problem.v)
    for _ in range(problem.config.neumann_iterations):
        vectors.axpy_(term, problem.hvp(term), -alpha)
        vectors.axpy_(total, term)
    return negate(problem.mixed_(vectors.scale(total, alpha)))
