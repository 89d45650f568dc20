"""Hugging Face layer: per-example causal-LM losses and data reweighters."""

from scalemlo.hf.losses import per_example_causal_lm_loss
from scalemlo.hf.reweighting import (
    REWEIGHTERS,
    CollapseMonitor,
    ExampleWeights,
    MetaWeightNet,
    Reweighter,
    SourceWeights,
    build_reweighter,
    source_index,
    weight_stats,
)

__all__ = [
    "REWEIGHTERS",
    "CollapseMonitor",
    "ExampleWeights",
    "MetaWeightNet",
    "Reweighter",
    "SourceWeights",
    "build_reweighter",
    "per_example_causal_lm_loss",
    "source_index",
    "weight_stats",
]
