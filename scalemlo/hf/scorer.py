"""A learned scorer of examples: weights from features of the example itself, for data never seen.

``ExampleScorer`` (reweighting scheme ``"scorer"``) gives example i the weight

    wᵢ = sigmoid(zᵢ − median_batch(z)) / mean_batch(sigmoid(z − median(z))),   zᵢ = s_φ(xᵢ)

where s_φ is a small network over features computed from the example's tokens
(and optionally its held loss). Unlike a per-example table, the scorer

- weights an example on its first visit, and one it never trained on: what it
  learns about one corrupted document carries to every document that looks
  alike;
- can score any tokenized dataset after training (`ExampleScorer.score`,
  ``ReweightingTrainer.score``), to filter a corpus it never saw.

Features (``features``, any of):

- ``"ngrams"``: hashed bags of token unigrams and bigrams (``buckets`` each),
  the square roots of their frequencies over the example's attended tokens.
  A function of the token ids only: constant under every perturbation of the
  language model, so exact in every hypergradient method, at every ZeRO stage
  and on any rank count, and computable without the model.
- ``"loss"``: the example's held loss, standardised within the batch (its
  level drifts as the model trains; its rank within a batch does not).
- ``"near_copies"``: log(1 + the number of other documents of the set that
  are near-copies of this one), read from a batch column (``near_copies`` by
  default) that `near_copy_counts` fills from the raw texts once per
  dataset. Token n-grams cannot tell a document repeated thirty times with
  small edits from any other; this count can (the de-duplication every
  pre-training pipeline runs, handed to the scorer as one more feature whose
  sign the hypergradient learns). Like ``"ngrams"`` a constant of the data:
  exact under every method, ZeRO stage and rank count.

The centre (``centre``) fixes the level the sigmoid is taken from, which the
normalisation leaves unidentified:

- ``"median"``: the batch median of z. Half of every batch sits at or below
  1/2 and half at or above, so the sigmoids cannot all saturate (where the
  hypergradient vanishes) and no example gets more than 4x the batch's
  average weight. As the scores grow apart the weighting becomes "the better
  half of each batch": a clean example that scores below the median loses its
  weight whatever the share of bad data is.
- ``"meta"``: the ``reference_quantile`` quantile of the scores of the meta
  set (``set_reference``; `ReweightingTrainer` passes its meta set).
  The meta set is clean by assumption, so an example that scores like clean
  data (above all but the lowest ``reference_quantile`` of it) heads towards
  weight 1 of the sigmoid and one that scores far below any of it towards 0,
  whatever share of the data that is: clean examples end at about equal
  weights instead of spread over the sigmoid. The centre is a function of the
  scorer's parameters (the reference's features are constants), so the
  hypergradient flows through it. On the LLM reweighting example (seed 1) the
  clean documents' final weights spanned 0.70-1.45 (10th to 90th percentile,
  mean 1 over the set) against 0.20-2.01 centred at the median
  (``examples/llm_reweighting/README.md``). Unlike the median, this centre
  can leave every example saturated: a few meta examples scored far below the
  rest move the centre down, every training example ends near weight 1 and
  the hypergradient fades (quantile 0, the lowest meta score, did so on two
  seeds of five there; 0.1 on none).

The output layer starts at zero, so every example starts at weight 1 and the
hypergradient sets the direction (as `scalemlo.hf.reweighting.MetaWeightNet`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from scalemlo.hf.reweighting import REWEIGHTERS, ExampleWeights, Reweighter

FEATURES = ("ngrams", "loss", "near_copies")
CENTRES = ("median", "meta")
_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: spreads consecutive token ids over the buckets
_BIGRAM_STRIDE = 1_000_003  # a prime above any vocabulary size: (a, b) -> a * stride + b is one-to-one


def ngram_features(input_ids: Tensor, attention_mask: Tensor | None, buckets: int) -> Tensor:
    """Hashed unigram and bigram bags of a tokenized batch: float32 [B, 2 * buckets].

    Args:
        input_ids: int64 [B, T] token ids.
        attention_mask: [B, T] 1 on real tokens, 0 on padding (None: all real).
        buckets: hash buckets per n-gram order.

    Returns:
        sqrt of each bucket's share of the example's unigrams (first ``buckets`` columns) and
        bigrams (the rest); an example with no bigram has zeros there.
    """
    ids = input_ids.long()
    mask = torch.ones_like(ids, dtype=torch.float32) if attention_mask is None else attention_mask.float()
    rows = ids.shape[0]
    unigrams = (ids * _MULTIPLIER) % buckets
    pairs = mask[:, :-1] * mask[:, 1:]
    bigrams = ((ids[:, :-1] * _BIGRAM_STRIDE + ids[:, 1:]) * _MULTIPLIER) % buckets + buckets
    counts = torch.zeros(rows, 2 * buckets, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, unigrams, mask)
    counts.scatter_add_(1, bigrams, pairs)
    counts[:, :buckets] /= mask.sum(1, keepdim=True).clamp_min(1)
    counts[:, buckets:] /= pairs.sum(1, keepdim=True).clamp_min(1)
    return counts.sqrt()


def near_copy_counts(texts: Sequence[str], n: int = 3, threshold: float = 0.5) -> list[int]:
    """For each text, how many *other* texts are near-copies of it: Jaccard similarity of their sets of
    word ``n``-grams at least ``threshold`` (exact, through an inverted index of the n-grams).

    Args:
        texts: the documents (whitespace-split into words; a text shorter than ``n`` words is its one n-gram).
        n: words per shingle. 3 lets a 48-word document with three word edits still score about 0.6.
        threshold: the least Jaccard similarity that counts as a near-copy, in (0, 1].

    Returns:
        int counts, one per text (0: nothing in the set is like it).
    """
    if not 0.0 < threshold <= 1.0 or n < 1:
        raise ValueError(f"near_copy_counts needs n >= 1 and 0 < threshold <= 1; got n={n}, threshold={threshold}.")
    shingles = []
    for text in texts:
        words = str(text).split()
        shingles.append({tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))})
    index: dict[tuple, list[int]] = {}
    for i, grams in enumerate(shingles):
        for gram in grams:
            index.setdefault(gram, []).append(i)
    counts = []
    for i, grams in enumerate(shingles):
        shared: dict[int, int] = {}
        for gram in grams:
            for j in index[gram]:
                if j != i:
                    shared[j] = shared.get(j, 0) + 1
        counts.append(sum(1 for j, k in shared.items() if k / (len(grams) + len(shingles[j]) - k) >= threshold))
    return counts


class ExampleScorer(Reweighter):
    """A network over each example's features, centred and normalised to batch mean 1 (see the module docstring).

    Args:
        features: which features the scorer reads: any of ``"ngrams"``, ``"loss"``, ``"near_copies"``.
        buckets: hash buckets per n-gram order (``"ngrams"``).
        hidden_size: width of the hidden layer; 0 for a linear scorer.
        ids_column: the batch column of token ids (``"ngrams"``).
        mask_column: the batch column of the attention mask (absent: every token counts).
        near_copies_column: the batch column of `near_copy_counts` (``"near_copies"``).
        centre: ``"median"`` (of each batch) or ``"meta"`` (a quantile of the meta set's scores; see the
            module docstring).
        reference_quantile: with ``centre="meta"``, which quantile of the meta set's scores is the centre.
        eps: floor of the normalising mean.
    """

    def __init__(
        self,
        features: Sequence[str] = ("ngrams",),
        buckets: int = 1024,
        hidden_size: int = 0,
        ids_column: str = "input_ids",
        mask_column: str = "attention_mask",
        near_copies_column: str = "near_copies",
        centre: str = "median",
        reference_quantile: float = 0.1,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(eps)
        features = (features,) if isinstance(features, str) else tuple(features)
        unknown = sorted(set(features) - set(FEATURES))
        if not features or unknown or len(set(features)) != len(features):
            raise ValueError(f"features must be distinct names from {list(FEATURES)}; got {list(features)}.")
        if centre not in CENTRES:
            raise ValueError(f"centre must be one of {list(CENTRES)}; got {centre!r}.")
        if centre == "meta" and "loss" in features:
            raise ValueError(
                "centre='meta' scores the meta set once, without the model, so it cannot read the loss feature; "
                "leave 'loss' out of features or use centre='median'."
            )
        if not 0.0 <= reference_quantile <= 1.0:
            raise ValueError(f"reference_quantile must be in [0, 1]; got {reference_quantile!r}.")
        self.centre = centre
        self.reference_quantile = float(reference_quantile)
        self.needs_reference = centre == "meta"
        self.reference_features: Tensor | None = None
        for name, value, least in (("buckets", buckets, 1), ("hidden_size", hidden_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}; got {value!r}.")
        self.features = features
        self.buckets = buckets
        self.ids_column = ids_column
        self.mask_column = mask_column
        self.near_copies_column = near_copies_column
        self.requires = ((ids_column,) if "ngrams" in features else ()) + (
            (near_copies_column,) if "near_copies" in features else ()
        )
        self.reads_losses = "loss" in features
        width = (2 * buckets if "ngrams" in features else 0) + ("loss" in features) + ("near_copies" in features)
        out = nn.Linear(hidden_size or width, 1, bias=False)  # the bias is invisible after centring
        nn.init.zeros_(out.weight)  # every example starts at weight 1
        self.net = out if not hidden_size else nn.Sequential(nn.Linear(width, hidden_size), nn.ReLU(), out)

    def feature_vectors(self, losses: Tensor | None, batch: Mapping[str, Any]) -> Tensor:
        """[B, width] inputs of the network (parameter dtype and device), constants of the step."""
        parameter = next(self.parameters())
        parts = []
        if "ngrams" in self.features:
            ids = torch.as_tensor(batch[self.ids_column]).to(parameter.device)
            mask = batch.get(self.mask_column)
            mask = None if mask is None else torch.as_tensor(mask).to(parameter.device)
            parts.append(ngram_features(ids, mask, self.buckets))
        if "loss" in self.features:
            if losses is None:
                raise ValueError("this scorer reads the loss ('loss' in features): pass the per-example losses.")
            value = losses.detach().float().to(parameter.device)
            spread = value.std() if value.numel() > 1 else value.new_tensor(0.0)
            parts.append(((value - value.mean()) / spread.clamp_min(1e-6))[:, None])
        if "near_copies" in self.features:
            copies = torch.as_tensor(batch[self.near_copies_column]).to(parameter.device).float()
            parts.append(torch.log1p(copies.clamp_min(0))[:, None])
        return torch.cat(parts, dim=1).to(parameter.dtype)

    def scores(self, losses: Tensor | None, batch: Mapping[str, Any]) -> Tensor:
        """[B] uncentred scores zᵢ = s_φ(xᵢ); higher is more trusted."""
        return self.net(self.feature_vectors(losses, batch)).squeeze(-1)

    def set_reference(self, batch: Mapping[str, Any]) -> None:
        """The examples whose scores set the centre under ``centre="meta"``: a collated batch of the meta
        set with the columns the features read. Its features are kept (constants; not in the state dict)."""
        missing = [column for column in self.requires if column not in batch]
        if missing:
            raise ValueError(
                f"ExampleScorer(centre='meta') scores the meta set and needs its columns {missing}; the meta batch "
                f"has {sorted(batch)}. Give the meta set the same feature columns as the training set."
            )
        with torch.no_grad():
            self.reference_features = self.feature_vectors(None, batch).detach()

    def centre_of(self, z: Tensor) -> Tensor:
        """The centre subtracted from the scores ``z`` (differentiable in the parameters)."""
        if self.centre == "median":
            return z.median()
        if self.reference_features is None:
            raise ValueError(
                "ExampleScorer(centre='meta') has no reference: call set_reference(meta_batch) first "
                "(ReweightingTrainer does it from its meta_dataset)."
            )
        parameter = next(self.parameters())
        reference = self.net(self.reference_features.to(device=parameter.device, dtype=parameter.dtype)).squeeze(-1)
        exact = reference if reference.dtype in (torch.float32, torch.float64) else reference.float()  # not bf16
        return torch.quantile(exact, self.reference_quantile).to(z.dtype)

    def raw_weights(self, losses: Tensor, batch: Mapping[str, Any]) -> Tensor:
        z = self.scores(losses, batch)
        return torch.sigmoid(z - self.centre_of(z))

    def weights_of_scores(self, scores: Tensor) -> Tensor:
        """float32 weights [N] of a whole set's scores: centred as in training (the set's median, or the meta
        set's quantile), mean 1 over the set."""
        scores = scores.float()
        with torch.no_grad():
            centre = scores.median() if self.centre == "median" else self.centre_of(scores).float().cpu()
        raw = torch.sigmoid(scores - centre)
        return raw / raw.mean().clamp_min(self.eps)

    def describe(self) -> dict[str, float]:
        weight = (self.net if isinstance(self.net, nn.Linear) else self.net[-1]).weight.detach()
        return {"scorer/output_weight_norm": float(weight.norm())}


REWEIGHTERS["scorer"] = ExampleScorer


@torch.no_grad()
def dataset_weights(
    reweighter: Reweighter, model: nn.Module | None, dataset: Sequence[Mapping[str, Any]], collate, batch_size: int = 32
) -> Tensor:
    """The weight ``reweighter`` gives every row of a tokenized ``dataset``: float32 [N], mean 1 over the set.

    One scale for every scheme: a scorer's scores are centred at the set's median (not each batch's);
    other schemes' unnormalised weights (``Reweighter.last_raw``) are divided by their mean over the set.
    ``model`` computes the per-example losses a scheme reads (None: a scheme that reads none).

    Args:
        reweighter: the learned weighting.
        model: the causal LM (its per-example losses are the schemes' loss input), or None.
        dataset: rows with ``input_ids`` (and the columns the scheme reads), as the collator takes them.
        collate: the data collator that pads rows into a batch.
        batch_size: rows per forward.
    """
    from scalemlo.hf.losses import per_example_causal_lm_loss

    if len(dataset):
        missing = [column for column in reweighter.requires if column not in dataset[0]]
        if missing:
            name = type(reweighter).__name__
            if isinstance(reweighter, ExampleWeights):
                fix = (
                    "a per-example table weighs only the training rows it learned, by their id: score the training "
                    "set (score() with no dataset, or export_weights()), or learn a scheme that weighs unseen rows "
                    "from their content (reweighting 'scorer' or 'meta_weight_net')"
                )
            else:
                fix = f"add the column(s) {missing} to the dataset, as in the training set"
            raise ValueError(
                f"{name} reads the column(s) {missing}, which the dataset lacks ({sorted(dataset[0])}): {fix}."
            )
    needs_loss = not isinstance(reweighter, ExampleScorer) or "loss" in reweighter.features
    if needs_loss and model is None:
        raise ValueError(f"{type(reweighter).__name__} reads the per-example losses: pass the model.")
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    parts = []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            losses = None
            if needs_loss:
                device = next(model.parameters()).device
                inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
                losses = per_example_causal_lm_loss(logits, inputs["labels"], inputs.get("attention_mask"))[0]
            if isinstance(reweighter, ExampleScorer):
                parts.append(reweighter.scores(losses, batch).float().cpu())
            else:
                reweighter.weights(losses if losses is not None else torch.zeros(len(batch["input_ids"])), batch)
                parts.append(reweighter.last_raw.float().cpu())
    finally:
        if model is not None and was_training:
            model.train()
    values = torch.cat(parts)
    if isinstance(reweighter, ExampleScorer):
        return reweighter.weights_of_scores(values)
    return values / values.mean().clamp_min(reweighter.eps)
