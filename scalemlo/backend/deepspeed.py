"""A level's module inside its own DeepSpeed engine: backward passes go through DeepSpeed so its reduction,
partitioning and loss scaling apply; gradient accumulation is DeepSpeed's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from scalemlo import upstream
from scalemlo.backend.base import (
    ACCUMULATING,
    CHECKPOINT_TAG,
    NONFINITE,
    OVERFLOW,
    STEPPED,
    _autograd_gradient,
    _Backend,
    _log_overflow,
)
from scalemlo.checkpoint import check_files
from scalemlo.distributed import (
    ensure_distributed,
    finite_on_every_rank,
    import_deepspeed,
    release_shared_memory,
    world_size,
)
from scalemlo.vectors import AcrossRanks


class DeepSpeedBackend(_Backend):
    """The level's module wrapped in its own DeepSpeed engine.

    Args:
        module: the level's module.
        params: the module's trainable parameters.
        optimizer: the torch optimizer over them (or what ``deepspeed.initialize`` takes as one).
        scheduler: an LR scheduler, or None.
        ds_config: the level's resolved DeepSpeed config (`deepspeed_config_for`).
        name: the level's name (for messages).
        group_index: the optimizer parameter group of each trainable parameter.
    """

    def __init__(self, module: torch.nn.Module, params, optimizer, scheduler, ds_config: dict, name: str, group_index):
        deepspeed = import_deepspeed()
        upstream.require("deepspeed")
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

        Args:
            engine: the DeepSpeed engine.
            params: the module's trainable parameters.
            group_index: the optimizer parameter group of each (as the optimizer was built, before
                DeepSpeed flattened the groups).
        """
        upstream.require("deepspeed")
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
        """Tell DeepSpeed's scaler of an overflow, as its own step's overflow check would tell it.

        Every fp16 optimizer of DeepSpeed 0.19, ZeRO 0-3, has ``_update_scale(overflow)``.
        """
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
        """Load DeepSpeed's own checkpoint from ``directory``, once its files are seen to be safe.

        Safe: they hold only tensors, plain data and the few DeepSpeed classes it saves (DeepSpeed unpickles
        them with ``weights_only=False``).

        Raises:
            scalemlo.checkpoint.CheckpointError: a file holds other objects.
            ValueError: DeepSpeed could not load the checkpoint.
        """
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
        averaged over ranks already (as `gradient` gives them); they are summed here and written
        into DeepSpeed's gradient partitions at the step's boundary (`step`), since a
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

        Args:
            keep_grads: keep references to the gradients of the step in ``last_step`` (for sama).

        Returns:
            ``ACCUMULATING``, ``STEPPED``, ``NONFINITE``, or for an fp16 level ``OVERFLOW``.
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
    small and small fp16 gradients flush to zero (DeepSpeed pull request 8393). A hook on ``loss``
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


def _is_initial_state(state: dict) -> bool:
    """An optimizer state left by one step on zero gradients: at most one step, every tensor zero."""
    step = state.get("step", 0)
    return float(step) <= 1 and all(
        not bool(v.any()) for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)
    )
