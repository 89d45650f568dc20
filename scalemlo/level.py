"""Level: one optimization problem of a multilevel program."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from scalemlo.backend import (
    ACCUMULATING,
    NONFINITE,
    OVERFLOW,
    DeepSpeedBackend,
    TorchBackend,
    deepspeed_config_for,
    zero_stage_of,
)
from scalemlo.config import LevelConfig
from scalemlo.data import DataCursor
from scalemlo.distributed import finite_on_every_rank
from scalemlo.held import HeldInputs
from scalemlo.precision import is_low_precision

log = logging.getLogger(__name__)

OptimizerLike = torch.optim.Optimizer | Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class _Fed:
    """The data of a level whose batches its driver hands it (``Level.fed_micro_step``), e.g. the Trainer's."""

    def __repr__(self) -> str:
        return "FED"


FED = _Fed()


class Level:
    """One level: a module, its optimizer, its data and its objective.

    Subclass it and write ``training_step(self, batch) -> loss`` (a scalar
    tensor). Inside it, call modules of other levels by name:
    ``self.uppers["meta"](x)`` runs the upper level's module,
    ``self.lowers["model"](x)`` the lower level's. ``self.level(name)`` reaches
    any level. Nothing is injected as an attribute.

    Args:
        name: unique name used in the engine's edges.
        module: any ``nn.Module``; its parameters with ``requires_grad`` are
            the level's trainable parameters.
        optimizer: an optimizer over the module's parameters, or a factory
            ``params -> optimizer``.
        data: any iterable or DataLoader of batches; cycled, epochs counted.
        scheduler: an LR scheduler or a factory ``optimizer -> scheduler``.
        config: this level's `LevelConfig`.
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        optimizer: OptimizerLike,
        data: Iterable | None,
        scheduler: Any = None,
        config: LevelConfig | None = None,
    ):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a level name must be a non-empty string, got {name!r}")
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"level {name!r}: module must be a torch.nn.Module, got {type(module).__name__}")
        self.name = name
        self.module = module
        self.data = data
        self.config = config if config is not None else LevelConfig()
        if not isinstance(self.config, LevelConfig):
            raise ValueError(f"level {name!r}: config must be a LevelConfig, got {type(self.config).__name__}")
        self.params: list[torch.nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"level {name!r}: the module has no parameters with requires_grad=True")
        self._optimizer_arg = optimizer
        self._scheduler_arg = scheduler
        self.backend: TorchBackend | DeepSpeedBackend | None = None
        self._program: Mapping[str, Level] = MappingProxyType({})
        self._uppers: tuple[str, ...] = ()
        self._lowers: tuple[str, ...] = ()
        self.cursor = DataCursor(data, name) if data is not None and data is not FED else None
        self.batch: Any = None
        # The micro-batches of the last optimizer step, and of the one in progress.
        self.step_batches: list[Any] = []
        self._pending_batches: list[Any] = []
        # Set by the engine when an upper level's method reads the last step (Method.reads_last_step).
        self.keep_last_grads = False
        self.skipped_batches = 0  # non-finite losses left out (EngineConfig.nonfinite="skip")
        self.skipped_steps = 0  # optimizer steps not taken for non-finite gradients
        self.overflow_steps = 0  # an fp16 level's steps skipped for an overflow (its loss scale was lowered)
        # Values the step holds fixed across the evaluations of one hypergradient (see held()).
        self.held_inputs = HeldInputs(name)

    # ---- what the user writes -------------------------------------------------
    def training_step(self, batch: Any) -> torch.Tensor:
        """The level's objective on one batch: a scalar tensor.

        For a reweighted level (one that defines `per_example_losses` and
        `example_weights`) it is ``mean_i m_i * l_i`` with the weights' inputs held
        (`weighted_loss`); any other level writes its own.
        """
        if self.reweighted:
            return self.weighted_loss(batch, self.checked_per_example_losses(batch))
        raise NotImplementedError(
            f"level {self.name!r}: subclass Level and write training_step(self, batch) (or, for a level whose "
            "data an upper level weighs, per_example_losses(self, batch) and example_weights(self, batch, losses))"
        )

    # ---- reweighted levels: f(θ, λ) = mean_i m_λ(s_i) ℓ_i(θ), s_i held fixed in the step ---------------
    def per_example_losses(self, batch: Any) -> torch.Tensor:
        """A reweighted level's per-example losses ℓ_i(θ) of a batch: a float tensor of shape [B].

        Define it together with `example_weights` (and no ``training_step``) to declare the
        structure every data-reweighting program has; the objective is then
        ``mean_i example_weights(batch, s)_i * losses_i``, and an upper level can take its steps
        inside this level's step on the same forward (``LevelConfig.shared_forward``).
        """
        raise NotImplementedError(f"level {self.name!r} does not define per_example_losses(self, batch)")

    def example_weights(self, batch: Any, losses: torch.Tensor) -> torch.Tensor:
        """A reweighted level's weights m_λ of a batch's examples, shape [B], from the upper levels.

        Fold any normalisation into the weights: the objective is ``mean(weights * losses)``.

        Args:
            batch: the batch whose examples are weighted.
            losses: the per-example losses, detached and held fixed (the Meta-Weight-Net input);
                ignore them for weights that depend on the example only (per-source, per-example tables).

        Returns:
            The weights, shape [B].
        """
        raise NotImplementedError(f"level {self.name!r} does not define example_weights(self, batch, losses)")

    @property
    def reweighted(self) -> bool:
        """True when the level defines both `per_example_losses` and `example_weights`."""
        cls = type(self)
        return cls.per_example_losses is not Level.per_example_losses and (
            cls.example_weights is not Level.example_weights
        )

    def checked_per_example_losses(self, batch: Any) -> torch.Tensor:
        """`per_example_losses`, checked to be a floating-point vector."""
        losses = self.per_example_losses(batch)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
            got = f"{type(losses).__name__}{tuple(losses.shape) if isinstance(losses, torch.Tensor) else ''}"
            raise ValueError(
                f"level {self.name!r}: per_example_losses must return a floating-point tensor of shape [batch], "
                f"got {got}"
            )
        return losses

    def weighted_loss(self, batch: Any, losses: torch.Tensor) -> torch.Tensor:
        """``mean_i m_i l_i``: the weights from `example_weights` on the held losses."""
        weights = self.example_weights(batch, self.held(losses))
        if not isinstance(weights, torch.Tensor) or weights.shape != losses.shape:
            got = f"{type(weights).__name__}{tuple(weights.shape) if isinstance(weights, torch.Tensor) else ''}"
            raise ValueError(
                f"level {self.name!r}: example_weights must return one weight per example, shape "
                f"{tuple(losses.shape)} like per_example_losses, got {got}"
            )
        return (weights * losses).mean()

    def validation_step(self) -> Mapping[str, float] | None:
        """Optional metrics, run by the engine every ``EngineConfig.valid_every`` iterations."""
        return None

    def on_inner_loop_start(self) -> None:
        """Optional hook: runs before this level's first step and after every step of a level directly above it.

        The place to restart an inner problem, e.g. iMAML resets task
        parameters to the meta-parameters (and clears the optimizer state).
        """

    def held(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` detached, and held fixed across the evaluations of one hypergradient.

        Call it in ``training_step`` on anything the step treats as a constant although it is computed
        from this level's parameters; the usual case is the input of a weighting model, the per-example
        losses sᵢ = ℓᵢ of a Meta-Weight-Net: ``w = self.uppers["meta"](self.held(losses.detach()))``.
        A method that evaluates this level's loss at moved parameters then sees the value the step saw
        instead of one recomputed there (`scalemlo.held` says why that matters). Inside a
        hypergradient the first evaluation of each batch stores the value (at the current parameters: the
        coordinator evaluates the loss once, without gradient, before the method runs) and every later
        one reuses it; outside (the level's own steps, validation) this is ``value.detach()``. Call it the
        same number of times, in the same order, on every evaluation of a batch.
        """
        return self.held_inputs.hold(value)

    def holding(self):
        """The scope of one hypergradient: values passed to `held` are stored, then reused.

        Within it, `evaluating_batch` says which of the objective batches the next
        `loss` evaluates (values are held per batch and per call).
        """
        return self.held_inputs.holding()

    def prime_held(self, index: int, values: list[torch.Tensor]) -> None:
        """Hold values as the `held` calls of an objective batch would, without evaluating the batch.

        Call it inside `holding`.

        Args:
            index: the objective batch (``objective_batches()[index]``).
            values: the values its `held` calls would hold, in call order.
        """
        self.held_inputs.prime(index, values)

    def evaluating_batch(self, index: int) -> None:
        """The next `loss` evaluates objective batch ``index`` (``objective_batches()[index]``)."""
        self.held_inputs.evaluating_batch(index)

    @property
    def uses_held(self) -> bool | None:
        """Whether ``training_step`` calls `held` (None until a hypergradient evaluated the level)."""
        return self.held_inputs.uses_held

    @uses_held.setter
    def uses_held(self, value: bool | None) -> None:
        self.held_inputs.uses_held = value

    # ---- reaching other levels ----------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run this level's module (the one DeepSpeed wraps, parameters shared).

        Floating-point tensor arguments are cast to the module's parameter dtype when one of the two
        is bf16/fp16 (a float32 weight net fed a bf16 model's losses, or the reverse), as in a program
        whose levels have different precisions.
        """
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            args = tuple(_cast_to(a, dtype) for a in args)
            kwargs = {k: _cast_to(v, dtype) for k, v in kwargs.items()}
        return self.module(*args, **kwargs)

    def level(self, name: str) -> Level:
        """Any level of the program by name."""
        try:
            return self._program[name]
        except KeyError:
            raise KeyError(
                f"level {self.name!r} asked for unknown level {name!r}; known: {sorted(self._program)}"
            ) from None

    @property
    def uppers(self) -> Mapping[str, Level]:
        """Levels directly above this one, by name."""
        return MappingProxyType({n: self._program[n] for n in self._uppers})

    @property
    def lowers(self) -> Mapping[str, Level]:
        """Levels directly below this one, by name."""
        return MappingProxyType({n: self._program[n] for n in self._lowers})

    # ---- set-up by the engine -------------------------------------------------
    def _attach(self, program: Mapping[str, Level], uppers: tuple[str, ...], lowers: tuple[str, ...]) -> None:
        self._program = MappingProxyType(dict(program))
        self._uppers, self._lowers = uppers, lowers

    def _prepare(self) -> None:
        """Resolve and check the optimizer, scheduler and DeepSpeed config; nothing is built or run."""
        if self.backend is not None:  # adopted (e.g. the Trainer's DeepSpeed engine)
            return
        optimizer = self._optimizer_arg
        if not isinstance(optimizer, torch.optim.Optimizer):
            if not callable(optimizer):
                raise ValueError(
                    f"level {self.name!r}: optimizer must be a torch optimizer or a factory params -> optimizer"
                )
            optimizer = optimizer(self.params)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise ValueError(f"level {self.name!r}: the optimizer factory returned {type(optimizer).__name__}")
        owned = {id(p) for p in self.params}
        group_of: dict[int, int] = {}
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in owned:
                    raise ValueError(
                        f"level {self.name!r}: the optimizer holds a parameter that is not a trainable "
                        "parameter of this level's module"
                    )
                group_of[id(p)] = i
        missing = [n for n, p in self.module.named_parameters() if p.requires_grad and id(p) not in group_of]
        if missing:
            raise ValueError(
                f"level {self.name!r}: trainable parameters {missing[:5]} are not in the optimizer; "
                "give the optimizer every parameter with requires_grad=True, or set requires_grad=False"
            )
        group_index = [group_of[id(p)] for p in self.params]
        scheduler = self._scheduler_arg
        if scheduler is not None and callable(scheduler) and not hasattr(scheduler, "step"):
            scheduler = scheduler(optimizer)
        ds_config = (
            deepspeed_config_for(self.config, self.name, self.module) if self.config.backend == "deepspeed" else None
        )
        self._prepared = (optimizer, scheduler, group_index, ds_config)

    def _build_backend(self) -> None:
        if not hasattr(self, "_prepared"):  # adopted
            return
        optimizer, scheduler, group_index, ds_config = self._prepared
        if ds_config is not None:
            self.backend = DeepSpeedBackend(
                self.module, self.params, optimizer, scheduler, ds_config, self.name, group_index
            )
        else:
            self.backend = TorchBackend(
                self.module, self.params, optimizer, scheduler, self.config, group_index, self.name
            )
        del self._prepared

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of this level's DeepSpeed config (0 for the torch backend)."""
        if isinstance(self.backend, DeepSpeedBackend):
            return self.backend.zero_stage
        if self.config.backend != "deepspeed":
            return 0
        return zero_stage_of(self.config.resolved_deepspeed_config(), self.name)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that steps this level (DeepSpeed's view of it when wrapped)."""
        return self.backend.optimizer

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group (see ``backend.step_lrs()`` for all)."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far."""
        return self.backend.steps if self.backend is not None else 0

    # ---- data -----------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Completed passes over the data (see `scalemlo.data`)."""
        return self.cursor.epoch if self.cursor is not None else 0

    def next_batch(self) -> Any:
        """The next batch, cycling the data; it becomes ``self.batch``."""
        if self.data is FED:
            raise ValueError(f"level {self.name!r}: its batches are fed by its driver, not drawn by the engine")
        self.batch = self.cursor.next()
        return self.batch

    def current_batch(self) -> Any:
        """The batch of the last micro-step (before the first: the one it will take, not consumed)."""
        if self.batch is None and self.cursor is None:
            raise ValueError(f"level {self.name!r}: its batches are fed by its driver, which has fed none yet")
        return self.batch if self.batch is not None else self.cursor.peek()

    def objective_batches(self) -> list[Any]:
        """The micro-batches of the last optimizer step: the objective a hypergradient differentiates.

        With ``gradient_accumulation`` k the step averaged k micro-batches, so
        the level's objective as its uppers see it is the mean of its loss over
        those k (before any step: the current batch).
        """
        return self.step_batches or [self.current_batch()]

    # ---- training -------------------------------------------------------------
    def loss(self, batch: Any, require_grad: bool = False) -> torch.Tensor:
        """``training_step`` with a check that it returned a floating-point scalar tensor.

        Args:
            batch: the batch ``training_step`` evaluates.
            require_grad: also check that the loss depends on some trainable
                parameter (the engine's first look at every level, before any step).

        Returns:
            The loss.

        Raises:
            ValueError: the loss is not a floating-point scalar tensor, or (with ``require_grad``) does
                not require grad.
        """
        self.held_inputs.start_evaluation()
        loss = self.training_step(batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                f"level {self.name!r}: training_step must return a scalar tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        if not loss.is_floating_point():
            raise ValueError(
                f"level {self.name!r}: training_step returned a loss of dtype {loss.dtype}; it must be a "
                "floating-point tensor (float32, bfloat16, float16 or float64)"
            )
        if require_grad and not loss.requires_grad:
            raise ValueError(
                f"level {self.name!r}: training_step returned a loss that does not require grad: it was "
                "computed under torch.no_grad(), detached (.item(), .detach(), .numpy()) or from no "
                "trainable parameter; return the tensor autograd can differentiate"
            )
        return loss

    def step_on_own_loss(
        self, others: Iterable[Level], nonfinite: str = "raise", upper_step: Callable | None = None
    ) -> float:
        """One micro-step on this level's own loss; other levels are held fixed.

        Args:
            others: the other levels, held fixed (``requires_grad`` off) during the forward and backward.
            nonfinite: what a non-finite loss (on any rank) does: ``"raise"`` raises FloatingPointError
                before the backward; ``"skip"`` leaves it out of the step and counts it in
                ``skipped_batches``. Non-finite gradients at the step's boundary likewise raise, or
                are counted in ``skipped_steps``.
            upper_step: ``upper_step(batch)``: for a reweighted level, an upper level's step taken inside
                this one, after the forward and before the backward (``LevelConfig.shared_forward``): it
                runs this level's forward on ``batch`` (a
                `scalemlo.hypergrad.shared_forward.SharedForward`), steps the upper level, and
                returns that forward's per-example losses, graph kept; the weights then come from the
                upper level's new parameters.

        Returns:
            The loss value.

        Raises:
            FloatingPointError: with ``nonfinite="raise"``, a non-finite loss or non-finite gradients.
        """
        batch = self.next_batch()
        others = list(others)
        if upper_step is not None:
            losses = upper_step(batch)
        with frozen(others):
            if upper_step is None:
                loss = self.loss(batch)
            else:
                self.held_inputs.start_evaluation()
                loss = self.weighted_loss(batch, losses)
            if not finite_on_every_rank([loss.detach()], self.backend.process_group):
                if nonfinite == "raise":
                    raise FloatingPointError(
                        f"level {self.name!r}: its loss is {float(loss.detach())} on this rank (non-finite on at "
                        f"least one rank) in its step {self.steps + 1}; nothing was stepped. Lower its lr or clip "
                        "its gradients, or pass EngineConfig(nonfinite='skip') to leave such batches out"
                    )
                self.skipped_batches += 1
                # The batch contributes zero, through a backward all the same: DeepSpeed's ZeRO
                # bookkeeping expects one per micro-step. A NaN that still leaks into the gradients
                # is caught at the step's boundary.
                loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
            self.backend.backward(loss)
        self._micro_step(batch, nonfinite)
        return float(loss.detach())

    def step_on_gradient(self, grads: list[torch.Tensor], batch: Any, nonfinite: str = "raise") -> None:
        """One micro-step on a gradient computed elsewhere (a hypergradient) from ``batch``.

        Args:
            grads: the gradient, one tensor per trainable parameter (layout of ``backend.local_shards``).
            batch: the batch it was computed from (recorded as a micro-batch of the step).
            nonfinite: ``"raise"`` (FloatingPointError) or ``"skip"`` (counted in ``skipped_steps``) when
                the step's gradients are not finite.
        """
        self.backend.backward_from_grads(grads)
        self._micro_step(batch, nonfinite)

    def fed_micro_step(self, batch: Any, stepped: bool) -> None:
        """Record a micro-step its driver took on ``batch``.

        For a level whose optimizer steps outside the engine (``data=FED``,
        an adopted DeepSpeed engine): the hypergradients of the levels above
        it then differentiate the objective of its last step, as for any level.

        Args:
            batch: the micro-step's batch.
            stepped: whether it ended an optimizer step.
        """
        self.batch = batch
        self._pending_batches.append(batch)
        if stepped:
            self.step_batches, self._pending_batches = self._pending_batches, []
            self.backend.steps += 1

    def _micro_step(self, batch: Any, nonfinite: str) -> None:
        self._pending_batches.append(batch)
        outcome = self.backend.step(self.keep_last_grads)
        if outcome == NONFINITE:
            if nonfinite == "raise":
                raise FloatingPointError(
                    f"level {self.name!r}: non-finite gradients in its step {self.steps + 1}; the step was not "
                    "taken (parameters and optimizer state unchanged). Lower its lr or clip its gradients, or "
                    "pass EngineConfig(nonfinite='skip') to skip such steps"
                )
            self.skipped_steps += 1
        elif outcome == OVERFLOW:  # routine under dynamic loss scaling: never an error
            self.overflow_steps += 1
        if outcome != ACCUMULATING:
            self.step_batches, self._pending_batches = self._pending_batches, []

    # ---- checkpoints (per rank; parameters and optimizer state are the backend's) ----------
    def state_dict(self) -> dict[str, Any]:
        """This rank's progress: data position, the batches of the last steps, step counters."""
        return {
            "data": self.cursor.state_dict() if self.cursor is not None else None,
            "batch": self.batch,
            "step_batches": self.step_batches,
            "pending_batches": self._pending_batches,
            "backend": self.backend.progress_state(),
            "skipped": (self.skipped_batches, self.skipped_steps),
            "overflow_steps": self.overflow_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cursor is not None:
            self.cursor.load_state_dict(state["data"])
        self.batch = state["batch"]
        self.step_batches = list(state["step_batches"])
        self._pending_batches = list(state["pending_batches"])
        self.backend.load_progress_state(state["backend"])
        self.skipped_batches, self.skipped_steps = state["skipped"]
        self.overflow_steps = state.get("overflow_steps", 0)  # absent from a checkpoint without an overflow count

    @contextlib.contextmanager
    def preserved_buffers(self):
        """Leave buffers (e.g. BatchNorm statistics) as they were after extra forwards."""
        saved = [(b, b.detach().clone()) for b in self.module.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)


def _cast_to(value: Any, dtype: torch.dtype) -> Any:
    if (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != dtype
        and (is_low_precision(value.dtype) or is_low_precision(dtype))
    ):
        return value.to(dtype)
    return value


@contextlib.contextmanager
def frozen(levels: Iterable[Level]):
    """Turn off ``requires_grad`` of other levels' parameters for a while.

    A lower level's loss reads the upper level's parameters; without this its
    backward would write gradients into the upper level (and build a graph
    for nothing).
    """
    params = [p for lv in levels for p in lv.params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
