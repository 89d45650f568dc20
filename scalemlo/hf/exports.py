"""Learned weights out of a run: one scale for every scheme, files, a column, a weighted dataset on disk.

The exported weight of a training example is the final weighting model's weight for it
(``ReweightingTrainer.score``, `scalemlo.hf.scorer.dataset_weights`), computed for every row of the
training set, whatever the run saw or a resume skipped, on one scale: **mean 1 over the training set**. A
source's weight is the mean of its examples' weights (so the example-count-weighted mean of the source
weights is 1 too); the ``source`` scheme's softmax α (summing to 1) is exported beside them under its own
name.

Files (`write_weights`):

- ``weights.json``: ``{"scale": "mean 1 over the training set", "examples": {name: weight},
  "sources": {name: weight}, "source_examples": {name: count}}``, plus ``"source_softmax": {name: α}`` for
  the ``source`` scheme;
- ``example_weights.csv`` (id, source, weight) and ``source_weights.csv`` (source, weight, examples).

The weight each example last *trained* with (normalised within its batch, as the step used it; only the
examples the run has seen) is a different quantity: `WeightTable` keeps it during training and
writes ``last_trained_weights.csv`` only when asked (``export_weights(last_trained=True)``).
`weighted_dataset` turns the weights into a ``datasets`` dataset (a column, filtered or resampled).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

SCALE = "mean 1 over the training set"
WEIGHTED_DATASET_MODES = ("no", "column", "filter", "resample")


def source_weights(
    weights: torch.Tensor, sources: Sequence[int], names: Sequence[str] | None
) -> tuple[dict[str, float], dict[str, int]]:
    """The mean weight of each source's examples and their number, by source name (sorted by index).

    Args:
        weights: [N] the examples' weights.
        sources: [N] int source index of each example.
        names: index -> name (None: the index as a string).
    """
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for w, s in zip(weights.double().tolist(), sources):
        sums[int(s)] = sums.get(int(s), 0.0) + w
        counts[int(s)] = counts.get(int(s), 0) + 1
    name = (lambda i: names[i]) if names is not None else str  # noqa: E731
    order = sorted(sums)
    return {name(i): sums[i] / counts[i] for i in order}, {name(i): counts[i] for i in order}


def write_weights(
    directory: str | Path,
    weights: torch.Tensor,
    example_names: Sequence[str],
    sources: Sequence[int] | None = None,
    source_names: Sequence[str] | None = None,
    source_softmax: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Write ``weights.json``, ``example_weights.csv`` and ``source_weights.csv`` in ``directory``.

    Args:
        directory: where to write them (created if missing).
        weights: float [N] the final weight of every training example, mean 1 over the set.
        example_names: [N] each example's name (id).
        sources: [N] int source index of each example, or None (no source files' rows).
        source_names: index -> source name.
        source_softmax: the ``source`` scheme's α by name (written as ``source_softmax``).

    Returns:
        What ``weights.json`` holds.

    Raises:
        ValueError: ``example_names`` or ``sources`` not one per weight.
    """
    if len(example_names) != len(weights) or (sources is not None and len(sources) != len(weights)):
        got = None if sources is None else len(sources)
        raise ValueError(f"{len(weights)} weights, {len(example_names)} names, {got} sources: one each per example")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    values = weights.double().tolist()
    by_source, counts = source_weights(weights, sources, source_names) if sources is not None else ({}, {})
    data: dict[str, Any] = {
        "scale": SCALE,
        "examples": dict(zip(map(str, example_names), values)),
        "sources": by_source,
        "source_examples": counts,
    }
    if source_softmax:
        data["source_softmax"] = dict(source_softmax)
    (directory / "weights.json").write_text(json.dumps(data, indent=1))
    with open(directory / "example_weights.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "source", "weight"])
        for row, (name, w) in enumerate(zip(example_names, values)):
            source = "" if sources is None else (source_names[sources[row]] if source_names else sources[row])
            writer.writerow([name, source, f"{w:.8g}"])
    with open(directory / "source_weights.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "weight", "examples"])
        for name, w in by_source.items():
            writer.writerow([name, f"{w:.8g}", counts[name]])
    return data


def weighted_dataset(
    dataset, weights, mode: str, threshold: float = 0.5, seed: int = 0, column: str = "scalemlo_weight"
):
    """The training set with its learned weights; every mode keeps the weight column.

    Args:
        dataset: a ``datasets.Dataset``, rows in the order of ``weights``.
        weights: float [N] (a tensor or a sequence).
        mode: ``"column"`` (every row, the weight as a column), ``"filter"`` (the rows of weight >=
            ``threshold``, the weights mean 1 over the whole set) or ``"resample"`` (as many rows as the set,
            drawn with replacement with probabilities proportional to the weights, seeded by ``seed``).
        threshold: the least weight a row keeps with ``"filter"``.
        seed: seeds the draw of ``"resample"``.
        column: the weight column's name.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in WEIGHTED_DATASET_MODES[1:]:
        raise ValueError(
            f"weighted dataset mode {mode!r} is not known; allowed: {', '.join(WEIGHTED_DATASET_MODES[1:])}"
        )
    values = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    out = add_weight_column(dataset, values, column)
    if mode == "filter":
        return out.select([i for i, w in enumerate(values.tolist()) if w >= threshold])
    if mode == "resample":
        generator = torch.Generator().manual_seed(seed)
        rows = torch.multinomial(values.clamp_min(0), len(values), replacement=True, generator=generator)
        return out.select(rows.tolist())
    return out


class WeightTable:
    """The last weight each training example trained with (normalised within its batch), with its source.

    Filled during training, for the examples seen (not the exported weights: see the module docstring).

    Args:
        example_names: the training examples' names, by row (None: the row numbers).
        source_names: the names of the source indices (None: the indices).
    """

    def __init__(self, example_names: Sequence[str] | None = None, source_names: Sequence[str] | None = None):
        self.example_names = list(example_names) if example_names is not None else None
        self.source_names = list(source_names) if source_names is not None else None
        self.weights: dict[int, float] = {}
        self.sources: dict[int, int] = {}

    def update(self, ids: torch.Tensor | None, weights: torch.Tensor, sources: torch.Tensor | None) -> None:
        """Record one micro-batch.

        Args:
            ids: [B] int64 row indices (None: nothing is recorded).
            weights: [B] the weights the examples trained with.
            sources: [B] int64 source indices, or None.
        """
        if ids is None:
            return
        for i, w in zip(ids.tolist(), weights.tolist()):
            self.weights[i] = w
        if sources is not None:
            for i, s in zip(ids.tolist(), sources.tolist()):
                self.sources[i] = s

    def merged(self, others: Sequence[WeightTable]) -> WeightTable:
        """One table from every rank's (each rank saw its own examples)."""
        out = WeightTable(self.example_names, self.source_names)
        for table in (self, *others):
            out.weights.update(table.weights)
            out.sources.update(table.sources)
        return out

    def name(self, index: int) -> str:
        """The name of the example of row ``index`` (the row number without names)."""
        return self.example_names[index] if self.example_names is not None else str(index)

    def source_name(self, index: int) -> str:
        """The name of source ``index`` (the index without names)."""
        return self.source_names[index] if self.source_names is not None else str(index)

    def write(self, directory: str | Path) -> None:
        """Write ``last_trained_weights.csv`` (id, source, last_trained_weight) in ``directory``.

        The weight each example last trained with, normalised within its batch; only the examples this run
        (since its last resume) has seen.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "last_trained_weights.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "source", "last_trained_weight"])
            for i, w in sorted(self.weights.items()):
                source = self.source_name(self.sources[i]) if i in self.sources else ""
                writer.writerow([self.name(i), source, f"{w:.8g}"])


def add_weight_column(dataset, weights, column: str = "scalemlo_weight"):
    """``dataset`` (a ``datasets.Dataset``) with one weight per row in a new column.

    Args:
        dataset: the rows, in the order the weights are given.
        weights: a float sequence or tensor [len(dataset)] (e.g. ``ReweightingTrainer.score(dataset)``), or a
            `WeightTable` of the training run (rows in training order; rows it never saw get NaN).
        column: the new column's name.

    Filter with e.g. ``dataset.filter(lambda row: row["scalemlo_weight"] >= 0.5)``.
    """
    if isinstance(weights, WeightTable):
        values = [weights.weights.get(i, float("nan")) for i in range(len(dataset))]
    else:
        values = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(values) != len(dataset):
        raise ValueError(f"{len(values)} weights for a dataset of {len(dataset)} rows: give one weight per row.")
    return dataset.add_column(column, values)
