"""Data reweighters: the upper level's per-example weights wᵢ = m_λ(sᵢ) for the lower objective.

The lower level minimises f(θ, λ) = Σᵢ wᵢ ℓᵢ(θ) / normaliser, where ℓᵢ is example
i's loss and sᵢ the fixed inputs of the weighting (the detached loss value, a
source id, an example id). A `Reweighter` turns (losses [B], batch) into
normalised weights [B], differentiable with respect to its own parameters only.

Why normalise at all: if the weights' overall scale were learnable, the upper
level could lower its meta loss by scaling every weight, which is the same as
scaling the language model's learning rate, instead of learning which data
matter. Each scheme therefore fixes the scale:

- `MetaWeightNet` (Shu et al., 2019): an MLP of the loss (and optional extra
  features) ending in a sigmoid, vᵢ ∈ (0, 1); weights wᵢ = vᵢ / mean_batch(v),
  so the batch mean weight is exactly 1. The mean is differentiated through
  (as in Meta-Weight-Net's code), so only relative weights are learned. The
  mean is clamped at `eps`; if every vᵢ is below it the weights are tiny and
  `CollapseMonitor` reports it.
- `SourceWeights` (DoReMi / ScaleBiO domain weights): one logit per source,
  α = softmax(logits), Σₛ αₛ = 1; an example of source s gets weight
  wᵢ = n_sources · α_s, so uniform logits give every example weight 1. The scale
  is fixed by Σ α = 1 (not by the batch): on a batch holding every source
  equally often the weighted mean loss is exactly DoReMi's Σₛ αₛ L̄ₛ. On other
  batches it weights each source's share of the batch by n_sources · αₛ.
- `ExampleWeights` (learning to reweight, Ren et al., 2018): one logit per
  training example, initial 0; vᵢ = sigmoid(logit[idᵢ]), normalised like
  Meta-Weight-Net to batch mean 1.

Every call keeps the scheme's unnormalised values in `last_raw` (the sigmoid
outputs, or n_sources · α for sources) so a monitor can tell "all weights near
zero" from a healthy batch. `weight_stats` summarises a batch of weights and
`CollapseMonitor` warns once when they collapse.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SELECTION_FLOOR = "selection_floor"
"""Column of a batch chosen from a selection pool: the amount added to each row's raw weight for the choice [B]."""


class Reweighter(nn.Module):
    """Per-example data weights behind one interface.

    Subclass it, set `requires` to the batch columns you read, and write
    `raw_weights(losses, batch) -> Tensor[B]` returning positive unnormalised
    weights; override `normalise(raw)` if batch-mean-1 (the default) is not
    your normalisation, and `describe()` for what a user should export.

    Args:
        eps: floor of the normalising mean (> 0).
    """

    requires: tuple[str, ...] = ()
    """Batch columns `weights` reads (keep them: `remove_unused_columns=False`); instances may override."""
    reads_losses: bool = False
    """Whether `raw_weights` reads the per-example losses (then weighing a batch needs the model's forward)."""
    sampled: bool = False
    """True when the batch was drawn with probabilities proportional to `raw_weights` (see `weights`)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (guards the normalising mean); got {eps!r}.")
        self.eps = eps
        self.last_raw: Tensor | None = None

    def weights(self, losses: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Normalised weights [B] (parameter dtype), differentiable with respect to the parameters only.

        Also sets `last_raw` (detached, unnormalised).

        Args:
            losses: [B] floating, the per-example losses ℓᵢ, detached here whatever
                the caller passes (they are fixed inputs sᵢ).
            batch: holds the columns named by `requires`.

        Returns:
            The normalised weights [B].

        Raises:
            ValueError: `losses` is not a 1-D floating tensor, the batch lacks a column of `requires`, or
                `raw_weights` gave another shape.
        """
        if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.is_floating_point():
            got = f"shape {tuple(losses.shape)}, dtype {losses.dtype}" if isinstance(losses, Tensor) else type(losses)
            raise ValueError(f"losses must be a 1-D floating tensor [B] of per-example losses; got {got}.")
        missing = [column for column in self.requires if column not in batch]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs batch columns {missing}; the batch has {sorted(batch)}. "
                "Keep them in the dataset and collator (e.g. TrainingArguments(remove_unused_columns=False))."
            )
        raw = self.raw_weights(losses.detach(), batch)
        if raw.shape != losses.shape:
            raise ValueError(f"{type(self).__name__}.raw_weights gave {tuple(raw.shape)}, not {tuple(losses.shape)}.")
        self.last_raw = raw.detach()
        if self.sampled:
            # The examples were drawn with probability ∝ raw + floor (the batch's SELECTION_FLOOR column, 0
            # without one), so each trains with weight 1; the gradient with respect to the weighting's
            # parameters is the sampling's: ∂log drawnᵢ − mean_batch ∂log drawn (the score-function form of
            # ∂/∂λ of the expected loss under that sampling).
            floor = batch.get(SELECTION_FLOOR)
            drawn = raw if floor is None else raw + torch.as_tensor(floor).to(raw)
            ratio = drawn / drawn.detach().clamp_min(torch.finfo(raw.dtype).tiny)
            return ratio / ratio.mean()
        return self.normalise(raw)

    def forward(self, losses: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Same as `weights` (so engine wrappers that call the module work)."""
        return self.weights(losses, batch)

    def raw_weights(self, losses: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """[B] positive unnormalised weights from detached losses [B] and the batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement raw_weights(losses, batch)")

    def normalise(self, raw: Tensor) -> Tensor:
        """Batch mean 1: raw / max(mean(raw), eps), differentiated through the mean."""
        return raw / raw.mean().clamp_min(self.eps)

    def describe(self) -> dict[str, float]:
        """What a user exports about the learned weighting (floats keyed by name)."""
        return {}


class MetaWeightNet(Reweighter):
    """Meta-Weight-Net: sigmoid(MLP([loss, features]) - c) normalised to batch mean 1.

    ``centered=False``, ``uniform_start=False`` give the original Meta-Weight-Net. Both defaults matter on
    the noisy-label example (``examples/noisy_label_reweighting/README.md``: with a plain sigmoid, Adam's
    steps on the unidentified overall level overshoot into an inverted or saturated state on some seeds).

    Args:
        hidden_size: width of the single hidden layer (Meta-Weight-Net: 100).
        n_features: extra per-example inputs read from `batch[feature_column]`
            ([B, n_features] floating, detached); 0 for loss only.
        feature_column: the batch column holding the extra features.
        eps: floor of the normalising mean.
        centered: subtract the batch median before the sigmoid (default): c is the batch median of the
            MLP's outputs, so half of every batch sits at or below 1/2 and half at or above: the sigmoids
            can never all saturate (where the hypergradient, ~e^-|z|, vanishes and the run silently
            becomes uniform training), and no example gets more than 4x the batch's average weight. The
            output bias, invisible after centring, is left out.
        uniform_start: zero the output layer at construction (default), so every example starts at
            weight 1 and the hypergradient, not the random initialisation, sets the direction.
    """

    def __init__(
        self,
        hidden_size: int = 100,
        n_features: int = 0,
        feature_column: str = "features",
        eps: float = 1e-8,
        centered: bool = True,
        uniform_start: bool = True,
    ) -> None:
        super().__init__(eps)
        self.reads_losses = True
        for name, value, least in (("hidden_size", hidden_size, 1), ("n_features", n_features, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}; got {value!r}.")
        self.n_features = n_features
        self.feature_column = feature_column
        self.requires = (feature_column,) if n_features else ()
        self.centered = centered
        out = nn.Linear(hidden_size, 1, bias=not centered)
        if uniform_start:
            nn.init.zeros_(out.weight)
            if out.bias is not None:
                nn.init.zeros_(out.bias)
        self.net = nn.Sequential(nn.Linear(1 + n_features, hidden_size), nn.ReLU(), out)

    def raw_weights(self, losses: Tensor, batch: Mapping[str, Any]) -> Tensor:
        parameter = next(self.parameters())
        inputs = losses.to(device=parameter.device, dtype=parameter.dtype)[:, None]
        if self.n_features:
            features = torch.as_tensor(batch[self.feature_column]).detach()
            if features.shape != (losses.shape[0], self.n_features) or not features.is_floating_point():
                raise ValueError(
                    f"batch[{self.feature_column!r}] must be floating [B, n_features] = "
                    f"[{losses.shape[0]}, {self.n_features}]; got {features.dtype} {tuple(features.shape)}."
                )
            inputs = torch.cat([inputs, features.to(device=parameter.device, dtype=parameter.dtype)], dim=1)
        z = self.net(inputs).squeeze(-1)
        if self.centered:
            z = z - z.median()
        return torch.sigmoid(z)

    def describe(self, losses: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)) -> dict[str, float]:
        """Raw weight (sigmoid output) at a few loss values, extra features 0: the learned curve."""
        parameter = next(self.parameters())
        with torch.no_grad():
            inputs = torch.zeros(len(losses), 1 + self.n_features, device=parameter.device, dtype=parameter.dtype)
            inputs[:, 0] = torch.tensor(list(losses), dtype=parameter.dtype)
            raw = torch.sigmoid(self.net(inputs)).squeeze(-1).tolist()
        return {f"meta_weight_net/raw_at_loss/{loss:g}": value for loss, value in zip(losses, raw)}


def source_index(sources: Iterable[str]) -> dict[str, int]:
    """Stable map source name -> index: the distinct names, sorted. Duplicates are fine (pass a column)."""
    names = sorted(set(sources))
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"sources must be a non-empty collection of names (str); got {names[:5]}.")
    return {name: index for index, name in enumerate(names)}


class SourceWeights(Reweighter):
    """Domain weights α = softmax(logits) over sources; example weight n_sources · α[sourceᵢ].

    Args:
        sources: source names (any order, duplicates allowed; indexed sorted,
            see `source_index`) or their number n (names "0" ... "n-1").
        source_column: the batch column of source indices (int64 [B]); map
            names with `index_of`.
    """

    requires = ("source",)

    def __init__(self, sources: Iterable[str] | int, source_column: str = "source") -> None:
        super().__init__()
        if isinstance(sources, int) and not isinstance(sources, bool):
            if sources < 1:
                raise ValueError(f"the number of sources must be >= 1; got {sources}.")
            self.index = {str(i): i for i in range(sources)}
        elif isinstance(sources, str):
            raise ValueError(f"sources must be a list of names or their number, not one string ({sources!r}).")
        else:
            self.index = source_index(sources)
        self.names = list(self.index)
        self.source_column = source_column
        self.requires = (source_column,)
        self.logits = nn.Parameter(torch.zeros(len(self.names)))

    def alpha(self) -> Tensor:
        """[n_sources] softmax of the logits, summing to 1."""
        return torch.softmax(self.logits, dim=0)

    def index_of(self, names: Iterable[str]) -> Tensor:
        """int64 [N] source indices of names (e.g. a dataset's string column)."""
        names = list(names)
        unknown = sorted({name for name in names if name not in self.index})
        if unknown:
            raise ValueError(
                f"unknown source names {unknown[:5]}; this SourceWeights knows {self.names[:10]}"
                f"{' ...' if len(self.names) > 10 else ''}. Build it from every source of the training data."
            )
        return torch.tensor([self.index[name] for name in names], dtype=torch.int64)

    def raw_weights(self, losses: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return len(self.names) * self.alpha()[_indices(batch, self.source_column, len(self.names), self.logits)]

    def normalise(self, raw: Tensor) -> Tensor:
        """Already normalised by the softmax (Σ α = 1)."""
        return raw

    def source_weights(self) -> dict[str, float]:
        """Source name -> α (sums to 1)."""
        return dict(zip(self.names, self.alpha().detach().tolist()))

    def describe(self) -> dict[str, float]:
        return {f"alpha/{name}": value for name, value in self.source_weights().items()}


class ExampleWeights(Reweighter):
    """One logit per training example (initial 0); sigmoid(logit[idᵢ]) normalised to batch mean 1.

    Args:
        n_examples: number of training examples; ids run over 0 ... n_examples-1.
        id_column: the batch column of example ids (int64 [B]).
        eps: floor of the normalising mean.
    """

    requires = ("id",)

    def __init__(self, n_examples: int, id_column: str = "id", eps: float = 1e-8) -> None:
        super().__init__(eps)
        if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
            raise ValueError(f"n_examples must be an int >= 1 (the training set's size); got {n_examples!r}.")
        self.id_column = id_column
        self.requires = (id_column,)
        self.logits = nn.Parameter(torch.zeros(n_examples))

    def raw_weights(self, losses: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return torch.sigmoid(self.logits[_indices(batch, self.id_column, self.logits.numel(), self.logits)])

    def example_weights(self) -> Tensor:
        """float32 [n_examples]: sigmoid(logits) normalised to mean 1 over the whole training set."""
        with torch.no_grad():
            raw = torch.sigmoid(self.logits.float())
            return raw / raw.mean().clamp_min(self.eps)

    def describe(self) -> dict[str, float]:
        raw = torch.sigmoid(self.logits.detach().float())
        return {
            "example_weights/raw_min": raw.min().item(),
            "example_weights/raw_mean": raw.mean().item(),
            "example_weights/raw_max": raw.max().item(),
            "example_weights/fraction_below_half": (raw < 0.5).float().mean().item(),
        }


def _indices(batch: Mapping[str, Any], column: str, size: int, like: Tensor) -> Tensor:
    indices = torch.as_tensor(batch[column])
    if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"batch[{column!r}] must be integer indices [B]; got {indices.dtype} {tuple(indices.shape)}.")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(
            f"batch[{column!r}] holds indices outside [0, {size}): min {int(indices.min())}, max {int(indices.max())}. "
            "Map names with SourceWeights.index_of, or give ExampleWeights the training set's size."
        )
    return indices.to(device=like.device, dtype=torch.int64)


REWEIGHTERS: dict[str, type[Reweighter]] = {
    "meta_weight_net": MetaWeightNet,
    "source": SourceWeights,
    "example": ExampleWeights,
}


def build_reweighter(name: str, **kwargs: Any) -> Reweighter:
    """The reweighter registered as `name`, built from keyword arguments (checked first).

    Args:
        name: a key of ``REWEIGHTERS`` (``"meta_weight_net"``, ``"source"``, ``"example"``, ...).
        kwargs: the reweighter's constructor arguments.

    Raises:
        ValueError: an unknown name, an argument the reweighter does not take, or a required one missing.
    """
    if name not in REWEIGHTERS:
        raise ValueError(f"unknown reweighter {name!r}; choose one of {sorted(REWEIGHTERS)}.")
    cls = REWEIGHTERS[name]
    parameters = dict(inspect.signature(cls.__init__).parameters)
    parameters.pop("self", None)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            raise ValueError(f"reweighter {name!r} does not take {unknown}; it takes {sorted(parameters)}.")
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [k for k, p in parameters.items() if p.kind in keyword and p.default is p.empty and k not in kwargs]
    if missing:
        raise ValueError(f"reweighter {name!r} needs {missing}; it takes {sorted(parameters)}.")
    return cls(**kwargs)


def weight_stats(
    weights: Tensor, sources: Tensor | None = None, names: Sequence[str] | None = None, *, raw: Tensor | None = None
) -> dict[str, float]:
    """Summary of a batch of non-negative weights [B] (any float dtype; computed in float64).

    With pᵢ = wᵢ / Σw: "weight/entropy" H = -Σ pᵢ log pᵢ, "weight/entropy_normalized"
    H / log B (1 for B = 1), "weight/ess" (Σw)² / Σw² and "weight/ess_ratio" ESS / B,
    "weight/max_share" max pᵢ, "weight/min|mean|max", "weight/count" B. All-zero
    weights carry no mass: entropy, ESS and shares are 0.

    Args:
        weights: [B] the non-negative weights.
        sources: int64 [B] source indices; adds "weight/source/<name>" (mean weight of that source's
            examples in the batch), "weight/max_source_share" and "weight/sources_present".
        names: index -> source name (default: the indices).
        raw: [B] unnormalised weights (see `Reweighter.last_raw`); adds "weight/raw_min" and "weight/raw_max".

    Returns:
        The statistics, floats keyed by name.

    Raises:
        ValueError: no weights, a negative weight, or `sources` of another length.
    """
    w = weights.detach().double().reshape(-1)
    count = w.numel()
    if count == 0:
        raise ValueError("weight_stats needs at least one weight; got an empty tensor.")
    if bool((w < 0).any()):
        raise ValueError(f"weights must be non-negative; got min {w.min().item()}.")
    total = w.sum()
    has_mass = bool(total > 0)
    p = w / total if has_mass else torch.zeros_like(w)
    entropy = float(-torch.special.xlogy(p, p).sum()) if has_mass else 0.0
    stats = {
        "weight/count": float(count),
        "weight/entropy": entropy,
        "weight/entropy_normalized": (entropy / math.log(count) if count > 1 else 1.0) if has_mass else 0.0,
        "weight/ess": float(total**2 / (w**2).sum()) if has_mass else 0.0,
        "weight/min": float(w.min()),
        "weight/mean": float(w.mean()),
        "weight/max": float(w.max()),
        "weight/max_share": float(p.max()),
    }
    stats["weight/ess_ratio"] = stats["weight/ess"] / count
    if sources is not None:
        sources = torch.as_tensor(sources).reshape(-1).to(w.device)
        if sources.numel() != count:
            raise ValueError(f"sources must be [B] = [{count}] like the weights; got {tuple(sources.shape)}.")
        present = torch.unique(sources).tolist()
        shares = []
        for source in present:
            selected = w[sources == source]
            name = names[source] if names is not None else str(source)
            stats[f"weight/source/{name}"] = float(selected.mean())
            shares.append(float(selected.sum() / total) if has_mass else 0.0)
        stats["weight/max_source_share"] = max(shares)
        stats["weight/sources_present"] = float(len(present))
    if raw is not None:
        stats["weight/raw_min"] = float(raw.detach().min())
        stats["weight/raw_max"] = float(raw.detach().max())
    return stats


class CollapseMonitor:
    """Warns once (through `logging`) when the weights collapse; `update` says whether they are collapsed now.

    Collapsed means any of: near one-hot over examples; one source holding most of the mass while at least
    two are present; all raw values ("weight/raw_max", e.g. sigmoid outputs before normalisation) near 0.

    Args:
        threshold_ess: collapsed when "weight/ess_ratio" is below it (in (0, 1)).
        threshold_max_share: collapsed when one example holds more than it of the mass, checked only when
            B >= 2 / threshold_max_share so that uniform weights are far below it; 1 switches the example
            share check off.
        raw_epsilon: collapsed when all raw values are below it.
        threshold_source_share: collapsed when one source holds more than it of the mass while at least two
            are present (off by default, 1: dropping a noisy source is often the goal).
    """

    def __init__(
        self,
        threshold_ess: float = 0.1,
        threshold_max_share: float = 0.9,
        raw_epsilon: float = 1e-3,
        threshold_source_share: float = 1.0,
    ) -> None:
        if not 0 < threshold_ess < 1 or not 0 < threshold_max_share <= 1 or not raw_epsilon > 0:
            raise ValueError(
                "CollapseMonitor needs 0 < threshold_ess < 1, 0 < threshold_max_share <= 1 and raw_epsilon > 0; "
                f"got {threshold_ess}, {threshold_max_share}, {raw_epsilon}."
            )
        if not 0 < threshold_source_share <= 1:
            raise ValueError(f"CollapseMonitor needs 0 < threshold_source_share <= 1, got {threshold_source_share}")
        self.threshold_ess = threshold_ess
        self.threshold_max_share = threshold_max_share
        self.threshold_source_share = threshold_source_share
        self.raw_epsilon = raw_epsilon
        self.warned = False
        self.reasons: list[str] = []

    def update(self, stats: Mapping[str, float]) -> bool:
        """Check one batch's `weight_stats`; log a warning the first time they show a collapse.

        Args:
            stats: the batch's `weight_stats`.

        Returns:
            Whether the weights are collapsed now (the reasons are in `reasons`).
        """
        count = stats.get("weight/count", 0.0)
        reasons = []
        if count >= 2 and stats.get("weight/ess_ratio", 1.0) < self.threshold_ess:
            reasons.append(f"effective sample size is {stats['weight/ess_ratio']:.3g} of the batch")
        if count >= 2 / self.threshold_max_share and stats.get("weight/max_share", 0.0) > self.threshold_max_share:
            reasons.append(f"one example holds {stats['weight/max_share']:.3g} of the weight")
        source_share = stats.get("weight/max_source_share", 0.0)
        if stats.get("weight/sources_present", 0.0) >= 2 and source_share > self.threshold_source_share:
            reasons.append(f"one source holds {source_share:.3g} of the weight")
        if stats.get("weight/raw_max", 1.0) < self.raw_epsilon:
            reasons.append(f"every raw weight is below {self.raw_epsilon:g} (max {stats['weight/raw_max']:.3g})")
        self.reasons = reasons
        if reasons and not self.warned:
            self.warned = True
            log.warning(
                "data weights collapsed: %s. Lower the reweighter's (meta) learning rate, warm the lower level up "
                "longer before the upper level steps (warmup_steps), or use another normalisation "
                "(e.g. softmax source weights instead of per-example sigmoids).",
                "; ".join(reasons),
            )
        return bool(reasons)
