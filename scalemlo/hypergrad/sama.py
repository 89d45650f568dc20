"""SAMA: the base optimizer's update Jacobian in place of H^{-1}.

The lower level's last step was p <- p + u(g). SAMA treats H^{-1} v as
-(du/dg) v, the sensitivity of that step to its gradient, and forms the mixed
product by a central difference, so it stays first-order. du/dg is diagonal
for the optimizers supported here:

- SGD: -lr, with momentum times (1 - dampening), or 1 + momentum (1 - dampening)
  with Nesterov; on a parameter's first momentum step torch starts the buffer
  at g itself (no dampening): 1, or 1 + momentum with Nesterov;
- Adam / AdamW (torch's formula, u = -lr m_hat / (sqrt(s_hat) + eps)):
  du/dg = -lr [ (1 - b1) / (bc1 (sqrt(s_hat) + eps))
               - m_hat (1 - b2) g / (bc2 sqrt(s_hat) (sqrt(s_hat) + eps)^2) ]
  with m, s, t the state after the step and g that step's gradient.

lr is the learning rate of the lower level's last step, per parameter group
(a scheduler has moved the optimizer's lr on by the time the hypergradient
is taken).
"""

from __future__ import annotations

import torch

from scalemlo import vectors
from scalemlo.hypergrad.problem import ResponseProblem, negate
from scalemlo.methods import register


def _adam_sensitivity(p, v, state, group, grad, lr: float, decoupled: bool) -> torch.Tensor:
    if group.get("amsgrad") or group.get("maximize"):
        raise ValueError("method 'sama' supports Adam/AdamW without amsgrad and maximize")
    beta1, beta2 = group["betas"]
    eps = group["eps"]
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
    # Where the second moment is exactly zero (only zero gradients so far: an unused entry, or a bf16
    # gradient that cancelled to 0) the step did not move the entry and its sensitivity is a spike of
    # height 1/eps at g = 0, which would make w there ~1e8 lr v and swamp the difference: use 0 there.
    return torch.where(root > 0, lr * ((1 - beta1) / (bc1 * denom) - curvature) * v, 0.0)


def _sgd_sensitivity(v, group, lr: float, first_step: bool) -> torch.Tensor:
    momentum, dampening = group.get("momentum", 0), group.get("dampening", 0)
    if group.get("maximize"):
        raise ValueError("method 'sama' does not support SGD(maximize=True)")
    # torch's momentum buffer is b = g on a parameter's first step, b = m b + (1 - dampening) g after.
    db_dg = 1.0 if first_step else 1 - dampening
    if momentum == 0:
        factor = 1.0
    elif group.get("nesterov"):
        factor = 1 + momentum * db_dg  # the step is g + m b
    else:
        factor = db_dg
    return lr * factor * v


@register("sama", reads_last_step=True, cost="2 forwards (at θ ± εw); the last step's gradients kept")
def sama(problem: ResponseProblem) -> dict[str, vectors.Vector]:
    lower = problem.lower
    optimizer = lower.backend.torch_optimizer  # under DeepSpeed's bf16 ZeRO-0 wrapper too
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    if not adam and not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"method 'sama' on level {lower.name!r}: optimizer {type(optimizer).__name__} is not supported; "
            "use Adam, AdamW or SGD, or another method"
        )
    last = lower.backend.last_step
    lrs = problem.step_lrs()
    groups = [optimizer.param_groups[i] for i in lower.backend.group_index]
    w = []
    for i, (p, v) in enumerate(zip(lower.params, problem.v)):
        group, lr = groups[i], lrs[i]
        state = lower.backend.optimizer_state(p)
        if last is None or (adam and "exp_avg" not in state):
            # No step taken yet (or its state was reset): no sensitivity exists; fall back to lr
            # (as finite_difference).
            w.append(lr * v)
        elif adam:
            if last.grads is None:
                raise RuntimeError(
                    f"method 'sama': level {lower.name!r} did not keep its last gradient; "
                    "the engine sets Level.keep_last_grads for every level below a sama level"
                )
            decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            w.append(_adam_sensitivity(p, v, state, group, last.grads[i], lr, decoupled))
        else:
            w.append(_sgd_sensitivity(v, group, lr, first_step=last.fresh[i]))
    return negate(problem.mixed_difference_(w, problem.config.fd_radius))
