"""Where a level's gradients are reduced and its optimizer steps.

Two implementations of one small interface:

- ``DeepSpeedBackend``: the level's module inside its own DeepSpeed engine.
  Backward passes go through DeepSpeed so its reduction, partitioning and
  loss scaling apply; gradient accumulation is DeepSpeed's.
- ``TorchBackend``: a plain optimizer (float64 oracles, debugging); on
  several ranks it averages gradients over them, as data parallelism does.

The hypergradient code never calls an optimizer: it hands a finished gradient
to ``backward_from_grads``, which under DeepSpeed is a backward of the
surrogate ``sum(<p, g>)``, so the upper level's gradient is reduced across
ranks exactly once, by the same machinery as any other gradient.

Besides stepping, a backend tells the hypergradient code where the level's
vectors live (``local_shards``: the whole parameters, or at ZeRO-3 this rank's
partition of each, ``p.ds_tensor``), how to take the level's own gradient in
that layout (``gradient``: averaged over ranks, so every rank holds the same
vector or its own shard of it), how to reduce over such vectors
(``across_ranks``), and what the last optimizer step was (``last_step``).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from scalemlo.checkpoint import check_files, read_plain
from scalemlo.distributed import (
    ensure_distributed,
    finite_on_every_rank,
    import_deepspeed,
    mean_over_ranks_,
    rank,
    release_shared_memory,
    world_size,
)
from scalemlo.loss_scale import DynamicLossScale
from scalemlo.precision import Float32Evaluation
from scalemlo.vectors import AcrossRanks, grads_or_zeros

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
    """The level's data-parallel process group, for every collective scalemlo issues on its vectors
    (None: all ranks; a DeepSpeed level: the group its engine reduces and partitions gradients over)."""

    def _init_common(self, params, optimizer, group_index: Sequence[int]) -> None:
        self.params = list(params)
        self.group_index = list(group_index)
        self.steps = 0
        self.last_step: LastStep | None = None
        self.world_size = world_size()
        self._optimizer_for_state = optimizer  # keyed by the parameters themselves

    @property
    def precision(self) -> Float32Evaluation:
        """Swaps a low-precision level to float32 for a hypergradient's evaluations (:mod:`scalemlo.precision`)."""
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
        """An overflow in a pass of this level outside its own step (a hypergradient's): lower the scale
        as its own overflow would (nothing unless fp16)."""

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
        """The tensor the torch optimizer steps for trainable parameter ``p``: ``p`` itself, or under
        DeepSpeed's bf16 optimizer at ZeRO-0 its float32 copy (``fp32_groups``, one per ``fp16_groups``
        entry), which holds the optimizer state and, during the step, the gradient stepped on."""
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


def _data_parallel_group(engine, name: str):
    """The process group ``engine`` reduces (and at ZeRO 1-3 partitions) gradients over: DeepSpeed's
    sequence-data-parallel group, which is its data-parallel group without sequence parallelism (a
    clone of the world group when no model parallelism is configured). scalemlo's reductions of a
    level's vectors run over it. It must hold every rank: a level split by tensor, pipeline or
    sequence parallelism (a DeepSpeed ``mpu``) is refused, since its vectors are not whole (or
    ZeRO-sharded) on every rank of the group."""
    group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    if world_size() == 1:
        return group
    import torch.distributed as dist

    size = dist.get_world_size(group)
    if size != world_size():
        raise ValueError(
            f"level {name!r}: its DeepSpeed engine's data-parallel group has {size} of {world_size()} ranks "
            "(model, pipeline or sequence parallelism through an mpu); scalemlo levels support data "
            "parallelism and ZeRO only: build the engine without an mpu"
        )
    return group


class TorchBackend(_Backend):
    """A plain torch optimizer with manual gradient accumulation, rank averaging and clipping."""

    partitioned = False

    def __init__(self, module: torch.nn.Module, params: Sequence[torch.nn.Parameter], optimizer, scheduler, config,
                 group_index, name: str = "level"):  # fmt: skip
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation = config.gradient_accumulation
        self.clipping = config.gradient_clipping
        self._micro = 0
        self._init_common(params, optimizer, group_index)
        self.across_ranks = AcrossRanks(self.world_size, sharded=False)
        self.name = name
        self.scaler: DynamicLossScale | None = None
        self._masters: dict[int, torch.Tensor] = {}
        if any(p.dtype == torch.float16 for p in self.params):
            self._init_fp16(config, name)

    def _init_fp16(self, config, name: str) -> None:
        """fp16 parameters: the optimizer steps float32 masters (DeepSpeed's fp16 ZeRO-0 optimizer does the
        same), gradients are loss-scaled (:mod:`scalemlo.loss_scale`), an overflow skips the step."""
        if any(p.dtype != torch.float16 for p in self.params):
            raise ValueError(f"level {name!r}: its trainable parameters mix fp16 and other dtypes; make them all fp16")
        if self.optimizer.state:
            raise ValueError(
                f"level {name!r}: an fp16 level's optimizer must not have stepped before the level is built"
            )
        self.fp16 = True
        self.scaler = DynamicLossScale(config.fp16_loss_scaling, name)
        own = {id(p) for p in self.params}
        for group in self.optimizer.param_groups:
            masters = []
            for p in group["params"]:
                if id(p) in own:
                    self._masters[id(p)] = torch.nn.Parameter(p.detach().float())
                masters.append(self._masters.get(id(p), p))
            group["params"] = masters
        self._optimizer_for_state = self.optimizer

    @classmethod
    def adopt(cls, module: torch.nn.Module, params, optimizer, group_index: Sequence[int]) -> TorchBackend:
        """A backend over a module and optimizer someone else steps (the Trainer without DeepSpeed)."""
        self = cls.__new__(cls)
        self.module, self.optimizer, self.scheduler = module, optimizer, None
        self.accumulation, self.clipping, self._micro = 1, 0.0, 0
        self._init_common(params, optimizer, group_index)
        self.across_ranks = AcrossRanks(self.world_size, sharded=False)
        self.scaler, self._masters, self.name = None, {}, "the Trainer's model"
        return self

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def lower_loss_scale(self) -> None:
        if self.scaler is not None:
            self.scaler.update(True)

    def stepped_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """``p``, or for an fp16 level its float32 master (which holds the optimizer state)."""
        return self._masters.get(id(p), p)

    def _kept_grads(self) -> list[torch.Tensor | None]:
        return [self.stepped_tensor(p).grad for p in self.params]  # an fp16 level's: unscaled float32

    # ---- what the hypergradient code reads ------------------------------------
    @property
    def local_shards(self) -> list[torch.Tensor]:
        """The tensors the level's vectors are shaped like, and that perturbations write."""
        return self.params

    def gradient(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        """d loss / d params in the layout of ``local_shards``, averaged over ranks."""
        grads = _autograd_gradient(loss, self.params, retain_graph)
        self.average_over_ranks(grads)
        return grads

    def release_gathered(self) -> None:
        """Make writes to ``local_shards`` visible to the next forward (nothing to do without ZeRO-3)."""

    # ---- checkpoints -----------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Module (parameters, buffers), optimizer and scheduler state (an fp16 level's float32 masters and
        loss scale too), written by rank 0 (ranks agree)."""
        if rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            state = {
                "module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            }
            if self.scaler is not None:
                state["masters"] = [self._masters[id(p)].detach() for p in self.params]
                state["loss_scale"] = self.scaler.state_dict()
            with open(directory / "torch_state.pt", "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())

    def load(self, directory: Path) -> None:
        state = read_plain(directory / "torch_state.pt")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            with torch.no_grad():
                for p, master in zip(self.params, state["masters"]):
                    self._masters[id(p)].copy_(master)
            self.scaler.load_state_dict(state["loss_scale"])

    # ---- stepping -----------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = loss.float() * self.scaler.scale
        (loss / self.accumulation).backward()

    def backward_from_grads(self, grads: Sequence[torch.Tensor]) -> None:
        factor = self.loss_scale / self.accumulation  # scaled as a loss's backward would be (fp16)
        for p, g in zip(self.params, grads):
            g = (g.detach() * factor).to(p.dtype)  # an fp16 overflow here is caught at the step
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    def step(self, keep_grads: bool = False) -> str:
        """One micro-step; the optimizer steps at the accumulation boundary.

        Returns ``ACCUMULATING`` (not a boundary), ``STEPPED``, or ``NONFINITE``
        (a boundary whose gradients are not finite on some rank: they are
        dropped and nothing is stepped, on every rank). ``keep_grads`` keeps
        references to the gradients of the step in ``last_step`` (for sama)
        instead of letting them be freed; it copies nothing.
        """
        self._micro += 1
        if self._micro % self.accumulation:
            return ACCUMULATING
        grads = [p.grad for p in self.params if p.grad is not None]
        self.average_over_ranks(grads)
        if not finite_on_every_rank(grads, self.process_group):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                return NONFINITE
            for p in self.params:
                p.grad = None
            scale = self.scaler.scale
            self.scaler.update(True)
            _log_overflow(f"level {self.name!r}'s step", scale, self.scaler.scale)
            return OVERFLOW
        stepped = self.params
        if self.scaler is not None:  # unscaled float32 gradients onto the masters, which the optimizer steps
            stepped = [self._masters[id(p)] for p in self.params]
            for p, master in zip(self.params, stepped):
                master.grad = None if p.grad is None else p.grad.float().div_(self.scaler.scale)
                p.grad = None
        if self.clipping > 0:
            torch.nn.utils.clip_grad_norm_(stepped, self.clipping)
        self._record_step(keep_grads)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            with torch.no_grad():
                for p, master in zip(self.params, stepped):
                    p.copy_(master)
            self.scaler.update(False)
        self.steps += 1
        return STEPPED


class DeepSpeedBackend(_Backend):
    """The level's module wrapped in its own DeepSpeed engine."""

    def __init__(self, module: torch.nn.Module, params, optimizer, scheduler, ds_config: dict, name: str,
                 group_index):  # fmt: skip
        """``ds_config``: the level's resolved DeepSpeed config (:func:`deepspeed_config_for`)."""
        deepspeed = import_deepspeed()
        ensure_distributed()
        user_optimizer = optimizer
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        release_shared_memory()  # deepspeed.initialize may have started DeepSpeed's communication
        self._init_common(params, user_optimizer, group_index)
        self._undo_initial_step()
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.world_size == 1 and self.zero_stage == 0:
            # One rank has nothing to reduce; DeepSpeed's ZeRO-0 reduction would
            # still copy every gradient into flat buckets (+1x gradient memory).
            # (ZeRO 1-2 fill their partitions in that reduction: keep it there.)
            self.engine.enable_backward_allreduce = False
        self.partitioned = self.zero_stage == 3
        self.process_group = _data_parallel_group(self.engine, name)
        self.across_ranks = AcrossRanks(self.world_size, sharded=self.partitioned, group=self.process_group)
        self.fp16 = bool(self.engine.fp16_enabled())
        self.name = name

    def _undo_initial_step(self) -> None:
        """Undo the optimizer step DeepSpeed's bf16/fp16 ZeRO-0 optimizer takes when it is built.

        ``FP16_UnfusedOptimizer.initialize_optimizer_states`` steps the torch optimizer once on zero
        gradients, so that its state exists: Adam's step counter then starts at 1 (its first real step
        is 2.35x torch's at the default betas, bias correction of t = 2) and AdamW has already decayed
        the float32 master weights once. Here the state is dropped and the masters are copied from the
        parameters again, so a bf16 level trains as the same torch optimizer would.
        """
        wrapper = self._low_precision_wrapper()
        if wrapper is None:
            return
        state = self._optimizer_for_state.state
        masters = [high for highs in wrapper.fp32_groups for high in highs]
        if not all(_is_initial_state(state.get(high, {})) for high in masters):
            return  # real steps were taken (a Trainer resumed from a checkpoint): nothing to undo
        with torch.no_grad():
            for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                for low, high in zip(lows, highs):
                    high.copy_(low.float())
                    self._optimizer_for_state.state.pop(high, None)

    @classmethod
    def adopt(cls, engine, params, group_index: Sequence[int]) -> DeepSpeedBackend:
        """A backend over a DeepSpeed engine someone else built and steps (the Trainer's).

        ``params``: the module's trainable parameters; ``group_index``: the
        optimizer parameter group of each (as the optimizer was built, before
        DeepSpeed flattened the groups).
        """
        self = cls.__new__(cls)
        self.engine, self.optimizer, self.scheduler = engine, engine.optimizer, engine.lr_scheduler
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
        self._init_common(params, base, group_index)
        self._undo_initial_step()
        self.zero_stage = int(engine.zero_optimization_stage())
        self.partitioned = self.zero_stage == 3
        self.process_group = _data_parallel_group(engine, "the Trainer's model")
        self.across_ranks = AcrossRanks(self.world_size, sharded=self.partitioned, group=self.process_group)
        self.fp16 = bool(engine.fp16_enabled())
        self.name = "the Trainer's model"
        return self

    @property
    def loss_scale(self) -> float:
        """DeepSpeed's current loss scale (1 unless fp16)."""
        return float(self.engine.optimizer.loss_scale) if self.fp16 else 1.0

    def lower_loss_scale(self) -> None:
        """DeepSpeed's scaler told of an overflow, as its own step's overflow check would tell it
        (every fp16 optimizer of DeepSpeed 0.19, ZeRO 0-3, has ``_update_scale(overflow)``)."""
        if self.fp16:
            self.engine.optimizer._update_scale(True)

    def _kept_grads(self) -> list[torch.Tensor | None]:
        grads = super()._kept_grads()
        if self.fp16:  # scaled until DeepSpeed's step unscales them
            grads = [None if g is None else g.float().div_(self.loss_scale) for g in grads]
        return grads

    # ---- what the hypergradient code reads ------------------------------------
    @property
    def local_shards(self) -> list[torch.Tensor]:
        """Whole parameters, or at ZeRO-3 this rank's partitions (``p.ds_tensor``, flat)."""
        if self.partitioned:
            return [p.ds_tensor for p in self.params]
        return self.params

    def gradient(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        """d loss / d params in the layout of ``local_shards``, averaged over ranks.

        ZeRO 0-2: autograd on the whole parameters, then an all-reduce when
        there are several ranks. ZeRO-3: autograd cannot see partitioned
        parameters, so DeepSpeed's backward machinery gathers layer by layer
        and reduce-scatters; the backward reaches this level's parameters only
        (other levels' parameters in the graph are left alone, their engines'
        gradient hooks included), the local gradient partitions are copied out
        and DeepSpeed's gradient buffers are cleared again; no optimizer state
        changes.
        """
        if not self.partitioned:
            grads = _autograd_gradient(loss, self.params, retain_graph)
            self.average_over_ranks(grads)
            return grads
        from deepspeed.utils import safe_get_local_grad

        # Zeroed before (a parameter the loss does not reach must read 0) and after
        # (the next training step must not see this gradient); zero_grad makes
        # DeepSpeed copy into its partitions instead of accumulating.
        self._clear_partition_grads()
        self._backward_to_own_params(loss, retain_graph)
        out = []
        scale = self.loss_scale  # fp16: DeepSpeed scaled the loss (scale_if_loss); its partitions hold scaled grads
        for p in self.params:
            buffer = safe_get_local_grad(p)
            grad = torch.zeros_like(p.ds_tensor) if buffer is None else buffer.view_as(p.ds_tensor).clone()
            out.append(grad.div_(scale) if scale != 1.0 else grad)
        self._clear_partition_grads()
        return out

    def _backward_to_own_params(self, loss: torch.Tensor, retain_graph: bool) -> None:
        """``engine.backward(loss)`` restricted to this level's parameters.

        ``engine.backward`` runs back into every leaf the loss reaches. When
        that includes another level's parameters (the owner's objective reads
        the owner), their ZeRO-1/2 engine's gradient hooks fire, and that
        engine's own next backward fails with "Gradient computed twice for
        this partition". torch's ``backward(inputs=...)`` accumulates into the
        given leaves only; around it runs what ``engine.backward`` runs around
        ``loss.backward()`` (the ZeRO prologue, loss scaling, the epilogue that
        reduce-scatters the last bucket).
        """
        engine = self.engine
        engine.optimizer.clear_backward_seen_flag()
        engine._backward_prologue()
        # engine.scale marks the backward as scaled (DeepSpeed 0.19's post-backward hook refuses an fp16 ZeRO
        # backward that did not go through it)
        scaled = engine.scale(loss) if hasattr(engine, "scale") else engine.optimizer.scale_if_loss(loss)
        torch.autograd.backward(scaled, inputs=self.params, retain_graph=retain_graph)
        engine._backward_epilogue()
        if getattr(engine.optimizer, "offload_optimizer", False):
            # With offload_optimizer, ZeRO-3 copies the gradient partitions into the float32 buffers its
            # local-gradient accessor reads only when a boundary is finalized (in its step): without this
            # the hypergradient read zeros, a zero hypergradient, silently. The boundary flag it sets is
            # put back.
            saved = engine.optimizer._is_gradient_accumulation_boundary
            engine.optimizer.finalize_gradient_accumulation_boundary()
            engine.optimizer._is_gradient_accumulation_boundary = saved

    def _clear_partition_grads(self) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        self.engine.zero_grad()
        optimizer = self.engine.optimizer
        # The reduced partitions of every parameter live in ZeRO-3's flat buffer, which the next backward
        # may accumulate onto. In bf16 the local-gradient accessor returns float32 *copies* of them, so
        # zeroing what it returns cleared nothing (tested: training moved by taking hypergradients).
        flat = getattr(optimizer, "grad_partitions_flat_buffer", None)
        if flat is not None:
            flat.zero_()
        if flat is None or getattr(optimizer, "offload_optimizer", False):
            # With offload_optimizer the accessor reads float32 buffers of the offloaded optimizer instead:
            # the zeros are written through DeepSpeed.
            for p in self.params:
                buffer = safe_get_local_grad(p)
                if buffer is not None and bool(buffer.any()):
                    safe_set_local_grad(p, torch.zeros_like(buffer))

    def release_gathered(self) -> None:
        """Re-partition every gathered parameter, so that writes to ``local_shards`` reach the next forward.

        ZeRO-3 keeps parameters gathered after some forwards (persistent small
        ones, and everything after a ``no_grad`` forward that follows a
        backward): a write into ``p.ds_tensor`` would then be invisible and a
        finite difference would come out as exactly zero.
        """
        if self.partitioned:
            self.engine.optimizer.parameter_offload.empty_partition_cache()

    # ---- checkpoints -----------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint of the engine (every rank writes its partitions)."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={}, save_latest=False)

    def load(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint, once its files are seen to hold only tensors, plain data and the few
        DeepSpeed classes it saves (DeepSpeed unpickles them with ``weights_only=False``)."""
        check_files(directory)
        loaded, _ = self.engine.load_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {directory}")
        self.release_gathered()

    # ---- stepping -----------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        scale_fp16_zero0_loss(self.engine, loss)
        if self.zero_stage > 0:
            # engine.forward does these two (ZeRO 1-3 accumulation bookkeeping, and
            # the backward prologue through hooks on its outputs); levels run their
            # modules directly, so that autograd works through them, and do it here.
            self.engine.optimizer.clear_backward_seen_flag()
            self.engine._backward_prologue()
        self.engine.backward(loss)

    def backward_from_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """Accumulate a gradient computed elsewhere (a hypergradient) for the next step.

        ZeRO 0-2: a backward of the surrogate ``sum(<p, g>)`` through the engine, so DeepSpeed reduces,
        scales and accumulates it as any gradient. ZeRO-3: ``grads`` are this rank's partitions,
        averaged over ranks already (as :meth:`gradient` gives them); they are summed here and written
        into DeepSpeed's gradient partitions at the step's boundary (:meth:`step`), since a
        hypergradient taken between micro-steps clears those partitions.
        """
        if self.partitioned:
            pending = getattr(self, "_pending", None)
            scaled = [g.detach().float() / self.engine.gradient_accumulation_steps() for g in grads]
            self._pending = scaled if pending is None else [a.add_(b) for a, b in zip(pending, scaled)]
            return
        surrogate = sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(self.params, grads))
        self.backward(surrogate)

    def _write_pending(self) -> None:
        """ZeRO-3 at a boundary: the summed hypergradient into DeepSpeed's gradient partitions (times the
        loss scale, which DeepSpeed's step divides out), and the partitions handed to its optimizer as a
        backward's epilogue would hand them."""
        from deepspeed.utils import safe_set_local_grad

        pending, self._pending = self._pending, None
        scale = self.loss_scale
        for p, g in zip(self.params, pending):
            safe_set_local_grad(p, g.mul_(scale) if scale != 1.0 else g)
        self.engine.optimizer.independent_gradient_partition_epilogue()

    def step(self, keep_grads: bool = False) -> str:
        """One micro-step (DeepSpeed steps at its accumulation boundary); see TorchBackend.step.

        Non-finite gradients: at ZeRO-0 they are checked here (after the
        boundary's all-reduce) and dropped, so the optimizer skips every
        parameter (its lr scheduler still moves on); at ZeRO 1-3 DeepSpeed's
        own overflow check skips the step on every rank.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return ACCUMULATING
        if getattr(self, "_pending", None) is not None:
            self._write_pending()
        finite = True
        if self.zero_stage == 0:
            grads = [p.grad for p in self.params if p.grad is not None]
            finite = finite_on_every_rank(grads, self.process_group)
            if not finite and hasattr(self.engine.optimizer, "fp16_groups"):
                # DeepSpeed's bf16/fp16 ZeRO-0 optimizers (fused or not) step a parameter without a gradient on zeros
                # (Adam's momentum still moved every parameter, and its step count, in a "skipped" step):
                # its own overflow check skips the step instead (and lowers an fp16 scale); it must see
                # one on this rank too.
                grads[0].fill_(float("nan"))
            elif not finite:
                for p in self.params:
                    p.grad = None
        if finite:
            # Before engine.step: DeepSpeed frees .grad there, and its scheduler moves the lr on.
            self._record_step(keep_grads)
        skipped_before, scale = self.engine.skipped_steps, self.loss_scale
        self.engine.step()
        if not finite or self.engine.skipped_steps > skipped_before:
            if self.fp16:
                _log_overflow(f"level {self.name!r}'s step", scale, self.loss_scale)
                return OVERFLOW
            return NONFINITE
        self.steps += 1
        return STEPPED


def scale_fp16_zero0_loss(engine, loss: torch.Tensor) -> None:
    """Make ``engine.backward(loss)`` loss-scale an fp16 ZeRO-0 engine's gradients, as its step expects.

    DeepSpeed 0.19's ``engine.backward`` scales the loss for ZeRO 1-3 optimizers only: at ZeRO-0
    (``FP16_Optimizer`` / ``FP16_UnfusedOptimizer``) the loss goes back unscaled while the optimizer's
    step divides the gradients by the loss scale, so every update is the scale (2^16 at first) times too
    small and small fp16 gradients flush to zero (DeepSpeed pull request 8393, open). A hook on ``loss``
    multiplies the gradient arriving there by the current scale when it arrives unscaled (1/accumulation)
    and leaves it alone when DeepSpeed scaled it (a DeepSpeed with the fix): exact, as both are powers
    of two apart. Nothing for anything else (other engines, a model that is not a DeepSpeed engine, a
    loss that does not require grad).
    """
    if not hasattr(engine, "fp16_enabled") or not engine.fp16_enabled() or engine.zero_optimization():
        return
    if not loss.requires_grad:
        return
    optimizer = engine.optimizer
    if not hasattr(optimizer, "loss_scale") or getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        return
    scale = float(optimizer.loss_scale)
    expected = 1.0 / engine.gradient_accumulation_steps()

    def scaled(grad: torch.Tensor) -> torch.Tensor:
        # unscaled: grad == expected; scaled by DeepSpeed: grad == expected * scale
        return grad * scale if float(grad) < expected * scale**0.5 else grad

    loss.register_hook(scaled)


def _log_overflow(where: str, before: float, after: float) -> None:
    if rank() == 0:
        change = f"lowered from {before:g} to {after:g}" if after < before else f"kept at {after:g} (hysteresis)"
        log.warning("fp16 overflow in %s: the step is skipped on every rank; loss scale %s", where, change)


def _is_initial_state(state: dict) -> bool:
    """An optimizer state left by one step on zero gradients: at most one step, every tensor zero."""
    step = state.get("step", 0)
    return float(step) <= 1 and all(
        not bool(v.any()) for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)
    )


def _autograd_gradient(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool) -> list[torch.Tensor]:
    return grads_or_zeros(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph), params)


def zero_stage_of(cfg: dict, name: str) -> int:
    """The ZeRO stage of a DeepSpeed config dict, checked."""
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"level {name!r}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return int(stage)


ZERO_AUTO_KEYS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
)


def _fill_zero_auto(zero: dict, module: torch.nn.Module | None, name: str) -> None:
    """Fill ZeRO bucket sizes given as "auto" from the model's hidden size, as Hugging Face does.

    reduce_bucket_size = allgather_bucket_size = h^2, stage3_prefetch_bucket_size = 0.9 h^2,
    stage3_param_persistence_threshold = 10 h. Without a hidden size (a model
    with no ``config.hidden_size``) "auto" is an error naming the keys.
    """
    wanted = [k for k in ZERO_AUTO_KEYS if zero.get(k) == "auto"]
    if not wanted:
        return
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(
            f'level {name!r}: zero_optimization {wanted} are "auto", which needs the model\'s '
            "config.hidden_size (a Hugging Face model); give numbers instead"
        )
    values = {
        "reduce_bucket_size": hidden * hidden,
        "allgather_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key in wanted:
        zero[key] = values[key]


def _check_batch_sizes(cfg: dict, name: str) -> None:
    """train_batch_size = micro batch x gradient accumulation x ranks, as DeepSpeed requires (checked now).

    scalemlo feeds each level its batches itself, so these numbers are
    DeepSpeed's bookkeeping only; "auto" (or leaving them out) is fine.
    """
    gas, ranks = cfg["gradient_accumulation_steps"], world_size()
    total, micro = cfg.get("train_batch_size", "auto"), cfg.get("train_micro_batch_size_per_gpu", "auto")
    if total == "auto":
        cfg.pop("train_batch_size", None)
    if micro == "auto":
        if total != "auto" and total % (gas * ranks):
            raise ValueError(
                f"level {name!r}: deepspeed_config train_batch_size={total} is not a multiple of "
                f'gradient_accumulation_steps={gas} x {ranks} rank(s); fix it or set it to "auto"'
            )
        cfg["train_micro_batch_size_per_gpu"] = 1 if total == "auto" else total // (gas * ranks)
    elif total != "auto" and total != micro * gas * ranks:
        raise ValueError(
            f"level {name!r}: deepspeed_config train_batch_size={total} conflicts with "
            f"train_micro_batch_size_per_gpu={micro} x gradient_accumulation_steps={gas} x {ranks} rank(s) = "
            f'{micro * gas * ranks}; make them agree, or set train_batch_size to "auto"'
        )


@functools.lru_cache(maxsize=1)
def known_deepspeed_keys() -> frozenset[str]:
    """Every key DeepSpeed's config code mentions (the string literals of its config and constants modules).

    DeepSpeed ignores top-level keys it does not know, so a typo
    ("zero_optimisation") silently changes nothing; this list lets scalemlo
    refuse it. It is a superset of the real keys, read from the installed
    DeepSpeed, so no valid key of any version is refused.
    """
    import re

    root = Path(import_deepspeed().__file__).parent
    keys: set[str] = set()
    for file in root.rglob("*.py"):
        if "config" in file.name or "constants" in file.name:
            keys |= set(re.findall(r"""["']([a-z][a-z0-9_]*)["']""", file.read_text(errors="ignore")))
    keys |= {"zenflow"}  # parsed in a module whose name says neither
    return frozenset(keys)


def deepspeed_config_for(config, name: str, module: torch.nn.Module | None = None) -> dict:
    """The level's DeepSpeed config with our settings filled in.

    DeepSpeed 0.19 clips gradients at norm 1.0 when the config says nothing,
    which would silently change every level's update: the clipping always
    comes from ``LevelConfig.gradient_clipping`` unless the config sets it.
    """
    cfg = config.resolved_deepspeed_config()
    unknown = [key for key in cfg if key not in known_deepspeed_keys()]
    if unknown:
        hints = {k: difflib.get_close_matches(k, known_deepspeed_keys(), n=1) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
        raise ValueError(
            f"level {name!r}: deepspeed_config has keys DeepSpeed does not know: {unknown} "
            f"(DeepSpeed would ignore them silently){'; ' + hint if hint else ''}"
        )
    if module is not None and any(p.dtype == torch.float64 for p in module.parameters()):
        raise ValueError(
            f"level {name!r}: DeepSpeed 0.19 cannot reduce float64 gradients; "
            "use LevelConfig(backend='torch') for float64 levels"
        )
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas == "auto":
        cfg["gradient_accumulation_steps"] = config.gradient_accumulation
    elif gas != config.gradient_accumulation:
        raise ValueError(
            f"level {name!r}: deepspeed_config has gradient_accumulation_steps={gas} but "
            f"LevelConfig.gradient_accumulation={config.gradient_accumulation}; make them agree"
        )
    clip = cfg.get("gradient_clipping", "auto")
    if clip == "auto":
        cfg["gradient_clipping"] = config.gradient_clipping
    elif config.gradient_clipping not in (0, clip):
        raise ValueError(
            f"level {name!r}: deepspeed_config has gradient_clipping={clip} but "
            f"LevelConfig.gradient_clipping={config.gradient_clipping}; make them agree"
        )
    _check_batch_sizes(cfg, name)
    cfg.setdefault("steps_per_print", 10**9)
    stage = zero_stage_of(cfg, name)
    _fill_zero_auto(cfg.get("zero_optimization", {}), module, name)
    if stage > 0:
        # DeepSpeed asks for this flag for any optimizer outside its short list
        # (torch's SGD among them); ZeRO works with any torch optimizer.
        cfg.setdefault("zero_allow_untested_optimizer", True)
    fp16, bf16 = cfg.get("fp16", {}).get("enabled"), cfg.get("bf16", {}).get("enabled")
    if fp16 is True and bf16 is True:
        raise ValueError(f'level {name!r}: deepspeed_config enables both "fp16" and "bf16"; enable one of them')
    if fp16 is True and cfg["fp16"].get("auto_cast"):
        raise ValueError(
            f'level {name!r}: "fp16": {{"auto_cast": true}} (autocast inside the engine\'s forward) is not '
            "supported: levels run their modules directly; drop auto_cast (the module's parameters become fp16)"
        )
    return cfg
