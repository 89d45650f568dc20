"""Where a level's gradients are reduced and its optimizer steps.

Two implementations of one small interface:

- ``DeepSpeedBackend``: the level's module inside its own DeepSpeed engine.
  Backward passes go through ``engine.backward`` so DeepSpeed's reduction,
  partitioning and loss scaling apply; gradient accumulation is DeepSpeed's.
- ``TorchBackend``: a plain optimizer, for float64 oracles and debugging.

The hypergradient code never calls an optimizer: it hands a finished gradient
to ``backward_from_grads``, which under DeepSpeed is a backward of the
surrogate ``sum(<p, g>)``, so the upper level's gradient is reduced across
ranks exactly once, by the same machinery as any other gradient.

Besides stepping, a backend tells the hypergradient code where the level's
vectors live (``coords``: whole parameters, or at ZeRO-3 the local partitions
``p.ds_tensor``), how to take the level's own gradient in that layout
(``gradient``: averaged over ranks, so every rank holds the same vector or its
own slice of it), and how to reduce across ranks (``space``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from scalemlo.distributed import ensure_distributed, import_deepspeed

log = logging.getLogger(__name__)


class TorchBackend:
    """A plain torch optimizer with manual gradient accumulation and clipping."""

    partitioned = False

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizer, scheduler, config):
        self.params = list(params)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation = config.gradient_accumulation
        self.clipping = config.gradient_clipping
        self._micro = 0
        self.steps = 0
        self.last_grads: list[torch.Tensor] | None = None
        self.space = _space(partitioned=False)

    # ---- what the hypergradient code reads ------------------------------------
    @property
    def coords(self) -> list[torch.Tensor]:
        """The tensors the level's vectors are shaped like, and that perturbations write."""
        return self.params

    def gradient(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        """d loss / d params in the layout of ``coords`` (one process: nothing to average)."""
        return _autograd_gradient(loss, self.params, retain_graph)

    def average(self, vector: list[torch.Tensor]) -> None:
        """Average a vector over ranks in place (one process: nothing to do)."""

    def release_gathered(self) -> None:
        """Make writes to ``coords`` visible to the next forward (nothing to do without ZeRO-3)."""

    # ---- stepping -----------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def backward_from_grads(self, grads: Sequence[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads):
            g = g.detach().to(p.dtype) / self.accumulation
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    def step(self, keep_last_grads: bool = False) -> bool:
        """One micro-step; the optimizer steps at the accumulation boundary. Returns True if it stepped.

        ``keep_last_grads`` keeps references to the gradients of the step (for
        sama) instead of letting them be freed; it copies nothing.
        """
        self._micro += 1
        if self._micro % self.accumulation:
            return False
        if self.clipping > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clipping)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.last_grads = [p.grad for p in self.params] if keep_last_grads else None
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps, "micro": self._micro}


class DeepSpeedBackend:
    """The level's module wrapped in its own DeepSpeed engine."""

    def __init__(self, module: torch.nn.Module, params, optimizer, scheduler, config, name: str):
        deepspeed = import_deepspeed()
        ensure_distributed()
        ds_config = _deepspeed_config_for(config, name, module)
        for p in module.parameters():
            if p.dtype == torch.float64:
                raise ValueError(
                    f"level {name!r}: DeepSpeed 0.19 cannot reduce float64 gradients; "
                    "use LevelConfig(backend='torch') for float64 levels"
                )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        import torch.distributed as dist

        self.world_size = dist.get_world_size()
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.world_size == 1 and self.zero_stage == 0:
            # One rank has nothing to reduce; DeepSpeed's ZeRO-0 reduction would
            # still copy every gradient into flat buckets (+1x gradient memory).
            # (ZeRO 1-2 fill their partitions in that reduction: keep it there.)
            self.engine.enable_backward_allreduce = False
        self.partitioned = self.zero_stage == 3
        self.space = _space(partitioned=self.partitioned and self.world_size > 1)
        self.params = list(params)
        self.steps = 0
        self.last_grads: list[torch.Tensor] | None = None

    # ---- what the hypergradient code reads ------------------------------------
    @property
    def coords(self) -> list[torch.Tensor]:
        """Whole parameters, or at ZeRO-3 this rank's partitions (``p.ds_tensor``, flat)."""
        if self.partitioned:
            return [p.ds_tensor for p in self.params]
        return self.params

    def gradient(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        """d loss / d params in the layout of ``coords``, averaged over ranks.

        ZeRO 0-2: autograd on the whole parameters, then an all-reduce when
        there are several ranks. ZeRO-3: autograd cannot see partitioned
        parameters, so the backward goes through ``engine.backward`` (which
        gathers layer by layer and reduce-scatters), the local gradient
        partitions are copied out and DeepSpeed's gradient buffers are cleared
        again; no optimizer state changes. Every parameter of other levels
        that the graph reaches must have been frozen when ``loss`` was built,
        or its ``.grad`` be stashed by the caller.
        """
        if not self.partitioned:
            grads = _autograd_gradient(loss, self.params, retain_graph)
            self.average(grads)
            return grads
        from deepspeed.utils import safe_get_local_grad

        # Zeroed before (a parameter the loss does not reach must read 0) and after
        # (the next training step must not see this gradient); zero_grad makes
        # DeepSpeed copy into its partitions instead of accumulating.
        self._clear_partition_grads()
        self._engine_backward(loss, retain_graph=retain_graph, scale_wrt_gas=False)
        out = []
        for p in self.params:
            buffer = safe_get_local_grad(p)
            out.append(torch.zeros_like(p.ds_tensor) if buffer is None else buffer.view_as(p.ds_tensor).clone())
        self._clear_partition_grads()
        return out

    def _clear_partition_grads(self) -> None:
        from deepspeed.utils import safe_get_local_grad

        self.engine.zero_grad()
        for p in self.params:
            buffer = safe_get_local_grad(p)
            if buffer is not None:
                buffer.zero_()

    def average(self, vector: list[torch.Tensor]) -> None:
        """Average whole-parameter vectors over ranks in place (ZeRO-3 partitions are already averaged)."""
        if self.world_size == 1 or self.partitioned:
            return
        import torch.distributed as dist

        for t in vector:
            dist.all_reduce(t)
            t.div_(self.world_size)

    def release_gathered(self) -> None:
        """Re-partition every gathered parameter, so that writes to ``coords`` reach the next forward.

        ZeRO-3 keeps parameters gathered after some forwards (persistent small
        ones, and everything after a ``no_grad`` forward that follows a
        backward): a write into ``p.ds_tensor`` would then be invisible and a
        finite difference would come out as exactly zero.
        """
        if self.partitioned:
            self.engine.optimizer.parameter_offload.empty_partition_cache()

    # ---- stepping -----------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self._engine_backward(loss)

    def _engine_backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.zero_stage > 0:
            # engine.forward does these two (ZeRO 1-3 accumulation bookkeeping, and
            # the backward prologue through hooks on its outputs); levels run their
            # modules directly, so that autograd works through them, and do it here.
            self.engine.optimizer.clear_backward_seen_flag()
            self.engine._backward_prologue()
        self.engine.backward(loss, **kwargs)

    def backward_from_grads(self, grads: Sequence[torch.Tensor]) -> None:
        if self.partitioned:
            raise RuntimeError("a ZeRO-3 level cannot step on a hypergradient (checked when the engine is built)")
        surrogate = sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(self.params, grads))
        self.backward(surrogate)

    def step(self, keep_last_grads: bool = False) -> bool:
        """One micro-step (DeepSpeed steps at its accumulation boundary); see TorchBackend.step."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            # DeepSpeed frees .grad in step(); keep the tensors (no copy) for sama.
            self.last_grads = [p.grad for p in self.params] if keep_last_grads else None
        self.engine.step()
        if boundary:
            self.steps += 1
        return boundary

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}


def _autograd_gradient(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool) -> list[torch.Tensor]:
    from scalemlo.hypergrad.vectors import grads_or_zeros

    return grads_or_zeros(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph), params)


def _space(partitioned: bool):
    # Imported late: scalemlo.hypergrad imports the level, which imports this module.
    from scalemlo.hypergrad.vectors import Space

    return Space(partitioned=partitioned)


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


def _deepspeed_config_for(config, name: str, module: torch.nn.Module | None = None) -> dict:
    """The level's DeepSpeed config with our settings filled in.

    DeepSpeed 0.19 clips gradients at norm 1.0 when the config says nothing,
    which would silently change every level's update: the clipping always
    comes from ``LevelConfig.gradient_clipping`` unless the config sets it.
    """
    cfg = config.resolved_deepspeed_config()
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
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = 1
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]
    cfg.setdefault("steps_per_print", 10**9)
    stage = zero_stage_of(cfg, name)
    _fill_zero_auto(cfg.get("zero_optimization", {}), module, name)
    if stage > 0:
        # DeepSpeed asks for this flag for any optimizer outside its short list
        # (torch's SGD among them); ZeRO works with any torch optimizer.
        cfg.setdefault("zero_allow_untested_optimizer", True)
    for precision in ("fp16", "bf16"):
        if cfg.get(precision, {}).get("enabled"):
            raise ValueError(
                f"level {name!r}: {precision} levels are not supported yet; "
                "hypergradients need the precision rules of the mixed-precision work"
            )
    return cfg
