"""DARTS-style finite difference (Betty's ``darts``).

H^{-1} is replaced by eta I (eta: the lower level's learning rate), i.e. the
hypergradient through one unrolled SGD step; the mixed product is a central
difference of the uppers' gradients, so no second-order autograd is needed.
"""

from __future__ import annotations

from scalemlo.hypergrad import vectors as V
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.hypergrad.registry import register


@register("finite_difference")
def finite_difference(problem: ResponseProblem) -> dict[str, V.Vector]:
    w = problem.v  # the adjoint is the method's to consume: scale it in place, no second buffer
    for t in w:
        t.mul_(problem.lower.lr)
    return negate(problem.mixed_difference(w, problem.config.fd_radius))
