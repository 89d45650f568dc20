"""Conjugate gradient on (alpha H) w = alpha v.

``cg_alpha`` scales the operator and the right-hand side together, so the
solution is H^{-1} v whatever alpha is (Betty's CG returns a wrongly scaled
vector when alpha != 1). Stops early at convergence (relative residual below
the dtype's epsilon) or at non-positive curvature.
"""

from __future__ import annotations

import torch

from scalemlo import vectors
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.methods import register


@register(
    "cg",
    double_backward="second_order",
    cost="up to `cg_iterations` Hessian-vector products, 1 mixed product",
)
def cg(problem: ResponseProblem) -> dict[str, vectors.Vector]:
    alpha = problem.config.cg_alpha
    # CG is linear in v: solve for v / max|v| and scale back, so that tiny or
    # huge adjoints do not underflow or overflow the dot products.
    scale = problem.across_ranks.max_abs(problem.v)
    w = vectors.zeros_like(problem.v)
    residual = vectors.scale(problem.v, alpha / scale)
    direction = vectors.clone(residual)
    rr = problem.across_ranks.dot(residual, residual)
    # Stop once converged: iterating on in float32 drives the residual into
    # subnormals, <d, Ad> underflows to 0 and the step becomes inf (NaN out).
    tolerance = float(rr) * torch.finfo(problem.v[0].dtype).eps ** 2
    for _ in range(problem.config.cg_iterations):
        if float(rr) <= tolerance:
            break
        a_dir = vectors.scale(problem.hvp(direction), alpha)
        curvature = float(problem.across_ranks.dot(direction, a_dir))
        if not curvature > 0:
            break  # H is not positive definite along this direction: keep the iterate so far
        step = float(rr) / curvature
        vectors.axpy_(w, direction, step)
        vectors.axpy_(residual, a_dir, -step)
        rr_next = problem.across_ranks.dot(residual, residual)
        direction = vectors.add(residual, direction, float(rr_next / rr))
        rr = rr_next
    w = vectors.scale(w, scale)
    return negate(problem.mixed_(w))
