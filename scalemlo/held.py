"""Values a level's step treats as constants, held fixed across the evaluations of one hypergradient.

A reweighted level's step weights each example by ``m_λ(s_i)`` where the inputs ``s_i`` (the detached
per-example losses of a Meta-Weight-Net, a scorer's features) are computed from the level's own parameters
but never differentiated. A method that evaluates the level's loss at moved parameters (the differences of
``finite_difference`` and ``sama``, and of ``neumann``/``cg``/``penalty`` with
``second_order='finite_difference'``) must see the inputs the step saw, not ones recomputed there: it would
otherwise add a term the training dynamics do not have, Σᵢ ∂²m/∂λ∂sᵢ (∇ℓᵢ·w) ℓᵢ.

`HeldInputs` keeps them: inside `HeldInputs.holding` (one hypergradient) the first evaluation
of each objective batch stores each value passed to `HeldInputs.hold`, keyed by (batch, call), and
every later evaluation gets the stored one back; outside it ``hold`` is ``value.detach()``. ``Level.held``
and the Trainer's loss (through its model level) use it.
"""

from __future__ import annotations

import contextlib

import torch


class HeldInputs:
    """The held values of one level.

    Args:
        name: the level's name (for messages).

    Attributes:
        uses_held: whether the level's step calls `hold` (True from its first call; None until a
            hypergradient has evaluated the level once, when the coordinator evaluates the held values first).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.uses_held: bool | None = None
        self._values: dict[tuple[int, int], torch.Tensor] | None = None  # None outside a hypergradient
        self._batch = 0  # the objective batch being evaluated
        self._call = 0  # calls of hold() on it so far

    @property
    def empty(self) -> bool:
        """Nothing held yet (outside a hypergradient, or before its first evaluation)."""
        return not self._values

    def start_evaluation(self) -> None:
        """A new evaluation of the current batch begins: its calls count from the first again."""
        self._call = 0

    def evaluating_batch(self, index: int) -> None:
        """The next evaluation is of objective batch ``index``."""
        self._batch = index

    def hold(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` detached; inside `holding`, the value held at this call of this batch.

        That is the value the first evaluation of this batch held at this call (stored now if this is the
        first).

        Raises:
            RuntimeError: the value differs in shape or dtype from the one held at this call.
        """
        self.uses_held = True
        value = value.detach()
        if self._values is None:
            return value
        key = (self._batch, self._call)
        self._call += 1
        stored = self._values.setdefault(key, value)
        if stored.shape != value.shape or stored.dtype != value.dtype:
            raise RuntimeError(
                f"level {self.name!r}: held() call {key[1]} on a batch received {tuple(value.shape)} "
                f"{value.dtype} where the first evaluation held {tuple(stored.shape)} {stored.dtype}; "
                "training_step must call held() the same number of times, in the same order and on "
                "values of the same shape, every time it evaluates a batch"
            )
        return stored

    @contextlib.contextmanager
    def holding(self):
        """The scope of one hypergradient: values passed to `hold` are stored, then reused."""
        previous, self._values = self._values, {}
        try:
            yield
        finally:
            self._values = previous
            self._batch = 0

    def prime(self, index: int, values: list[torch.Tensor]) -> None:
        """Hold values as the `hold` calls of an objective batch would, without evaluating the batch.

        Call it inside `holding`.

        Args:
            index: the objective batch.
            values: the values its `hold` calls would hold, in call order.
        """
        for call, value in enumerate(values):
            self._values[(index, call)] = value.detach()
        self.uses_held = True
