"""``scalemlo-reweight``'s data: the sets from local files or ``datasets.load_dataset``, tokenized, batched.

A set is rows with text in ``--text_column``, and optionally a source (``--source_column``, any values:
names are mapped to indices), an id (``--id_column``, else the row index) and ground truth
(``--corrupted_column``, ``--corruption_column``) for the report. Other columns are ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from scalemlo.cli.reweight.arguments import DataArguments
from scalemlo.hf.arguments import ReweightingArguments

log = logging.getLogger(__name__)
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".text": "text"}


def load_split(data: DataArguments, what: str, required: bool = True):
    """The ``what`` set (train, meta, validation or heldout): ``--{what}_file`` if given, else
    ``--dataset_name``'s ``--{what}_split``; ``None`` for an optional set that neither names.

    Raises:
        ValueError: a required set that is not given, a file of unknown format, missing or empty, a split
            ``load_dataset`` cannot give, or a set without ``--text_column``.
    """
    path, split = getattr(data, f"{what}_file"), getattr(data, f"{what}_split")
    if path is not None:
        dataset, where = _from_file(path, what), f"--{what}_file {path}"
    elif data.dataset_name is not None and split:
        dataset, where = _from_dataset(data, what, split), f"--dataset_name {data.dataset_name} split {split!r}"
    elif required:
        raise ValueError(f"no {what}: pass --{what}_file (json, jsonl, csv or text) or --dataset_name")
    else:
        return None
    if dataset.num_rows == 0:
        raise ValueError(f"{where} is empty: it needs at least one example")
    if data.text_column not in dataset.column_names:
        raise ValueError(
            f"{where} has no {data.text_column!r} column (columns: {dataset.column_names}); "
            "name the text column with --text_column"
        )
    return dataset


def _from_file(path: str, what: str):
    from datasets import load_dataset

    suffix = Path(path).suffix
    if suffix not in FORMATS:
        raise ValueError(f"--{what}_file {path}: unknown format {suffix!r}; use one of {sorted(FORMATS)}")
    if not Path(path).is_file():
        raise ValueError(f"--{what}_file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as fh:
        if not fh.read(4096).strip():  # load_dataset fails on an empty file with a message about schemas
            raise ValueError(f"--{what}_file {path} is empty: it needs at least one example")
    return load_dataset(FORMATS[suffix], data_files={what: path}, split=what)


def _from_dataset(data: DataArguments, what: str, split: str):
    from datasets import load_dataset

    try:
        return load_dataset(data.dataset_name, data.dataset_config_name, split=split)
    except (ValueError, KeyError) as error:  # an unknown split; other failures (a hub id not found) as they are
        raise ValueError(
            f"--dataset_name {data.dataset_name}: no split {split!r} for the {what} set ({error}); name it with "
            f"--{what}_split"
        ) from error


def tokenize(
    dataset,
    tokenizer,
    data: DataArguments,
    args: ReweightingArguments,
    sources: dict[str, int] | None,
    near_copies: list[int] | None = None,
):
    """``input_ids`` (each text's tokens, then EOS) + ``id`` (the row index) + the ``source`` index (with
    ``sources``) + the given ``near_copies`` counts, under ``--long_sequences``; `Collator` pads them and
    adds ``attention_mask`` and ``labels``.

    Raises:
        ValueError: with ``--long_sequences refuse``, a text longer than ``--max_length`` tokens.
    """
    from datasets import Dataset

    max_length = args.max_length or tokenizer.model_max_length
    texts = list(dataset[data.text_column])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) + 1 > max_length]
    if too_long and args.long_sequences == "refuse":
        raise ValueError(
            f"{len(too_long)} texts are longer than {max_length} tokens (e.g. row {too_long[0]}); shorten them, raise "
            "--max_length, or pass --long_sequences truncate"
        )
    if too_long:
        log.warning("%d of %d texts are longer than %d tokens: truncated", len(too_long), len(texts), max_length)
    eos = tokenizer.eos_token_id
    columns = {"input_ids": [ids[: max_length - 1] + [eos] for ids in encoded]}  # padded per batch by Collator
    columns["id"] = list(range(len(texts)))
    if sources is not None:
        columns["source"] = [sources[s] for s in list(dataset[data.source_column])]
    if near_copies is not None:
        columns["near_copies"] = near_copies
    return Dataset.from_dict(columns)


class Collator:
    """Pads a batch to its longest example (right side): attention 0 and label -100 on the padding."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """``items``: rows of `tokenize`. Returns int64 tensors ``input_ids``, ``attention_mask``,
        ``labels`` of shape (batch, longest) and each other column of shape (batch,)."""
        longest = max(len(item["input_ids"]) for item in items)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for item in items:
            ids, padding = list(item["input_ids"]), longest - len(item["input_ids"])
            out["input_ids"].append(ids + [self.pad] * padding)
            out["attention_mask"].append([1] * len(ids) + [0] * padding)
            out["labels"].append(ids + [-100] * padding)
        batch = {key: torch.tensor(value) for key, value in out.items()}
        for key in items[0]:
            if key != "input_ids":
                batch[key] = torch.tensor([item[key] for item in items])
        return batch


def with_meta(train, meta, data: DataArguments):
    """The training set with the meta set appended: meta rows are clean, their ids prefixed ``meta/``, columns
    the meta set lacks filled (``corrupted`` False, ``corruption`` "", others None)."""
    from datasets import Dataset

    fill = {data.corrupted_column: False, data.corruption_column: ""}
    rows = {}
    for column in train.column_names:
        if column == data.id_column:
            extra = [f"meta/{x}" for x in (meta[column] if column in meta.column_names else range(len(meta)))]
        elif column in meta.column_names:
            extra = list(meta[column])
        else:
            extra = [fill.get(column)] * len(meta)
        rows[column] = list(train[column]) + extra
    return Dataset.from_dict(rows)
