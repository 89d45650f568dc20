"""The interface every backend implements, and what a micro-step reports."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scalemlo.distributed import (
    mean_over_ranks_,
    rank,
    world_size,
)
from scalemlo.precision import Float32Evaluation
from scalemlo.vectors import grads_or_zeros

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"  # DeepSpeed's sub-directory inside a level's checkpoint directory

# What a micro-step did (Backend.step). OVERFLOW: an fp16 level's boundary skipped for an overflow (routine
# under dynamic loss scaling: its scale was lowered), not an error whatever EngineConfig.nonfinite says.
ACCUMULATING, STEPPED, NONFINITE, OVERFLOW = "accumulating", "stepped", "nonfinite", "overflow"


@dataclass
class LastStep:
    """What the level's last optimizer step used (read by the hypergradient methods).

    Attributes:
        lrs: per trainable parameter, the learning rate of that step (a
            scheduler has moved the optimizer's lr on by the time anyone asks).
        fresh: per trainable parameter, True when the optimizer held no state
            for it before the step (torch's first momentum step skips dampening).
        grads: the gradients the step used, kept by reference (no copy) only
            when the level was asked to (``keep_grads``); else None.
    """

    lrs: list[float]
    fresh: list[bool]
    grads: list[torch.Tensor] | None


class _Backend:
    """What both backends share: the learning rates per parameter and the record of the last step."""

    fp16 = False
    """Whether the level is fp16 with dynamic loss scaling (its gradients are scaled until its step)."""

    process_group = None
    """The level's data-parallel process group, for every collective scalemlo issues on its vectors.

    None: all ranks; a DeepSpeed level: the group its engine reduces and partitions gradients over.
    """

    def _init_common(self, params, optimizer, group_index: Sequence[int]) -> None:
        self.params = list(params)
        self.group_index = list(group_index)
        self.steps = 0
        self.last_step: LastStep | None = None
        self.world_size = world_size()
        self._optimizer_for_state = optimizer  # keyed by the parameters themselves

    @property
    def precision(self) -> Float32Evaluation:
        """Swaps a low-precision level to float32 for a hypergradient's evaluations (`scalemlo.precision`)."""
        if getattr(self, "_precision", None) is None:
            module = self.engine.module if hasattr(self, "engine") else self.module
            self._precision = Float32Evaluation(module, self.partitioned, self.release_gathered, self._master)
        return self._precision

    def _master(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The optimizer's float32 master of ``p`` where this rank holds it whole (bf16 ZeRO-0) or holds
        its ZeRO-3 partition; else None."""
        if self.partitioned:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        q = self.stepped_tensor(p)
        return q if q is not p else None

    @property
    def loss_scale(self) -> float:
        """The factor the level's backward passes multiply its loss by now (1 unless fp16)."""
        return 1.0

    def lower_loss_scale(self) -> None:
        """Lower the loss scale for an overflow in a pass of this level outside its own step (a hypergradient's).

        The scale is lowered as the level's own overflow would lower it (nothing unless fp16).
        """

    def current_lrs(self) -> list[float]:
        """Per trainable parameter, the learning rate its parameter group has now."""
        groups = self.optimizer.param_groups
        return [float(groups[i]["lr"]) for i in self.group_index]

    def step_lrs(self) -> list[float]:
        """Per trainable parameter, the learning rate of the last step (the current one before any step)."""
        return self.last_step.lrs if self.last_step is not None else self.current_lrs()

    def record_step(self, keep_grads: bool = False) -> None:
        """Record the step about to be taken (its lrs; its gradients with ``keep_grads``).

        The backends call it themselves; a driver that steps an adopted engine
        calls it once per optimizer step, before the step.
        """
        self._record_step(keep_grads)

    def stepped_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the torch optimizer steps for trainable parameter ``p``.

        That is ``p`` itself, or under DeepSpeed's bf16 optimizer at ZeRO-0 its float32 copy (``fp32_groups``,
        one per ``fp16_groups`` entry), which holds the optimizer state and, during the step, the gradient
        stepped on.
        """
        wrapper = self._low_precision_wrapper()
        if wrapper is None:
            return p
        if getattr(self, "_master_of", None) is None:
            pairs = zip(wrapper.fp16_groups, wrapper.fp32_groups)
            self._master_of = {id(low): high for lows, highs in pairs for low, high in zip(lows, highs)}
        return self._master_of.get(id(p), p)

    def _low_precision_wrapper(self):
        """DeepSpeed's bf16/fp16 ZeRO-0 optimizer (``fp16_groups`` stepped through ``fp32_groups``), or None."""
        wrapper = getattr(self, "optimizer", None)
        return wrapper if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups") else None

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that steps, under any DeepSpeed wrapper of ``optimizer`` (its state and groups)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def optimizer_state(self, p: torch.Tensor) -> dict:
        """The optimizer's state for one trainable parameter ({} before its first step)."""
        return self._optimizer_for_state.state.get(self.stepped_tensor(p), {})

    def _record_step(self, keep_grads: bool) -> None:
        self.last_step = LastStep(
            lrs=self.current_lrs(),
            fresh=[not self.optimizer_state(p) for p in self.params],
            grads=self._kept_grads() if keep_grads else None,
        )

    def _kept_grads(self) -> list[torch.Tensor | None]:
        grads = [p.grad for p in self.params]
        if self._low_precision_wrapper() is not None:
            # DeepSpeed's bf16/fp16 ZeRO-0 optimizer zeroes them in place in its step: copy
            grads = [None if g is None else g.clone() for g in grads]
        return grads

    def progress_state(self) -> dict:
        """Step counters and the last step's record (not its gradients), for a checkpoint."""
        last = self.last_step
        return {
            "steps": self.steps,
            "micro": getattr(self, "_micro", 0),
            "last_step": None if last is None else {"lrs": last.lrs, "fresh": last.fresh},
        }

    def load_progress_state(self, state: dict) -> None:
        """Restore what `progress_state` saved (the last step's gradients are not saved)."""
        self.steps = state["steps"]
        if hasattr(self, "_micro"):
            self._micro = state["micro"]
        last = state["last_step"]
        # The gradients of the last step are not saved: the loop takes a new lower step before
        # any hypergradient reads them.
        self.last_step = None if last is None else LastStep(lrs=last["lrs"], fresh=last["fresh"], grads=None)

    def average_over_ranks(self, vector: Sequence[torch.Tensor]) -> None:
        """Average a vector that each rank computed from its own batches, in place (layout of ``local_shards``).

        Afterwards it is the data-parallel vector of the whole objective, the
        same on every rank. ZeRO-3 shards come out of DeepSpeed's
        reduce-scatter averaged already: nothing to do for them.
        """
        if not self.partitioned:
            mean_over_ranks_(vector, self.process_group)


def _log_overflow(where: str, before: float, after: float) -> None:
    if rank() == 0:
        change = f"lowered from {before:g} to {after:g}" if after < before else f"kept at {after:g} (hysteresis)"
        log.warning("fp16 overflow in %s: the step is skipped on every rank; loss scale %s", where, change)


def _autograd_gradient(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool) -> list[torch.Tensor]:
    return grads_or_zeros(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph), params)
