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

from scalemlo.backend.base import ACCUMULATING, CHECKPOINT_TAG, NONFINITE, OVERFLOW, STEPPED, LastStep
from scalemlo.backend.deepspeed import DeepSpeedBackend, scale_fp16_zero0_loss
from scalemlo.backend.deepspeed_config import deepspeed_config_for, known_deepspeed_keys, zero_stage_of
from scalemlo.backend.torch import TorchBackend

__all__ = [
    "ACCUMULATING",
    "CHECKPOINT_TAG",
    "NONFINITE",
    "OVERFLOW",
    "STEPPED",
    "DeepSpeedBackend",
    "LastStep",
    "TorchBackend",
    "deepspeed_config_for",
    "known_deepspeed_keys",
    "scale_fp16_zero0_loss",
    "zero_stage_of",
]
