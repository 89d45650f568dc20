"""Per-example causal-LM losses that never materialise a float32 copy of the logits.

A data-reweighting lower level needs one loss per example,
f(θ, λ) = Σᵢ wᵢ ℓᵢ(θ) / normaliser, where ℓᵢ is example i's mean token
cross-entropy. Hugging Face's own loss (`model(..., labels=...)`) returns the
batch mean only, and the obvious per-example version (shift, `.contiguous()`,
upcast, `log_softmax`, gather) holds several float32 copies of the full
[B, T, V] logits. With a 50k-150k vocabulary those copies, not the model,
are what runs out of memory at small batch sizes.

`per_example_causal_lm_loss` works over pieces of at most `chunk_tokens`
counted rows: it gathers those rows of the logits (native dtype), upcasts that
piece to float32, takes its log-sum-exp and target logit, and keeps one float
per row. Its backward recomputes the softmax piece by piece and writes the
gradient into one tensor shaped like the logits (in their dtype; the model's
output layer needs exactly that tensor anyway). The backward is written with
differentiable operations, so Hessian-vector products through the loss
(`create_graph=True`) are exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_TOKENS", "IGNORE_INDEX", "per_example_causal_lm_loss"]

IGNORE_INDEX = -100
"""Hugging Face's label for positions that are not predicted (padding, prompt)."""

DEFAULT_CHUNK_TOKENS = 1024
"""Rows per piece: 1024 x 50257 x 4 bytes = 206 MB of float32 per temporary."""


def per_example_causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Mean token cross-entropy of every example of a causal-LM batch.

    The standard shift applies: `logits[:, t]` predicts `labels[:, t + 1]`.
    The target at position t + 1 counts when `labels[:, t + 1] != ignore_index`
    and, if `attention_mask` is given, both positions t and t + 1 are attended
    (mask 1). Requiring the predicting position to be real as well makes a
    left-padded and a right-padded copy of an example give the same loss
    (Hugging Face's own loss ignores the mask, so on a left-padded batch whose
    first real token carries a label it also counts that token's prediction
    from a padding position).

    Args:
        logits: [B, T, V], any floating dtype and any strides (as an
            `AutoModelForCausalLM` returns them). Never copied or upcast as a
            whole.
        labels: [B, T], integer token ids, `ignore_index` (-100) on positions
            not to predict (padding, prompt).
        attention_mask: optional [B, T], 0/1 (any dtype); positions with 0
            never count, whatever their label.
        chunk_tokens: the most counted rows processed at once. Temporaries are
            a few [chunk_tokens, V] tensors (float32 and the logits' dtype);
            the result does not depend on it beyond float rounding.
        ignore_index: the label of positions that are not predicted.

    Returns:
        `(losses, token_counts)`: `losses` [B] float32, example i's mean
        cross-entropy over its counted targets (differentiable with respect to
        `logits`); `token_counts` [B] int64, how many targets counted. An
        example with no counted target gets loss 0 and count 0 (and no
        gradient): give it zero weight.

    Raises:
        ValueError: on shapes that do not line up, non-floating logits,
            non-integer labels, a counted label outside [0, V), or
            `chunk_tokens < 1`.
    """
    batch_size, seq_len, vocab_size = _check_inputs(logits, labels, attention_mask, chunk_tokens)
    device = logits.device
    labels = labels.to(device)
    counted = counted_targets(labels, attention_mask, ignore_index)
    example_index, position = counted.nonzero(as_tuple=True)  # position t predicts labels[:, t + 1]
    targets = labels[example_index, position + 1].to(torch.int64)
    if targets.numel() and bool(((targets < 0) | (targets >= vocab_size)).any()):
        bad = targets[(targets < 0) | (targets >= vocab_size)][:5].tolist()
        raise ValueError(
            f"labels must be token ids in [0, {vocab_size}) or {ignore_index} (not predicted); found {bad}. "
            "Set the labels of padding and prompt positions to -100 and check the tokenizer matches the model."
        )
    token_losses = _ChunkedTokenCrossEntropy.apply(logits, example_index, position, targets, chunk_tokens)
    # Scatter into [B, T-1] and sum rows: deterministic on every device (no atomic adds).
    dense = torch.zeros(batch_size, max(seq_len - 1, 0), device=device, dtype=torch.float32)
    loss_sums = dense.index_put((example_index, position), token_losses).sum(dim=1)
    token_counts = counted.sum(dim=1)
    losses = loss_sums / token_counts.clamp(min=1).to(torch.float32)
    return losses, token_counts


def counted_targets(labels: Tensor, attention_mask: Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """[B, T-1] bool: which targets `per_example_causal_lm_loss` counts (its ``token_counts`` are the row sums).

    Target t counts when ``labels[:, t + 1]`` is not ignored and positions t and t + 1 are attended.

    Args:
        labels: [B, T] integer token ids, ``ignore_index`` on positions not to predict.
        attention_mask: optional [B, T], 0/1 (any dtype); positions with 0 never count.
        ignore_index: the label of positions that are not predicted.
    """
    counted = labels[:, 1:] != ignore_index
    if attention_mask is not None:
        attended = attention_mask.to(labels.device) != 0
        counted = counted & attended[:, 1:] & attended[:, :-1]
    return counted


class _ChunkedTokenCrossEntropy(torch.autograd.Function):
    """Token cross-entropies of selected rows of [B, T, V] logits, piece by piece.

    forward(logits [B, T, V], example_index [N], position [N], targets [N], chunk_tokens) -> [N] float32:
    row n is `logits[example_index[n], position[n]]`, its loss
    logsumexp(row) - row[targets[n]], computed in float32.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        example_index: Tensor,
        position: Tensor,
        targets: Tensor,
        chunk_tokens: int,
    ) -> Tensor:
        ctx.save_for_backward(logits, example_index, position, targets)
        ctx.chunk_tokens = chunk_tokens
        token_losses = torch.empty(targets.numel(), device=logits.device, dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_tokens):
            piece = slice(start, start + chunk_tokens)
            rows = logits[example_index[piece], position[piece]].float()  # [c, V] float32
            target_logits = rows.gather(1, targets[piece, None]).squeeze(1)
            token_losses[piece] = torch.logsumexp(rows, dim=-1) - target_logits
            del rows
        return token_losses

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_token_losses: Tensor) -> tuple[Tensor | None, ...]:
        logits, example_index, position, targets = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        # Under create_graph=True grad mode is on here: every step below is an
        # ordinary differentiable op (in-place only on tensors autograd has not
        # saved), so second derivatives through the loss are exact.
        differentiable = torch.is_grad_enabled()
        grad_logits = torch.zeros_like(logits)
        grad_token_losses = grad_token_losses.to(torch.float32)
        for start in range(0, targets.numel(), ctx.chunk_tokens):
            piece = slice(start, start + ctx.chunk_tokens)
            rows_index = (example_index[piece], position[piece])
            scale = grad_token_losses[piece, None]  # [c, 1]
            probs = torch.softmax(logits[rows_index].float(), dim=-1)  # [c, V] float32
            if differentiable:
                grad_rows = (probs * scale).scatter_add(1, targets[piece, None], -scale)
            else:
                grad_rows = probs.mul_(scale).scatter_add_(1, targets[piece, None], -scale)
            del probs
            grad_logits.index_put_(rows_index, grad_rows.to(logits.dtype))  # rows are distinct
            del grad_rows
        return grad_logits, None, None, None, None


def _check_inputs(
    logits: Tensor, labels: Tensor, attention_mask: Tensor | None, chunk_tokens: int
) -> tuple[int, int, int]:
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating tensor [B, T, V]; got dtype {logits.dtype} and shape {tuple(logits.shape)}. "
            "Pass the model output's .logits."
        )
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be [B, T] = {tuple(logits.shape[:2])} like the logits; got {tuple(labels.shape)}. "
            "Pass the batch's labels (input ids with -100 on positions not to predict)."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids (int64); got dtype {labels.dtype}.")
    if attention_mask is not None and attention_mask.shape != labels.shape:
        raise ValueError(
            f"attention_mask must be [B, T] = {tuple(labels.shape)}; got {tuple(attention_mask.shape)}. "
            "Pass the batch's attention_mask or None."
        )
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int (rows per piece); got {chunk_tokens!r}.")
    return logits.shape[0], logits.shape[1], logits.shape[2]
