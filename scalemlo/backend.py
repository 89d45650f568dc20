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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def ensure_distributed() -> None:
    """Start a one-process gloo group when no launcher did.

    DeepSpeed needs ``torch.distributed`` and ``LOCAL_RANK``; a plain
    ``python script.py`` has neither. Under a launcher (deepspeed, torchrun)
    the environment already names the rank and this defers to DeepSpeed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        import deepspeed

        deepspeed.init_distributed()
        return
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def import_deepspeed():
    """Import DeepSpeed, choosing the CPU accelerator where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


class TorchBackend:
    """A plain torch optimizer with manual gradient accumulation and clipping."""

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizer, scheduler, config):
        self.params = list(params)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation = config.gradient_accumulation
        self.clipping = config.gradient_clipping
        self._micro = 0
        self.steps = 0
        self.last_grads: list[torch.Tensor] | None = None

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
        ds_config = _deepspeed_config_for(config, name)
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

        if dist.get_world_size() == 1:
            # One rank has nothing to reduce; DeepSpeed's ZeRO-0 reduction would
            # still copy every gradient into flat buckets (+1x gradient memory).
            self.engine.enable_backward_allreduce = False
        self.params = list(params)
        self.steps = 0
        self.last_grads: list[torch.Tensor] | None = None

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def backward_from_grads(self, grads: Sequence[torch.Tensor]) -> None:
        surrogate = sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(self.params, grads))
        self.engine.backward(surrogate)

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


def _deepspeed_config_for(config, name: str) -> dict:
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
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage != 0:
        # Partition-local perturbation and gradient reads come with the ZeRO 1-3 work.
        raise ValueError(f"level {name!r}: ZeRO stage {stage} is not supported yet; use stage 0")
    for precision in ("fp16", "bf16"):
        if cfg.get(precision, {}).get("enabled"):
            raise ValueError(
                f"level {name!r}: {precision} levels are not supported yet; "
                "hypergradients need the precision rules of the mixed-precision work"
            )
    return cfg
