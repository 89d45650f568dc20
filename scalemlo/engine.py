"""Engine: holds the levels and the graph, and runs the multilevel program.

One global iteration, read top to bottom:

1. every level whose turn it is steps, lowest levels first;
2. a leaf level steps on its own loss;
3. a level with levels below it steps on its hypergradient, which the
   coordinator computes through every level below it.

A level's turn comes every ``period`` iterations: leaves have period 1, and a
level above others has period ``unroll_steps`` x (the largest period below it),
so each lower level takes ``unroll_steps`` steps per step of its upper.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from scalemlo import checkpoint, vectors
from scalemlo.config import EngineConfig
from scalemlo.distributed import finite_on_every_rank, mean_over_ranks_, rank, world_size
from scalemlo.graph import LevelGraph
from scalemlo.hypergrad import shared_forward
from scalemlo.hypergrad.coordinator import Coordinator
from scalemlo.level import FED, Level
from scalemlo.logging import MetricLogger, progress
from scalemlo.methods import METHODS, get_method
from scalemlo.precision import precision_name
from scalemlo.rng import RandomState

log = logging.getLogger(__name__)


class Engine:
    """A multilevel program.

    Args:
        levels: the `Level` objects (any order).
        edges: upper level name -> names of the levels directly below it.
        config: `EngineConfig`.
        callbacks: callables ``fn(engine, metrics: dict)`` run after each
            logged iteration.

    Raises:
        ValueError: a cycle, an unknown name, a self-edge, a level with no data
            or a duplicate name; raised before any model is wrapped or run.
    """

    def __init__(
        self,
        levels: Iterable[Level],
        edges: Mapping[str, Iterable[str]],
        config: EngineConfig | None = None,
        callbacks: Iterable[Callable[[Engine, dict], None]] = (),
    ):
        self.config = config if config is not None else EngineConfig()
        if not isinstance(self.config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(self.config).__name__}")
        levels = list(levels)
        for lv in levels:
            if not isinstance(lv, Level):
                raise ValueError(f"levels must be scalemlo.Level objects, got {type(lv).__name__}")
        self.graph = LevelGraph([lv.name for lv in levels], edges)
        self.levels: dict[str, Level] = {lv.name: lv for lv in levels}
        for lv in levels:
            if lv.data is None:
                raise ValueError(f"level {lv.name!r} has no data: pass data=... (any iterable or DataLoader)")
            if lv.data is not FED and hasattr(lv.data, "__len__") and len(lv.data) == 0:
                raise ValueError(f"level {lv.name!r}: its data is empty (len 0); give it at least one batch")
        self._check_shared_parameters(levels)
        self.callbacks = list(callbacks)
        self.period = self._periods()
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        for lv in levels:
            lv._attach(self.levels, self.graph.uppers(lv.name), self.graph.lowers(lv.name))
        for name in self.graph.names:
            if get_method(self.levels[name].config.method).reads_last_step and self.graph.lowers(name):
                for lower in self.graph.descendants(name):  # the method reads every level below's last step
                    self.levels[lower].keep_last_grads = True
        self._check_zero_stages()
        # lower name -> the upper level that takes its steps inside the lower's (LevelConfig.shared_forward)
        self.shares_forward: dict[str, str] = {}
        for name in self.graph.names:
            if self.levels[name].config.shared_forward:
                below = self.graph.descendants(name)
                shared_forward.check_program(self.levels[name], [self.levels[n] for n in below])
                self.shares_forward[below[0]] = name
        for lv in levels:  # every optimizer and DeepSpeed config checked before any engine is built
            lv._prepare()
        if self.config.checkpoint_dir is not None:
            checkpoint.check_writable(self.config.checkpoint_dir)
        for lv in levels:
            lv._build_backend()
        self._check_precisions()
        self.coordinator = Coordinator(self.levels, self.graph)
        self._meta_overflows: dict[str, int] = {}
        self.metric_logger = MetricLogger(self.config.log_every, self.config.report_to, self.config.logging_dir)
        self._checked_losses = False
        self._started = False  # the first on_inner_loop_start calls have run

    @staticmethod
    def _check_shared_parameters(levels: list[Level]) -> None:
        owner: dict[int, str] = {}
        for lv in levels:
            for p in lv.params:
                if id(p) in owner and owner[id(p)] != lv.name:
                    raise ValueError(
                        f"a parameter is trainable in both {owner[id(p)]!r} and {lv.name!r}; "
                        "each parameter belongs to one level"
                    )
                owner[id(p)] = lv.name

    def _check_zero_stages(self) -> None:
        """Refuse ZeRO stages a level's role cannot use, before any engine is built.

        ZeRO-3 parameters are partitioned: autograd cannot take gradients
        with respect to them, so a ZeRO-3 level can be trained (its own
        backward goes through DeepSpeed) and perturbed (partition-local), but
        cannot step on a hypergradient or sit under a method that needs double
        backward (``Method.double_backward``). A method that reads the last
        step of the levels below (``Method.reads_last_step``) needs their
        per-parameter gradients and optimizer state, which ZeRO 1-3 keep in
        flat partitions.
        """
        stage = {name: lv.zero_stage for name, lv in self.levels.items()}
        for name in self.graph.names:
            if not self.graph.lowers(name):
                continue
            config = self.levels[name].config
            method = get_method(config.method)
            double_backward = method.needs_double_backward(config.second_order)
            fix = "second_order='finite_difference'" if method.double_backward == "second_order" else "another method"
            if stage[name] == 3:
                # its gradients come through its engine, partition by partition: no double backward
                # into it, and no shared forward (whose product is an autograd backward into the upper)
                needs = None
                if double_backward:
                    needs = (
                        f"method {config.method!r} with second_order='autograd'"
                        if method.double_backward == "second_order"
                        else config.method
                    )
                if config.shared_forward:
                    needs = "shared_forward=True"
                if needs:
                    allowed = [m.name for m in METHODS.values() if 3 in m.upper_zero_stages("finite_difference")]
                    raise ValueError(
                        f"level {name!r} uses ZeRO-3 and has levels below it; its LevelConfig asks for {needs}, "
                        f"which needs autograd through its partitioned parameters. Use {', '.join(allowed)} "
                        "(with second_order='finite_difference' where it applies, shared_forward=False), or "
                        f"ZeRO stage 0-2 for {name!r}"
                    )
            for lower in self.graph.descendants(name):
                if method.reads_last_step and stage[lower] >= 1:
                    others = [
                        m.name for m in METHODS.values() if stage[lower] in m.lower_zero_stages(config.second_order)
                    ]
                    raise ValueError(
                        f"level {name!r} uses method {config.method!r}, which needs per-parameter optimizer state "
                        f"of level {lower!r}, but {lower!r} uses ZeRO stage {stage[lower]}; use stage 0 for "
                        f"{lower!r}, or another method for {name!r} ({', '.join(others)})"
                    )
                if stage[lower] == 3 and double_backward:
                    raise ValueError(
                        f"level {name!r}: method {config.method!r} needs double backward through level "
                        f"{lower!r}, which is ZeRO-3 partitioned; use {fix} in {name!r}'s LevelConfig"
                    )

    def _check_precisions(self) -> None:
        """Refuse a level whose precision a method that reaches it does not allow (``Method.precisions``):
        the level computing the hypergradient and every level below it, checked once their engines are built
        (DeepSpeed casts the parameters then) and before any step."""
        for name in self.graph.names:
            if not self.graph.lowers(name):
                continue
            method = get_method(self.levels[name].config.method)
            for reached in (name, *self.graph.descendants(name)):
                precision = precision_name(self.levels[reached].params)
                if precision not in method.precisions:
                    raise ValueError(
                        f"level {name!r} uses method {method.name!r}, which allows the precisions "
                        f"{', '.join(method.precisions)}, but level {reached!r} trains in {precision}; change "
                        f"{reached!r}'s precision or {name!r}'s method"
                    )

    def _periods(self) -> dict[str, int]:
        period: dict[str, int] = {}
        for name in reversed(self.graph.order):
            lowers = self.graph.lowers(name)
            if lowers:
                period[name] = self.levels[name].config.unroll_steps * max(period[n] for n in lowers)
            else:
                period[name] = 1
        return period

    # ---- the loop -----------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Run global iterations until ``config.max_steps``.

        Steps are counted from 0, so a resumed engine runs the rest.

        Returns:
            The logged metrics, those before a resume included.
        """
        logger = self.metric_logger
        every = self.config.save_every
        saved_at = None
        self.check_losses()
        for _ in progress(range(self.global_step, self.config.max_steps), self.config.progress_bar, "scalemlo"):
            metrics = self.step()
            validating = bool(self.config.valid_every) and self.global_step % self.config.valid_every == 0
            if validating:
                metrics.update(self.validate())
            if validating or logger.wants(self.global_step):
                logger.log(self.global_step, metrics)
                self.history.append({"step": self.global_step, **metrics})
                for callback in self.callbacks:
                    callback(self, metrics)
            if every and self.global_step % every == 0:
                self.save_checkpoint()
                saved_at = self.global_step
        if every and saved_at != self.global_step and self.global_step > 0:
            self.save_checkpoint()
        return self.history

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Save the whole program (every rank must call this).

        See `scalemlo.checkpoint` for what is saved and how a crash mid-save is kept from looking
        complete. With ``EngineConfig.keep_last``, only that many newest checkpoints of ``checkpoint_dir``
        are kept afterwards.

        Args:
            path: the checkpoint's directory; default ``<checkpoint_dir>/checkpoint-<global step>``.

        Returns:
            The checkpoint's directory.
        """
        if path is None:
            if self.config.checkpoint_dir is None:
                raise ValueError("save_checkpoint() needs a path, or EngineConfig.checkpoint_dir")
            path = Path(self.config.checkpoint_dir) / f"{checkpoint.PREFIX}{self.global_step}"
        saved = checkpoint.save(self, path)
        if self.config.keep_last:
            checkpoint.prune(self.config.checkpoint_dir, self.config.keep_last)
        return saved

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Restore the whole program from a checkpoint (every rank must call this).

        ``run()`` then continues up to ``max_steps``, drawing exactly the batches and random numbers the
        saved run would have drawn next.

        Args:
            path: a checkpoint directory, or a directory of them (its ``latest`` is loaded); default
                ``checkpoint_dir``.

        Returns:
            The checkpoint directory loaded.

        Raises:
            scalemlo.checkpoint.CheckpointError: missing, incomplete or corrupt (naming the last
                complete checkpoint), saved by another program (naming the differences), or holding
                objects other than tensors and plain data (naming the file; nothing of it is unpickled).
        """
        if path is None:
            if self.config.checkpoint_dir is None:
                raise ValueError("load_checkpoint() needs a path, or EngineConfig.checkpoint_dir")
            path = self.config.checkpoint_dir
        loaded = checkpoint.load(self, path)
        self._started = self._checked_losses = self.global_step > 0
        return loaded

    def _start(self) -> None:
        """Once, before the first step: every level with levels above it starts its inner loop."""
        if self._started:
            return
        self._started = True
        for name in self.graph.order:
            if self.graph.uppers(name):
                self.levels[name].on_inner_loop_start()

    def check_losses(self) -> None:
        """Evaluate every level's ``training_step`` once on the batch it will take first, and check it.

        A loss that is not a floating-point scalar, does not depend on any
        trainable parameter, or a level whose data is empty fails here, before
        any level has stepped (an upper level's first look at its objective
        can otherwise come after a long warm-up). Nothing is consumed or
        changed: the batch stays the level's next, the random generators and
        buffers are restored, no backward runs. ``run()`` calls it once.
        """
        if self._checked_losses:
            return
        self._start()
        all_levels = list(self.levels.values())
        # Drawn (not consumed) outside the forked generators: starting a pass may draw from them.
        batches = {
            name: self.levels[name].current_batch() for name in reversed(self.graph.order) if self.levels[name].cursor
        }
        with contextlib.ExitStack() as stack:
            for lv in all_levels:
                stack.enter_context(lv.preserved_buffers())
            stack.enter_context(RandomState.capture().replayed())  # the generators as they were, after
            for name, batch in batches.items():
                self.levels[name].loss(batch, require_grad=True)
        for lv in all_levels:
            lv.backend.release_gathered()
        self._checked_losses = True

    def step(self) -> dict[str, float]:
        """One global iteration: every level whose turn it is steps, lowest first.

        An upper level with ``LevelConfig.shared_forward`` whose turn it is steps inside
        the step of the level below it, after that level's forward and before its backward.
        """
        self._start()
        self.global_step += 1
        metrics: dict[str, float] = {}
        inside: set[str] = set()
        for name in reversed(self.graph.order):
            if not self._due(name) or name in inside:
                continue
            upper = self._upper_inside(name)
            if upper is not None:
                inside.add(upper)  # step_level(name) takes its step
            metrics.update(self.step_level(name, metrics))
        return metrics

    def _due(self, name: str) -> bool:
        """Whether level ``name`` steps in the current global iteration."""
        return not self.global_step % self.period[name] and self.global_step > self.levels[name].config.warmup_steps

    def _upper_inside(self, name: str) -> str | None:
        """The upper level whose turn it is and that steps inside ``name``'s step, on its forward
        (``LevelConfig.shared_forward``); None where there is none."""
        upper = self.shares_forward.get(name)
        return upper if upper is not None and self._due(upper) else None

    def step_level(
        self,
        name: str,
        this_iteration: dict[str, float] | None = None,
        shared: shared_forward.SharedForward | None = None,
    ) -> dict[str, float]:
        """One optimizer step of level ``name`` (``gradient_accumulation`` micro-steps).

        A leaf steps on its own loss; a level with levels below it on its
        hypergradient. Afterwards the levels directly below it restart their
        inner loops (``on_inner_loop_start``). ``step()`` calls this for every
        level whose turn it is; a driver with its own loop for the lower
        levels (the Trainer) calls it for the upper ones.

        Args:
            name: the level.
            this_iteration: the metrics of the levels that stepped before it (named in errors).
            shared: for a level with levels below it, the forward it shares with the coming step of the level
                below (``LevelConfig.shared_forward``), passed from inside that step: by the engine, or by a
                driver whose own loop steps that level (the Trainer). A leaf takes none: where an upper level
                with ``shared_forward`` sits above it and its turn has come, that upper level steps inside the
                leaf's first micro-step, on its forward.

        Returns:
            The level's metrics.

        Raises:
            ValueError: ``shared`` for a level with no levels below it.
            FloatingPointError: a non-finite hypergradient, not an fp16 overflow, under
                ``EngineConfig.nonfinite="raise"``.
        """
        lv = self.levels[name]
        lowers = self.graph.lowers(name)
        if shared is not None and not lowers:
            raise ValueError(f"level {name!r} has no levels below it: it shares no forward (shared=...)")
        upper_inside = None if lowers else self._upper_inside(name)
        others = [o for o in self.levels.values() if o is not lv]
        nonfinite = self.config.nonfinite
        metrics: dict[str, float] = {}
        for _ in range(lv.config.gradient_accumulation):
            if lowers:
                batch = lv.next_batch()
                grads = self.coordinator.hypergradient(name, batch, shared=shared)
                finite = finite_on_every_rank(grads, lv.backend.process_group)
                if not finite and self._meta_overflow(name):
                    # fp16 in the meta step: an overflow, routine under loss scaling, not an error; the
                    # step boundary drops the gradients on every rank (an fp16 owner lowers its own scale)
                    lv.step_on_gradient(grads, batch, "skip")
                    metrics[f"{name}/meta_overflows"] = self._meta_overflows[name]
                    continue
                if nonfinite == "raise" and not finite:
                    before = this_iteration or {}
                    lower_losses = {n: before.get(f"{n}/loss") for n in self.graph.descendants(name)}
                    raise FloatingPointError(
                        f"level {name!r}: the hypergradient (method {lv.config.method!r}) is not finite at "
                        f"global step {self.global_step}; nothing was stepped. Last losses of the levels "
                        f"below it this iteration: {lower_losses} (a non-finite one means a level below "
                        "diverged: lower its lr or clip it); otherwise check the method's settings"
                    )
                lv.step_on_gradient(grads, batch, nonfinite)  # "skip": its boundary drops them
                metrics[f"{name}/hypergrad_norm"] = (
                    float(lv.backend.across_ranks.norm(grads))
                    if lv.backend.partitioned  # shards, averaged already
                    else _norm_of_rank_average(grads, lv.backend.process_group)
                )
                metrics[f"{name}/loss"] = self.coordinator.last_loss[name]
            elif upper_inside is not None:
                upper_step = functools.partial(self._step_inside, upper_inside, name, others, metrics, this_iteration)
                metrics[f"{name}/loss"] = lv.step_on_own_loss(others, nonfinite, upper_step)
                upper_inside = None  # the first micro-step only
            else:
                metrics[f"{name}/loss"] = lv.step_on_own_loss(others, nonfinite)
        if lv.skipped_batches or lv.skipped_steps:
            metrics[f"{name}/skipped_batches"] = lv.skipped_batches
            metrics[f"{name}/skipped_steps"] = lv.skipped_steps
        if lv.backend.fp16:
            metrics[f"{name}/loss_scale"] = lv.backend.loss_scale
            metrics[f"{name}/overflow_steps"] = lv.overflow_steps
        for lower in lowers:
            self.levels[lower].on_inner_loop_start()
        return metrics

    def _meta_overflow(self, name: str) -> bool:
        """A non-finite hypergradient of ``name``: when an fp16 level took part (the owner or a level
        below it), an overflow. The loss scales of the fp16 levels below (whose passes it ran) are
        lowered, as their own steps' overflows would lower them; logged on rank 0."""
        below = [self.levels[n] for n in self.graph.descendants(name)]
        if not any(lv.backend.fp16 for lv in [self.levels[name], *below]):
            return False
        self._meta_overflows[name] = self._meta_overflows.get(name, 0) + 1
        changes = []
        for lv in below:
            if lv.backend.fp16:
                before = lv.backend.loss_scale
                lv.backend.lower_loss_scale()
                changes.append(f"{lv.name!r} {before:g} -> {lv.backend.loss_scale:g}")
        if rank() == 0:
            log.warning(
                "fp16 overflow in the hypergradient of level %r at global step %d: its step is skipped on every rank%s",
                name,
                self.global_step,
                f"; loss scales: {', '.join(changes)}" if changes else "",
            )
        return True

    def _step_inside(
        self, upper: str, lower: str, others: list[Level], metrics: dict, this_iteration: dict | None, batch: Any
    ) -> torch.Tensor:
        """``upper``'s step on the forward of ``lower``'s coming step on ``batch`` (shared_forward.step_inside)."""

        def upper_step(shared: shared_forward.SharedForward) -> None:
            metrics.update(self.step_level(upper, {**(this_iteration or {}), **metrics}, shared=shared))

        return shared_forward.step_inside(self.levels[lower], batch, upper_step, others)

    def hypergradient(self, name: str) -> list[torch.Tensor]:
        """The current hypergradient of level ``name``'s trainable parameters, one tensor per parameter.

        Steps nothing: every level's parameters, buffers and optimizer state
        are left bit-identical (the penalty method advances its own auxiliary
        copy). Uses ``name``'s current batch and, for each level below it,
        the micro-batches of its last optimizer step. On several ranks it is
        the average over ranks (what the level would step on, the same on
        every rank), so every rank must call it. A ZeRO-3 level's comes as this rank's partitions
        (the layout of its ``local_shards``), averaged over ranks.
        """
        if name not in self.levels:
            raise ValueError(f"unknown level {name!r}; known levels: {sorted(self.levels)}")
        grads = self.coordinator.hypergradient(name)
        self.levels[name].backend.average_over_ranks(grads)  # partitions come averaged already
        return grads

    def validate(self) -> dict[str, float]:
        """Every level's ``validation_step`` metrics, prefixed ``valid/<level>/``.

        Runs without gradients and with every module in eval mode (dropout
        off, BatchNorm using and keeping its running statistics); each
        submodule's previous mode is restored afterwards.
        """
        out: dict[str, float] = {}
        with _evaluation_mode([lv.module for lv in self.levels.values()]), torch.no_grad():
            for name, lv in self.levels.items():
                result = lv.validation_step()
                for key, value in (result or {}).items():
                    out[f"valid/{name}/{key}"] = float(value)
        return out


@contextlib.contextmanager
def _evaluation_mode(modules: list[torch.nn.Module]):
    """Every submodule in eval mode for a while, each one's own previous mode restored after."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def _norm_of_rank_average(grads: list[torch.Tensor], group=None) -> float:
    """The norm of the hypergradient the upper level steps on: each rank's own, averaged over ``group``
    (the level's data-parallel group)."""
    if world_size() > 1:
        grads = [g.clone() for g in grads]
        mean_over_ranks_(grads, group)
    return float(vectors.norm(grads))
