"""Conjugate gradient on (alpha H) w = alpha v.

``cg_alpha`` scales the operator and the right-hand side together, so the
solution is H^{-1} v whatever alpha is (Betty's CG returns a wrongly scaled
vector when alpha != 1). Stops early at convergence (relative residual below
the dtype's epsilon) or at non-positive curvature.
"""

from __future__ import annotations

import torch

from scalemlo.hypergrad import vectors as V
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.hypergrad.registry import register


@register("cg")
def cg(problem: ResponseProblem) -> dict[str, V.Vector]:
    alpha = problem.config.cg_alpha
    # CG is linear in v: solve for v / max|v| and scale back, so that tiny or
    # huge adjoints do not underflow or overflow the dot products.
    scale = problem.space.max_abs(problem.v)
    w = V.zeros_like(problem.v)
    residual = V.scale(problem.v, alpha / scale)
    direction = V.clone(residual)
    rr = problem.space.dot(residual, residual)
    # Stop once converged: iterating on in float32 drives the residual into
    # subnormals, <d, Ad> underflows to 0 and the step becomes inf (NaN out).
    tolerance = float(rr) * torch.finfo(problem.v[0].dtype).eps ** 2
    for _ in range(problem.config.cg_iterations):
        if float(rr) <= tolerance:
            break
        a_dir = V.scale(problem.hvp(direction), alpha)
        curvature = float(problem.space.dot(direction, a_dir))
        if not curvature > 0:
            break  # H is not positive definite along this direction: keep the iterate so far
        step = float(rr) / curvature
        V.axpy_(w, direction, step)
        V.axpy_(residual, a_dir, -step)
        rr_next = problem.space.dot(residual, residual)
        direction = V.add(residual, direction, float(rr_next / rr))
        rr = rr_next
    w = V.scale(w, scale)
    return negate(problem.mixed(w))
