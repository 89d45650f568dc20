"""The reweighting estimator that shares the lower level's forward (``LevelConfig.shared_forward``).

Every data-reweighting program has the structure

    f(θ, λ) = mean_i m_λ(s_i) ℓ_i(θ)

with per-example losses ℓ_i, weights m_λ from the upper level and weight
inputs s_i held fixed in the lower step (the losses themselves for
Meta-Weight-Net, a source or example id for tables). A level declares it by
defining ``per_example_losses`` and ``example_weights`` (a *reweighted*
level). Along the training dynamics the mixed product of a method's w is

    (d²f / dλ dθ) w = mean_i (∇ℓ_i · w) ∂m_λ(s_i)/∂λ        (s_i fixed)

and the upper level can take its step at the start of the lower level's next
step, on that step's forward:

1. the lower level's forward on its coming batch gives ℓ_i(θ), graph kept;
2. v = ∇_θ F on the meta batch, w from the method (lr v, sama's
   preconditioned v, Neumann or CG on that batch);
3. one forward at θ + εw without gradient, then the exact restore:
   c_i = (ℓ_i(θ + εw) − ℓ_i(θ)) / ε with s_i unchanged;
4. the upper level steps on −∇_λ mean_i c_i m_λ(s_i) (a backward through the
   weighting model only);
5. the lower level finishes its step: new weights m_λ'(s_i), backward through
   the kept graph, optimizer step.

7 forward-equivalent units per step instead of the central difference's 8
(``shared_forward_difference="central"`` takes both θ ± εw for 8 units and an
error quadratic in the radius, still exact about the detach),
and the directional derivatives are those of the training dynamics (the
weights' inputs are never recomputed at moved parameters). The difference is
one-sided: its truncation error is ε/2 · wᵀ∇²ℓ_i w / (∇ℓ_i · w) relative per
example, linear in the radius, and in float32 rounding grows as the radius
shrinks (``LevelConfig.shared_forward_radius``; ``benchmarks/
hypergradient_accuracy.py`` reports both). The error is nearly the same
factor for every example, so it scales the hypergradient more than it turns
it. The learning rate in w is that of the step about to be taken (the one the
hypergradient differentiates).

The perturbation (``vectors.moved_``: w's storage keeps θ while the
parameters are moved, so the restore is a copy) writes through ``p.data``, so
the kept graph's saved tensors see no version change, and the restore is
exact, so they hold the values the forward saw; at ZeRO-3 the partitions are
restored and re-released before the kept backward gathers them again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from scalemlo.hypergrad import vectors
from scalemlo.hypergrad.rng import RandomState
from scalemlo.level import Level, frozen
from scalemlo.precision import autocast_outside, native_autocast

if TYPE_CHECKING:
    from scalemlo.hypergrad.problem import ResponseProblem


class SharedForward:
    """The lower level's forward on the batch of its coming step, shared with an upper level's step.

    Attributes:
        lower: the reweighted level whose step is in progress.
        batch: that step's batch.
        losses_of: the forward of the step (default ``lower.per_example_losses``), e.g. through a
            wrapper the driver's step uses; the moved forwards use ``lower.per_example_losses``.
        losses: ℓ_i(θ) with its graph once :meth:`forward` ran, else None.
        rng_state: the random state the forward started from (replayed for the moved forward).
    """

    def __init__(self, lower: Level, batch: Any, losses_of: Callable[[Any], torch.Tensor] | None = None):
        self.lower = lower
        self.batch = batch
        self.losses_of = losses_of
        self.losses: torch.Tensor | None = None
        self.rng_state: RandomState | None = None
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, others: Sequence[Level]) -> torch.Tensor:
        """ℓ_i(θ) on the batch, graph kept for the lower level's backward (computed once)."""
        if self.losses is None:
            if self.rng_state is None:
                self.rng_state = RandomState.capture()
            elif self.rng_state != RandomState.capture():
                raise RuntimeError("scalemlo: the random state moved between the moved forward and the step's forward")
            # a low-precision level's step runs in its own precision (the hypergradient's evaluations
            # around it in float32, scalemlo.precision)
            with (
                frozen([lv for lv in others if lv is not self.lower]),
                self.lower.backend.precision.native(),
                native_autocast(),
            ):
                if self.losses_of is None:
                    self.losses = self.lower.checked_per_example_losses(self.batch)
                else:
                    self.losses = self.losses_of(self.batch)
            # ZeRO-3 keeps some parameters gathered after a forward (persistent small ones): re-partition,
            # so that the moved forward sees every write to the partitions (the backward gathers again)
            self.lower.backend.release_gathered()
            # The forward is the step's own: what it did to buffers (BatchNorm statistics) stays,
            # although the hypergradient around it restores every level's buffers.
            self._buffers = [(b, b.detach().clone()) for b in self.lower.module.buffers()]
        return self.losses

    def keep_buffers(self) -> None:
        """Put back the buffers as the shared forward left them (after the hypergradient restored them)."""
        with torch.no_grad():
            for buffer, value in self._buffers or ():
                buffer.copy_(value)
        self._buffers = None


def check_program(upper: Level, below: Sequence[Level]) -> None:
    """Refuse, before anything is built, a program whose structure the estimator does not have.

    ``below``: every level below ``upper``.
    """
    where = f"level {upper.name!r} has LevelConfig.shared_forward=True"
    if len(below) != 1:
        raise ValueError(
            f"{where}, which needs exactly one level below it (the reweighted one); it has "
            f"{sorted(lv.name for lv in below)}. Set shared_forward=False for it"
        )
    (lower,) = below
    if not lower.reweighted:
        missing = [m for m in ("per_example_losses", "example_weights") if getattr(type(lower), m) is getattr(Level, m)]
        raise ValueError(
            f"{where}, but level {lower.name!r} is not reweighted: define per_example_losses(self, batch) -> [B] "
            f"and example_weights(self, batch, losses) -> [B] on it (missing: {missing}) instead of training_step, "
            "or set shared_forward=False"
        )
    if type(lower).training_step is not Level.training_step:
        raise ValueError(
            f"{where}, but level {lower.name!r} defines its own training_step: the estimator needs its objective "
            "to be mean(example_weights * per_example_losses); remove training_step (the default is that mean), "
            "or set shared_forward=False"
        )
    if type(lower).on_inner_loop_start is not Level.on_inner_loop_start:
        raise ValueError(
            f"{where}, but level {lower.name!r} restarts its inner loop (on_inner_loop_start) after every step "
            f"of {upper.name!r}, which shared_forward takes in the middle of {lower.name!r}'s step; set "
            "shared_forward=False"
        )


DEFAULT_RADIUS = {torch.float64: 1e-5}  # other dtypes: 1e-3
FALLBACK_RADIUS = 1e-3


def is_central(problem: ResponseProblem) -> bool:
    """Whether the difference is central: when asked for, and always for a low-precision lower level
    (or one trained under autocast), whose step's forward (bf16) cannot be differenced against a
    float32 moved forward."""
    return (
        problem.config.shared_forward_difference == "central"
        or problem.lower.backend.precision.active
        or autocast_outside()
    )


def radius_for(problem: ResponseProblem) -> float:
    """The radius of the difference: ``fd_radius`` for the central one; for the one-sided one
    ``shared_forward_radius``, or the default for the lower level's parameter dtype."""
    config = problem.config
    if is_central(problem):
        return config.fd_radius
    if config.shared_forward_radius is not None:
        return config.shared_forward_radius
    return DEFAULT_RADIUS.get(problem.local_shards[0].dtype, FALLBACK_RADIUS)


def mixed_(problem: ResponseProblem, w: vectors.Vector) -> dict[str, vectors.Vector]:
    """(d²f / dλ dθ) w for every upper, from the shared forward and one moved forward (two with
    ``shared_forward_difference="central"``); takes ``w``'s storage and frees it.

    The moved forward runs first, while the step's forward has not built its graph yet (unless
    a product of the method needed it already), and ``w`` is freed before that graph is built:
    the parameter-sized w and the kept activations are never held together."""
    shared = problem.shared
    params = [p for y in problem.uppers for p in y.params]
    size = float(problem.across_ranks.norm(w))
    if size == 0.0:
        return problem._split(vectors.zeros_like(params))
    eps = radius_for(problem) / size
    if shared.rng_state is None:  # the random state the step's forward will start from
        shared.rng_state = RandomState.capture()
    central = is_central(problem)
    if central:  # the coordinator's own exact central difference, of the per-example losses
        ((slopes,),) = problem.central_difference_(w, radius_for(problem), lambda: [[_moved_losses(problem)]])
    else:
        with vectors.moved_(problem.local_shards, w, eps):  # w's storage holds θ meanwhile
            plus = _moved_losses(problem)
    w.clear()  # its storage held θ for the exact restore; nothing of it is needed now
    base = shared.forward(problem.all_levels).detach()
    if not central:
        slopes = (plus - base) / eps  # c_i = (ℓ_i(θ + εw) − ℓ_i(θ)) / ε
    with problem._evaluating(problem.uppers):
        weights = problem.lower.example_weights(shared.batch, base)
        grads = torch.autograd.grad((slopes * weights).mean(), params, allow_unused=True)
    return problem._split(vectors.grads_or_zeros(grads, params))


def _moved_losses(problem: ResponseProblem) -> torch.Tensor:
    """ℓ_i at the (moved) parameters, without gradient, with the shared forward's random state."""
    lower, shared = problem.lower, problem.shared
    try:
        with torch.no_grad(), shared.rng_state.replayed(), frozen(problem.all_levels):  # the forward's masks
            return lower.per_example_losses(shared.batch).detach()
    finally:
        lower.backend.release_gathered()
