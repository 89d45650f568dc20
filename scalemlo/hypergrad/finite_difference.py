"""DARTS-style finite difference (Betty's ``darts``).

H^{-1} is replaced by eta I, eta being the learning rate of the lower level's
last step (per parameter group), i.e. the hypergradient through one unrolled
SGD step; the mixed product is a central difference of the uppers'
gradients, so no second-order autograd is needed.
"""

from __future__ import annotations

from scalemlo import vectors
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.methods import register


@register("finite_difference", cost="2 forwards (at θ ± εw)")
def finite_difference(problem: ResponseProblem) -> dict[str, vectors.Vector]:
    w = problem.take_v()  # w = eta v built in the adjoint's own storage: no second parameter-sized buffer
    for t, lr in zip(w, problem.step_lrs()):
        t.mul_(lr)
    return negate(problem.mixed_difference_(w, problem.config.fd_radius))
