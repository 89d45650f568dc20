"""A level stepped by a plain torch optimizer (float64 oracles, debugging); on several ranks its gradients
are averaged over them, as data parallelism does."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from scalemlo.backend.base import (
    ACCUMULATING,
    NONFINITE,
    OVERFLOW,
    STEPPED,
    _autograd_gradient,
    _Backend,
    _log_overflow,
)
from scalemlo.checkpoint import read_plain
from scalemlo.distributed import (
    finite_on_every_rank,
    rank,
)
from scalemlo.loss_scale import DynamicLossScale
from scalemlo.vectors import AcrossRanks


class TorchBackend(_Backend):
    """A plain torch optimizer with manual gradient accumulation, rank averaging and clipping.

    Args:
        module: the level's module.
        params: the module's trainable parameters.
        optimizer: the torch optimizer over them (an fp16 level's must not have stepped yet).
        scheduler: an LR scheduler, or None.
        config: the level's `scalemlo.config.LevelConfig` (``gradient_accumulation``,
            ``gradient_clipping``, ``fp16_loss_scaling``).
        group_index: the optimizer parameter group of each trainable parameter.
        name: the level's name (for messages).
    """

    partitioned = False

    def __init__(
        self,
        module: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        optimizer,
        scheduler,
        config,
        group_index,
        name: str = "level",
    ):
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
        same), gradients are loss-scaled (`scalemlo.loss_scale`), an overflow skips the step."""
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
        """A backend over a module and optimizer someone else steps (the Trainer without DeepSpeed).

        Args:
            module: the module.
            params: the module's trainable parameters.
            optimizer: the optimizer that steps them.
            group_index: the optimizer parameter group of each trainable parameter.
        """
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
        """Write the module (parameters, buffers), optimizer and scheduler state to ``directory``.

        An fp16 level's float32 masters and loss scale too; written by rank 0 (ranks agree).
        """
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

        Args:
            keep_grads: keep references to the gradients of the step in ``last_step`` (for sama)
                instead of letting them be freed; it copies nothing.

        Returns:
            ``ACCUMULATING`` (not a boundary), ``STEPPED``, or ``NONFINITE`` (a boundary whose gradients
            are not finite on some rank: they are dropped and nothing is stepped, on every rank); for an
            fp16 level ``OVERFLOW`` instead of ``NONFINITE`` (the loss scale is lowered).
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
