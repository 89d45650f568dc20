"""Evaluation of a reweighted causal LM: the unweighted token-mean loss, whatever the weighting.

The weights are how the model is trained, not what it is judged by: ``evaluate()``, ``--eval_strategy``,
``load_best_model_at_end`` and ``predict()`` report the plain causal-LM loss of the evaluation set,

    eval_loss = sum_i l_i n_i / sum_i n_i,

l_i the mean cross-entropy of example i over its n_i counted targets
(`scalemlo.hf.losses.per_example_causal_lm_loss`: labels -100 and padding do not count), summed over
every token of the set (not a mean of batch means, which would weigh a short last batch like a full one),
and ``eval_perplexity = exp(eval_loss)`` beside it. No reweighting column (``id``, ``source``) is read,
and text columns are dropped before collation, so any tokenized evaluation set works.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import Trainer

from scalemlo.hf.losses import per_example_causal_lm_loss

TRAINING_DESCRIPTION = "Training"  # the description Trainer._get_dataloader passes for the training set


def holds_text(feature: Any) -> bool:
    """True for a ``datasets`` feature that holds strings (a ``Value("string")``, or a list or dict of them)."""
    from datasets import Value

    if isinstance(feature, Value):
        return feature.dtype in ("string", "large_string")
    if isinstance(feature, dict):
        return any(holds_text(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(holds_text(f) for f in feature)
    inner = getattr(feature, "feature", None)  # Sequence, List, LargeList
    return inner is not None and holds_text(inner)


def token_mean_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unweighted causal-LM loss of a tokenized batch.

    Args:
        model: the causal LM (or the engine wrapping it).
        inputs: ``input_ids`` [B, T], ``labels`` [B, T] (-100: not predicted), optional ``attention_mask`` [B, T].

    Returns:
        ``(loss_sums, token_counts, logits)``: each example's summed cross-entropy over its counted targets
        [B] float64, their number [B] int64, and the logits [B, T, V].
    """
    mask = inputs.get("attention_mask")
    logits = model(input_ids=inputs["input_ids"], attention_mask=mask).logits
    losses, counts = per_example_causal_lm_loss(logits, inputs["labels"], mask)
    return losses.double() * counts, counts, logits


class TokenMeanEvaluation(Trainer):
    """``Trainer`` evaluation and prediction on the unweighted token-mean loss (see the module docstring).

    A Trainer subclass to put before ``Trainer`` in a subclass's bases; its training is untouched.
    """

    _eval_totals: torch.Tensor | None = None  # [loss sum, token count] of the evaluation under way (float64)

    def _remove_unused_columns(self, dataset, description: str | None = None):
        """Evaluation and test sets lose their text columns (a collator cannot make tensors of them); the
        training set keeps every column (the weighting reads ``id`` and ``source``)."""
        dataset = super()._remove_unused_columns(dataset, description=description)
        if description == TRAINING_DESCRIPTION:
            return dataset
        text = [name for name, feature in dataset.features.items() if holds_text(feature)]
        return dataset.remove_columns(text) if text else dataset

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """One evaluation batch: its token-mean loss (0-d), and its logits and labels unless ``prediction_loss_only``.

        Its loss sums and token counts, gathered over ranks (padding rows of the last batch dropped), add to
        the running evaluation's total.

        Raises:
            ValueError: the batch has no ``labels``.
        """
        inputs = self._prepare_inputs(inputs)
        if "labels" not in inputs:
            raise ValueError(
                f"evaluation needs a 'labels' column (token ids, -100 where not predicted); the batch has "
                f"{sorted(inputs)}"
            )
        with torch.no_grad(), self.compute_loss_context_manager():
            sums, counts, logits = token_mean_loss(model, inputs)
        if self._eval_totals is not None:
            all_sums, all_counts = self.accelerator.gather_for_metrics((sums, counts))
            self._eval_totals += torch.stack([all_sums.sum(), all_counts.sum().double()]).cpu()
        loss = (sums.sum() / counts.sum().clamp_min(1)).float()
        if prediction_loss_only:
            return loss, None, None
        return loss, logits.detach(), inputs["labels"]

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ):
        """``Trainer.evaluation_loop`` on the token-mean loss over the whole set.

        ``{prefix}_loss`` is the token mean over the whole set and ``{prefix}_perplexity`` its exponential
        (``prefix``: ``metric_key_prefix``).

        Raises:
            ValueError: the set has no counted target (every label -100 or masked).
        """
        self._eval_totals = torch.zeros(2, dtype=torch.float64)
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            loss_sum, tokens = self._eval_totals.tolist()
        finally:
            self._eval_totals = None
        if tokens == 0:
            raise ValueError(
                f"{description}: the dataset has no counted target token (every label is -100 or masked by "
                "attention_mask), so it has no loss; give it labels"
            )
        loss = loss_sum / tokens
        output.metrics[f"{metric_key_prefix}_loss"] = loss
        output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(loss) if loss < 700 else math.inf
        return output
