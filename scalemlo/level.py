"""Level: one optimization problem of a multilevel program."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch

from scalemlo.backend import DeepSpeedBackend, TorchBackend, zero_stage_of
from scalemlo.config import LevelConfig

log = logging.getLogger(__name__)

OptimizerLike = torch.optim.Optimizer | Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


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
        config: this level's :class:`LevelConfig`.
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
        self._iterator: Iterator | None = None
        self.epoch = 0
        self.batch: Any = None
        # The micro-batches of the last optimizer step, and of the one in progress.
        self.step_batches: list[Any] = []
        self._pending_batches: list[Any] = []
        # Set by the engine when an upper level uses sama, which needs the last gradient.
        self.keep_last_grads = False

    # ---- what the user writes -------------------------------------------------
    def training_step(self, batch: Any) -> torch.Tensor:
        """The level's objective on one batch: a scalar tensor."""
        raise NotImplementedError(f"level {self.name!r}: subclass Level and write training_step(self, batch)")

    def validation_step(self) -> Mapping[str, float] | None:
        """Optional metrics, run by the engine every ``EngineConfig.valid_every`` iterations."""
        return None

    def on_inner_loop_start(self) -> None:
        """Optional hook: runs before this level's first step and after every step of a level directly above it.

        The place to restart an inner problem, e.g. iMAML resets task
        parameters to the meta-parameters (and clears the optimizer state).
        """

    # ---- reaching other levels ----------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run this level's module (the one DeepSpeed wraps, parameters shared)."""
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

    def _build_backend(self) -> None:
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
        if self.config.backend == "deepspeed":
            self.backend = DeepSpeedBackend(
                self.module, self.params, optimizer, scheduler, self.config, self.name, group_index
            )
        else:
            self.backend = TorchBackend(self.params, optimizer, scheduler, self.config, group_index)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of this level's DeepSpeed config (0 for the torch backend)."""
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
    def next_batch(self) -> Any:
        """The next batch, cycling the data; it becomes ``self.batch``."""
        if self._iterator is None:
            self._iterator = iter(self.data)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._iterator = iter(self.data)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"level {self.name!r}: its data yielded no batches") from None
        self.batch = batch
        return batch

    def current_batch(self) -> Any:
        """The batch of the last micro-step (the next one if the level has not stepped yet)."""
        return self.batch if self.batch is not None else self.next_batch()

    def objective_batches(self) -> list[Any]:
        """The micro-batches of the last optimizer step: the objective a hypergradient differentiates.

        With ``gradient_accumulation`` k the step averaged k micro-batches, so
        the level's objective as its uppers see it is the mean of its loss over
        those k (before any step: the current batch).
        """
        return self.step_batches or [self.current_batch()]

    # ---- training -------------------------------------------------------------
    def loss(self, batch: Any) -> torch.Tensor:
        """``training_step`` with a check that it returned a scalar tensor."""
        loss = self.training_step(batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                f"level {self.name!r}: training_step must return a scalar tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        return loss

    def step_on_own_loss(self, others: Iterable[Level]) -> float:
        """One micro-step on this level's own loss; other levels are held fixed."""
        batch = self.next_batch()
        with frozen(others):
            loss = self.loss(batch)
            self.backend.backward(loss)
        self._micro_step(batch)
        return float(loss.detach())

    def step_on_gradient(self, grads: list[torch.Tensor], batch: Any) -> None:
        """One micro-step on a gradient computed elsewhere (a hypergradient) from ``batch``."""
        self.backend.backward_from_grads(grads)
        self._micro_step(batch)

    def _micro_step(self, batch: Any) -> None:
        self._pending_batches.append(batch)
        if self.backend.step(self.keep_last_grads):
            self.step_batches, self._pending_batches = self._pending_batches, []

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
