"""The training and meta sets made ready for ``ReweightingTrainer``, so a user's data works as it comes.

A user's training set is tokenized rows (``input_ids``, ``attention_mask``, ``labels``) with, often, text
columns and a ``source`` column of names. The reweighting reads two columns of integers: ``id`` (the row,
for the ``example`` scheme and the exports) and ``source`` (an index, for the ``source`` scheme and the
per-source statistics). For a ``datasets.Dataset`` the Trainer therefore

- numbers the rows in a new ``id`` column when there is none; a string ``id`` column becomes the examples'
  names and the row numbers replace it; an integer one is kept (the user's plumbing, unchanged);
- maps a string ``source`` column to indices (`source_mapping`: the ``source`` scheme's own order, else
  the given ``source_names``, else the sorted distinct names); an integer one is kept;
- drops every other text column (a collator cannot make tensors of strings), from the meta set too;
- collates one training batch and one meta batch at construction (`check_batch`), so that a set the
  collator cannot batch, or whose batches lack ``input_ids``/``labels`` or a column the scheme reads, fails
  before the first step with the set's columns in the message.

Other dataset types (a torch ``Dataset``, a list) are taken as they are and only checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from scalemlo.hf.evaluation import holds_text
from scalemlo.rng import rng_preserved

ID_COLUMN = "id"
SOURCE_COLUMN = "source"
MODEL_COLUMNS = ("input_ids", "labels")  # what every batch of both sets must hold (attention_mask optional)


def is_table(dataset: Any) -> bool:
    """True for a ``datasets.Dataset`` (column names and features to prepare from)."""
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency of the hf extra
        return False
    return isinstance(dataset, Dataset)


def column_kind(dataset: Any, column: str) -> str | None:
    """``"text"``, ``"int"`` or ``"other"`` for a column of a ``datasets.Dataset``; None when it has none."""
    if not is_table(dataset) or column not in dataset.column_names:
        return None
    feature = dataset.features[column]
    if holds_text(feature):
        return "text"
    dtype = getattr(feature, "dtype", "")
    return "int" if dtype.startswith(("int", "uint")) else "other"


def data_source_names(dataset: Any) -> list[str] | None:
    """The sorted distinct names of a string ``source`` column (None: no such column)."""
    if column_kind(dataset, SOURCE_COLUMN) != "text":
        return None
    values = list(dataset[SOURCE_COLUMN])
    missing = [i for i, value in enumerate(values) if value is None]
    if missing:
        raise ValueError(
            f"the {SOURCE_COLUMN!r} column has no value in {len(missing)} of {len(values)} rows (first: rows "
            f"{missing[:5]}); give every row a source name (e.g. 'unknown'), or remove the column "
            f"(dataset.remove_columns({SOURCE_COLUMN!r})) to train without per-source weights and statistics"
        )
    return sorted(set(values))


def scheme_arguments(
    scheme: str, dataset: Any, given: Mapping[str, Any] | None, source_names: Sequence[str] | None
) -> dict[str, Any]:
    """The keyword arguments of reweighting ``scheme`` derived from the training set, under those ``given``.

    ``source``: ``sources`` = the names of a string ``source`` column, else ``source_names``' number, else
    the largest integer index + 1. ``example``: ``n_examples`` = the number of rows. Given values win.

    Args:
        scheme: the reweighting scheme's name.
        dataset: the training set.
        given: the keyword arguments the user gave (``reweighter_kwargs``).
        source_names: the names of the indices of an integer ``source`` column, if the user gave them.

    Returns:
        The keyword arguments, the given ones included.

    Raises:
        ValueError: the ``source`` scheme and a training set without a ``source`` column.
    """
    kwargs = dict(given or {})
    if scheme == "source" and "sources" not in kwargs:
        kind = column_kind(dataset, SOURCE_COLUMN)
        if kind == "text":
            kwargs["sources"] = data_source_names(dataset)
        elif source_names:
            kwargs["sources"] = len(source_names)  # the integer column indexes the given names, in their order
        elif kind == "int":
            kwargs["sources"] = int(max(dataset[SOURCE_COLUMN])) + 1
        else:
            columns = dataset.column_names if is_table(dataset) else "(not a datasets.Dataset)"
            raise ValueError(
                f"--reweighting source learns one weight per value of the training set's 'source' column, which "
                f"it lacks (columns: {columns}); add a 'source' column (a name or an index per row), or pass "
                "reweighter_kwargs={'sources': [...]} with a dataset whose batches carry it"
            )
    if scheme == "example" and "n_examples" not in kwargs:
        kwargs["n_examples"] = len(dataset)
    return kwargs


def source_mapping(reweighter: Any, dataset: Any, source_names: Sequence[str] | None) -> dict[str, int] | None:
    """name -> index for a string ``source`` column (None: no string column).

    The reweighter's own (``SourceWeights.index``) when its names are the data's, else the order of
    ``source_names``, else the sorted distinct names.

    Args:
        reweighter: the reweighting module.
        dataset: the training set.
        source_names: the names of the source indices, if the user gave them.
    """
    names = data_source_names(dataset)
    if names is None:
        return None
    own = getattr(reweighter, "index", None)
    if isinstance(own, Mapping) and any(name in own for name in names):
        return dict(own)
    if source_names:
        return {name: index for index, name in enumerate(source_names)}
    return {name: index for index, name in enumerate(names)}


@dataclass
class PreparedTrainingSet:
    """The training set as the Trainer reads it, and the names of its ids and source indices."""

    dataset: Any
    example_names: list[str] | None
    source_names: list[str] | None


def prepare_training_set(
    dataset: Any,
    mapping: Mapping[str, int] | None,
    example_names: Sequence[str] | None,
    source_names: Sequence[str] | None,
) -> PreparedTrainingSet:
    """``id`` and ``source`` as integer columns and the text columns dropped (see the module docstring).

    Args:
        dataset: the user's training set (a ``datasets.Dataset``; anything else is returned as it is).
        mapping: name -> index for a string ``source`` column (`source_mapping`).
        example_names: the examples' names by row, if the user gave them.
        source_names: the names of the source indices, if the user gave them.

    Raises:
        ValueError: a source name the mapping lacks.
    """
    names = list(example_names) if example_names is not None else None
    sources = list(source_names) if source_names is not None else None
    if not is_table(dataset):
        return PreparedTrainingSet(dataset, names, sources)
    id_kind = column_kind(dataset, ID_COLUMN)
    if id_kind not in (None, "int"):
        if names is None and id_kind == "text":
            names = [str(value) for value in dataset[ID_COLUMN]]
        dataset = dataset.remove_columns(ID_COLUMN)
        id_kind = None
    if id_kind is None:
        dataset = dataset.add_column(ID_COLUMN, list(range(len(dataset))))
    if mapping is not None:
        values = dataset[SOURCE_COLUMN]
        unknown = sorted(set(values) - set(mapping))
        if unknown:
            raise ValueError(
                f"train_dataset's 'source' column holds {unknown[:5]}, which the reweighting does not know (it "
                f"knows {sorted(mapping)[:10]}); build it from every source of the training set (leave "
                "reweighter_kwargs['sources'] out to take them from the data)"
            )
        dataset = dataset.remove_columns(SOURCE_COLUMN).add_column(SOURCE_COLUMN, [mapping[v] for v in values])
        sources = [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
    return PreparedTrainingSet(drop_text_columns(dataset), names, sources)


def prepare_meta_set(dataset: Any, mapping: Mapping[str, int] | None) -> Any:
    """The meta set without its text columns.

    A string ``source`` column whose names the training set has is mapped like the training set's (the meta
    loss reads neither, but the user's collator may).

    Args:
        dataset: the meta set (or any set prepared like it).
        mapping: name -> index of the training set's string ``source`` column (`source_mapping`).
    """
    if mapping is not None and column_kind(dataset, SOURCE_COLUMN) == "text":
        values = dataset[SOURCE_COLUMN]
        if set(values) <= set(mapping):
            dataset = dataset.remove_columns(SOURCE_COLUMN).add_column(SOURCE_COLUMN, [mapping[v] for v in values])
    return drop_text_columns(dataset)


def check_example_ids(dataset: Any, n_examples: int) -> None:
    """Every integer ``id`` of a ``datasets.Dataset`` indexes one of ``n_examples`` learned weights.

    Raises:
        ValueError: an id outside [0, n_examples), with the fix.
    """
    if column_kind(dataset, ID_COLUMN) != "int" or len(dataset) == 0:
        return
    ids = dataset[ID_COLUMN]
    low, high = min(ids), max(ids)
    if low < 0 or high >= n_examples:
        raise ValueError(
            f"train_dataset's 'id' column runs from {low} to {high}, but --reweighting example learns "
            f"{n_examples} weights, indexed by the id (0 ... {n_examples - 1}); drop the 'id' column (the Trainer "
            "numbers the rows; pass your ids as example_names, or as a string 'id' column) or pass "
            "reweighter_kwargs={'n_examples': ...} above the largest id"
        )


def drop_text_columns(dataset: Any) -> Any:
    """A ``datasets.Dataset`` without its string columns (anything else as it is)."""
    if not is_table(dataset):
        return dataset
    text = [name for name, feature in dataset.features.items() if holds_text(feature)]
    return dataset.remove_columns(text) if text else dataset


def _columns(dataset: Any, rows: Sequence[Any]) -> list[str]:
    if is_table(dataset):
        return list(dataset.column_names)
    return sorted(rows[0]) if rows and isinstance(rows[0], Mapping) else [type(rows[0]).__name__ if rows else "?"]


def check_batch(
    name: str, dataset: Any, collate, size: int, reweighter: Any = None, columns: Sequence[str] | None = None
) -> None:
    """Collate the first ``size`` rows of ``dataset`` and check the batch.

    The batch must hold ``input_ids`` and ``labels`` as [B, T] tensors (and ``attention_mask`` of the same
    shape, if any); with ``reweighter``, its weights of the batch must be computable (the columns it
    reads, indices in range). Torch's, Python's and NumPy's random states are restored afterwards, so a
    collator that draws (masking) leaves the run's randomness as it was.

    Args:
        name: how the user passed the set (named in the messages).
        dataset: the set.
        collate: the data collator.
        size: how many rows to collate.
        reweighter: the reweighting module whose weights of the batch must be computable, if any.
        columns: the set's columns as the user gave it (before text columns were dropped), for the messages.

    Raises:
        ValueError: naming the set's columns, what is wrong and the fix.
    """
    if is_table(dataset) and "input_ids" not in dataset.column_names:
        raise ValueError(
            f"{name} has no input_ids column (its columns are {list(columns or dataset.column_names)}); tokenize "
            "it like the training set: input_ids, attention_mask and labels (or a collator that makes labels)"
        )
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        return
    rows = [dataset[i] for i in range(min(size, len(dataset)))]
    columns = list(columns) if columns is not None else _columns(dataset, rows)
    # the check's collation leaves the run's generators as they were; CUDA's are not captured, which would
    # initialize CUDA before the launcher places the process on its device
    with rng_preserved(cuda=False):
        try:
            batch = collate(rows)
        except Exception as exc:  # noqa: BLE001 - any collator failure is reported with the columns
            raise ValueError(
                f"{name}: the data collator cannot batch its rows ({type(exc).__name__}: {exc}); its columns are "
                f"{columns}. Tokenize it like the training set (input_ids, attention_mask, labels) and keep only "
                "columns the collator takes"
            ) from exc
        _check_model_columns(name, batch, columns)
        if reweighter is not None:
            _check_weights(name, batch, columns, reweighter)


def _check_model_columns(name: str, batch: Any, columns: list[str]) -> None:
    if not isinstance(batch, Mapping):
        raise ValueError(f"{name}: the data collator gave a {type(batch).__name__}, not a dict of tensors")
    missing = [column for column in MODEL_COLUMNS if column not in batch]
    if missing:
        raise ValueError(
            f"{name}: its batches lack {missing} (a batch holds {sorted(batch)}; the set's columns are {columns}). "
            "Tokenize it like the training set: input_ids and labels (-100 where not predicted), e.g. with "
            "DataCollatorForLanguageModeling(tokenizer, mlm=False), which makes labels from input_ids"
        )
    shape = None
    for column in ("input_ids", "labels", "attention_mask"):
        value = batch.get(column)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{name}: batch[{column!r}] must be a [batch, tokens] tensor; got {got}. Pad the rows to one "
                "length in the collator (e.g. DataCollatorForLanguageModeling or DataCollatorWithPadding)"
            )
        if shape is not None and value.shape != shape:
            raise ValueError(
                f"{name}: batch[{column!r}] has shape {tuple(value.shape)} but input_ids {tuple(shape)}; pad "
                "labels and attention_mask like input_ids"
            )
        shape = value.shape


def _check_weights(name: str, batch: Mapping[str, Any], columns: list[str], reweighter: Any) -> None:
    missing = [column for column in getattr(reweighter, "requires", ()) if column not in batch]
    if missing:
        raise ValueError(
            f"{name}: {type(reweighter).__name__} reads the batch columns {missing}, which the collated batch "
            f"lacks (it holds {sorted(batch)}; the set's columns are {columns}); add them to the dataset and "
            "let the collator pass them on"
        )
    rows = len(batch["input_ids"])
    try:
        with torch.no_grad():
            reweighter.weights(torch.zeros(rows), batch)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    finally:
        reweighter.last_raw = None
