"""Dense Hessian solve: the oracle and a debugging aid for small levels.

Builds H_X row by row with double backward (in the parameters' dtype),
averages it over ranks (each rank holds its own data), solves H w = v in
float64 and forms the mixed product by double backward. Cost: d backward
passes and O(d^2) memory, so it refuses levels with more than
``LevelConfig.exact_max_params`` parameters.
"""

from __future__ import annotations

import logging

import torch

from scalemlo import vectors
from scalemlo.distributed import mean_over_ranks_
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.methods import register

log = logging.getLogger(__name__)


@register(
    "exact",
    shared_forward=False,
    double_backward="always",
    dense_hessian=True,
    cost="d double backwards (d: the lower level's parameters, at most `exact_max_params`), a d x d float64 solve",
)
def exact(problem: ResponseProblem) -> dict[str, vectors.Vector]:
    params = problem.lower.params
    problem.require_autograd("method 'exact'")
    size = sum(p.numel() for p in params)
    if size > problem.config.exact_max_params:
        raise ValueError(
            f"method 'exact' on level {problem.lower.name!r}: {size} parameters exceed "
            f"exact_max_params={problem.config.exact_max_params}; use cg or neumann, or raise the limit"
        )
    grads = problem.lower_grad_graph()
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(size):
        if flat_grad.requires_grad:
            row = torch.autograd.grad(flat_grad[i], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([r.reshape(-1) for r in vectors.grads_or_zeros(row, params)]))
        else:
            rows.append(torch.zeros(size, dtype=flat_grad.dtype))
    hessian = torch.stack(rows).double()
    mean_over_ranks_([hessian])  # this rank's Hessian -> the Hessian of the whole objective
    rhs = torch.cat([t.reshape(-1) for t in problem.v]).double()
    try:
        solution = torch.linalg.solve(hessian, rhs)
    except torch.linalg.LinAlgError:
        # Dead units or redundant parameters make H singular; the minimum-norm
        # solution is what CG converges to from zero in that case.
        log.warning("exact: the Hessian of level %r is singular; using the minimum-norm solution", problem.lower.name)
        solution = torch.linalg.pinv(hessian, hermitian=True) @ rhs
    w, i = [], 0
    for p in params:
        w.append(solution[i : i + p.numel()].reshape(p.shape).to(p.dtype))
        i += p.numel()
    return negate(problem.mixed_autograd(w))
