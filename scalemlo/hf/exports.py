"""Learned weights out of a run: JSON and CSV files, and a ``datasets`` column to filter on.

A run keeps, for every training example it has seen, the weight it last
trained that example with (normalised as its scheme normalises, so 1 is an
average example) and its source; per-source weights are the scheme's own
(``SourceWeights``: the learned softmax) or the mean of its examples'.

Files (``write_weights``): ``weights.json`` ({"examples": {id: weight},
"sources": {name: weight}}), ``example_weights.csv`` (id, source, weight) and
``source_weights.csv`` (source, weight).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class WeightTable:
    """The last weight each training example got, with its source (filled during training)."""

    def __init__(self, example_names: Sequence[str] | None = None, source_names: Sequence[str] | None = None):
        self.example_names = list(example_names) if example_names is not None else None
        self.source_names = list(source_names) if source_names is not None else None
        self.weights: dict[int, float] = {}
        self.sources: dict[int, int] = {}

    def update(self, ids: torch.Tensor | None, weights: torch.Tensor, sources: torch.Tensor | None) -> None:
        """Record one micro-batch: ``ids`` [B] int64 row indices, ``weights`` [B], ``sources`` [B] int64."""
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
        return self.example_names[index] if self.example_names is not None else str(index)

    def source_name(self, index: int) -> str:
        return self.source_names[index] if self.source_names is not None else str(index)

    def per_source(self, learned: Mapping[str, float] | None = None) -> dict[str, float]:
        """Learned per-source weights if the scheme has them, else the mean weight of each source's examples."""
        if learned:
            return dict(learned)
        sums: dict[str, list[float]] = {}
        for i, w in self.weights.items():
            if i in self.sources:
                sums.setdefault(self.source_name(self.sources[i]), []).append(w)
        return {name: sum(ws) / len(ws) for name, ws in sorted(sums.items())}

    def to_dict(self, learned_sources: Mapping[str, float] | None = None) -> dict[str, Any]:
        return {
            "examples": {self.name(i): w for i, w in sorted(self.weights.items())},
            "sources": self.per_source(learned_sources),
        }


def write_weights(
    table: WeightTable, directory: str | Path, learned_sources: Mapping[str, float] | None = None
) -> None:
    """``weights.json``, ``example_weights.csv`` and ``source_weights.csv`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = table.to_dict(learned_sources)
    (directory / "weights.json").write_text(json.dumps(data, indent=1))
    with open(directory / "example_weights.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "source", "weight"])
        for i, w in sorted(table.weights.items()):
            source = table.source_name(table.sources[i]) if i in table.sources else ""
            writer.writerow([table.name(i), source, f"{w:.8g}"])
    with open(directory / "source_weights.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "weight"])
        for name, w in data["sources"].items():
            writer.writerow([name, f"{w:.8g}"])


def add_weight_column(dataset, weights, column: str = "scalemlo_weight"):
    """``dataset`` (a ``datasets.Dataset``) with one weight per row in a new column.

    Args:
        dataset: the rows, in the order the weights are given.
        weights: a float sequence or tensor [len(dataset)] (e.g. ``ReweightingTrainer.score(dataset)``), or a
            :class:`WeightTable` of the training run (rows in training order; rows it never saw get NaN).
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
