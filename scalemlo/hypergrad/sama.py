"""SAMA: the base optimizer's update Jacobian in place of H^{-1}.

The lower level's last step was p <- p + u(g). SAMA treats H^{-1} v as
-(du/dg) v, the sensitivity of that step to its gradient, and forms the mixed
product by a central difference, so it stays first-order. du/dg is diagonal
for the optimizers supported here:

- SGD: -lr (times (1 - dampening), or 1 + momentum (1 - dampening) with Nesterov);
- Adam / AdamW (torch's formula, u = -lr m_hat / (sqrt(s_hat) + eps)):
  du/dg = -lr [ (1 - b1) / (bc1 (sqrt(s_hat) + eps))
               - m_hat (1 - b2) g / (bc2 sqrt(s_hat) (sqrt(s_hat) + eps)^2) ]
  with m, s, t the state after the step and g that step's gradient.
"""

from __future__ import annotations

import torch

from scalemlo.hypergrad import vectors as V
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.hypergrad.registry import register


def _adam_sensitivity(p, v, state, group, grad, decoupled: bool) -> torch.Tensor:
    if group.get("amsgrad") or group.get("maximize"):
        raise ValueError("method 'sama' supports Adam/AdamW without amsgrad and maximize")
    beta1, beta2 = group["betas"]
    eps, lr = group["eps"], group["lr"]
    t = float(state["step"])
    m, s = state["exp_avg"], state["exp_avg_sq"]
    g = grad
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    m_hat = m / bc1
    root = (s / bc2).sqrt()
    denom = root + eps
    if group.get("weight_decay", 0) and not decoupled:
        # Adam's L2 term entered the gradient Adam saw, at the point before the step;
        # that point is p + lr m_hat / denom. AdamW's decay does not depend on g.
        g = g + group["weight_decay"] * (p.detach() + lr * m_hat / denom)
    curvature = torch.where(root > 0, m_hat * (1 - beta2) * g / (bc2 * root.clamp_min(1e-300) * denom**2), 0.0)
    return lr * ((1 - beta1) / (bc1 * denom) - curvature) * v


def _sgd_sensitivity(v, group) -> torch.Tensor:
    momentum, dampening = group.get("momentum", 0), group.get("dampening", 0)
    if group.get("maximize"):
        raise ValueError("method 'sama' does not support SGD(maximize=True)")
    if momentum == 0:
        factor = 1.0
    elif group.get("nesterov"):
        factor = 1 + momentum * (1 - dampening)
    else:
        factor = 1 - dampening
    return group["lr"] * factor * v


@register("sama")
def sama(problem: ResponseProblem) -> dict[str, V.Vector]:
    lower = problem.lower
    optimizer = lower.optimizer
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    if not adam and not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"method 'sama' on level {lower.name!r}: optimizer {type(optimizer).__name__} is not supported; "
            "use Adam, AdamW or SGD, or another method"
        )
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    last = lower.backend.last_grads
    w = []
    for i, (p, v) in enumerate(zip(lower.params, problem.v)):
        group = groups[id(p)]
        state = optimizer.state.get(p, {})
        grad = last[i] if last is not None else None
        if adam and "exp_avg" in state:
            if grad is None:
                raise RuntimeError(
                    f"method 'sama': level {lower.name!r} did not keep its last gradient; "
                    "the engine sets Level.keep_last_grads for every level below a sama level"
                )
            decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            w.append(_adam_sensitivity(p, v, state, group, grad, decoupled))
        elif adam:
            # No step taken yet: no curvature estimate exists; fall back to lr (as finite_difference).
            w.append(group["lr"] * v)
        else:
            w.append(_sgd_sensitivity(v, group))
    return negate(problem.mixed_difference(w, problem.config.fd_radius))
