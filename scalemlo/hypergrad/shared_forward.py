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
from typing import Any

import torch

from scalemlo.level import Level, frozen
from scalemlo.precision import native_autocast
from scalemlo.rng import RandomState


class SharedForward:
    """The lower level's forward on the batch of its coming step, shared with an upper level's step.

    Attributes:
        lower: the reweighted level whose step is in progress.
        batch: that step's batch.
        losses_of: the forward of the step (default ``lower.per_example_losses``), e.g. through a
            wrapper the driver's step uses; the moved forwards use ``lower.per_example_losses``.
        losses: ℓ_i(θ) with its graph once `forward` ran, else None.
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
        """ℓ_i(θ) on the batch, graph kept for the lower level's backward (computed once).

        Args:
            others: every level of the program; all but the lower one are held fixed in the forward.

        Raises:
            RuntimeError: the random state moved between the moved forward and the step's forward.
        """
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


def step_inside(
    lower: Level,
    batch: Any,
    upper_step: Callable[[SharedForward], None],
    levels: Sequence[Level],
    losses_of: Callable[[Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The protocol, once for the Engine and the Trainer: an upper level's step on the forward of ``lower``'s.

    Args:
        lower: the reweighted level whose step is coming.
        batch: that step's batch.
        upper_step: ``upper_step(shared)`` takes the upper level's step on the forward of ``lower``'s coming
            step on ``batch`` (a `SharedForward`).
        levels: every level, held fixed in the forward.
        losses_of: the forward of the step (default ``lower.per_example_losses``; see `SharedForward`).

    Returns:
        That forward's per-example losses, graph kept, for ``lower`` to finish its step with (the forward's
        buffer updates kept).
    """
    shared = SharedForward(lower, batch, losses_of=losses_of)
    upper_step(shared)
    shared.keep_buffers()
    return shared.forward(levels)


def check_program(upper: Level, below: Sequence[Level]) -> None:
    """Refuse, before anything is built, a program whose structure the estimator does not have.

    Args:
        upper: the level with ``LevelConfig.shared_forward``.
        below: every level below ``upper``.

    Raises:
        ValueError: ``upper`` has other than exactly one level below it, or that level is not reweighted,
            defines its own ``training_step`` or restarts its inner loop (``on_inner_loop_start``).
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
