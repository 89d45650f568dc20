"""Hugging Face layer: the reweighting Trainer, per-example causal-LM losses, data reweighters, weight exports."""

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
from scalemlo.hf.scorer import ExampleScorer, ngram_features

_LAZY = {  # these import transformers: loaded on first use
    "ReweightingArguments": "scalemlo.hf.arguments",
    "ReweightingTrainer": "scalemlo.hf.trainer",
    "reset_trainer_state": "scalemlo.hf.trainer",
    "WeightTable": "scalemlo.hf.exports",
    "add_weight_column": "scalemlo.hf.exports",
    "write_weights": "scalemlo.hf.exports",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scalemlo.hf' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "REWEIGHTERS",
    "CollapseMonitor",
    "ExampleScorer",
    "ExampleWeights",
    "MetaWeightNet",
    "Reweighter",
    "SourceWeights",
    "build_reweighter",
    "ngram_features",
    "per_example_causal_lm_loss",
    "source_index",
    "weight_stats",
]
