"""``scalemlo-reweight``'s arguments: the model, the data, the run, and ``ReweightingArguments``.

Parsed by `parse_arguments` with ``transformers.HfArgumentParser``: every dataclass field is a flag
(``--help`` lists them all), ``--config run.yaml`` gives any of them in a YAML (or JSON) file, and flags on
the command line override the file. An unknown key in the file is a ``ValueError`` naming it, raised before
anything is loaded.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from scalemlo.hf.arguments import ReweightingArguments

BASELINES = ("uniform", "uniform_plus_meta", "clean_only")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(ValueError):
    """Arguments that cannot be parsed: an unknown key in ``--config``'s file or an unknown flag, a missing
    file, or a value a dataclass refuses (raised before anything is loaded)."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A hub id or local directory"})
    config_name: str | None = field(default=None, metadata={"help": "Build the model from this config (no weights)"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)"})
    model_seed: int = field(default=0, metadata={"help": "Seed of a model built from a config"})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "Training data (json, jsonl, csv or text)"})
    meta_file: str | None = field(default=None, metadata={"help": "The small clean meta set (same formats)"})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluated during training"})
    heldout_file: str | None = field(default=None, metadata={"help": "Clean held-out set for the final report"})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Instead of files: a dataset for datasets.load_dataset (a hub id, a local directory or "
            "a builder name), its sets taken from --train_split, --meta_split, --validation_split and "
            "--heldout_split (a --*_file given wins for its set)"
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "--dataset_name: its configuration"})
    train_split: str = field(default="train", metadata={"help": "--dataset_name: the training split"})
    meta_split: str = field(
        default="meta", metadata={"help": "--dataset_name: the meta set's split (slices work: 'validation[:200]')"}
    )
    validation_split: str | None = field(default=None, metadata={"help": "--dataset_name: evaluated during training"})
    heldout_split: str | None = field(default=None, metadata={"help": "--dataset_name: the report's held-out set"})
    text_column: str = field(default="text", metadata={"help": "The column holding the text"})
    source_column: str = field(default="source", metadata={"help": "Optional: where each example comes from"})
    id_column: str = field(default="id", metadata={"help": "Optional: an example id (else the row index)"})
    corrupted_column: str = field(default="corrupted", metadata={"help": "Optional ground truth, for the report's AUC"})
    corruption_column: str = field(
        default="corruption", metadata={"help": "Optional kind of corruption (empty if clean), for per-kind AUCs"}
    )
    visible_corruptions: str = field(
        default="",
        metadata={
            "help": "Optional: comma-separated kinds of --corruption_column for weight_auc_visible, the AUC "
            "over those corrupted rows and the clean ones (the kinds a model can tell from clean text)"
        },
    )


@dataclass
class RunArguments:
    baselines: str = field(
        default="all",
        metadata={
            "help": f"Baselines trained with the same budget, initialisation and data order: 'all', 'none' or a "
            f"comma-separated subset of {', '.join(BASELINES)} (clean_only needs --corrupted_column)"
        },
    )
    train_on_meta: bool = field(
        default=False, metadata={"help": "The learned run also trains on the meta set (as uniform_plus_meta does)"}
    )
    proxy_steps: int = field(
        default=0,
        metadata={
            "help": "Learn the weighting first on a proxy run of this many steps from the same starting model "
            "(as DoReMi's proxy run), then train the model again from its start with that weighting, which "
            "keeps learning; the proxy's time counts in the learned run's. 0: no proxy run"
        },
    )
    scorer_features: str = field(
        default="ngrams",
        metadata={"help": "--reweighting scorer: comma-separated features (ngrams, loss, near_copies)"},
    )
    scorer_buckets: int = field(default=1024, metadata={"help": "--reweighting scorer: hash buckets per n-gram order"})
    scorer_hidden_size: int = field(
        default=0, metadata={"help": "--reweighting scorer: hidden units of the scorer (0: linear)"}
    )
    scorer_centre: str = field(
        default="meta",
        metadata={
            "help": "--reweighting scorer: the sigmoid's centre, 'meta' (a quantile of the meta set's scores) "
            "or 'median' (each batch's)"
        },
    )
    scorer_reference_quantile: float = field(
        default=0.1,
        metadata={
            "help": "--reweighting scorer, --scorer_centre meta: the quantile of the meta set's "
            "scores that is the centre"
        },
    )

    def baseline_names(self) -> list[str]:
        """The baselines to train, in ``BASELINES`` spelling.

        Raises:
            ValueError: a name outside ``BASELINES``.
        """
        choice = self.baselines.strip().lower()
        if choice in ("all", "true", "none", "false"):  # true/false: all/none as a boolean (YAML `baselines: true`)
            return list(BASELINES) if choice in ("all", "true") else []
        names = [n.strip() for n in self.baselines.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BASELINES))
        if unknown:
            raise ValueError(f"--baselines: unknown {unknown}; use 'all', 'none' or names from {list(BASELINES)}")
        return names


def build_parser(extra: Sequence[type] = ()) -> HfArgumentParser:
    """The parser of every field of ``ModelArguments``, ``DataArguments``, ``RunArguments``,
    ``ReweightingArguments`` and the ``extra`` dataclasses (a script's own), plus ``--config``."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, RunArguments, ReweightingArguments, *extra),
        prog="scalemlo-reweight",
        description="Fine-tune a causal LM while an upper level learns which training data to trust, against a "
        "clean meta set, beside uniform baselines on the same budget. Every flag below can also be a key of "
        "--config run.yaml.",
    )
    parser.add_argument(
        "--config",
        metavar="RUN.YAML",
        default=None,
        help="A YAML (or JSON) file of flags below, by field name (e.g. 'learning_rate: 1.0e-3'); flags given on "
        "the command line override its values; an unknown key is an error",
    )
    return parser


def field_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every field name the parser takes (its destinations, ``help`` and ``config`` excepted)."""
    return {action.dest for action in parser._actions} - {"help", "config"}


def read_config(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The fields set in a YAML/JSON config file.

    Raises:
        ConfigError: the file is missing, is not a mapping, or has a key that is no field of ``parser``
            (the message names it, with the closest field names).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of field names to values, got {type(values).__name__}")
    known = field_names(parser)
    unknown = [str(key) for key in values if key not in known]
    if unknown:
        hints = {key: difflib.get_close_matches(key, known, n=3) for key in unknown}
        hint = "; ".join(f"{key!r}: did you mean {', '.join(h)}?" for key, h in hints.items() if h)
        raise ConfigError(
            f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
            + (f" ({hint})" if hint else "")
            + "; every key must be a field listed by scalemlo-reweight --help"
        )
    return dict(values)


def _as_defaults(values: Mapping[str, Any], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Config values as argparse defaults that parse as the same flags would: a number or a boolean becomes its
    string, which argparse converts with the field's type (``warmup_steps: 10`` is the float ``--warmup_steps 10``
    gives; ``1e-3``, a string to YAML, is a float); one string for a list-valued field becomes a one-item list;
    ``None``, lists and mappings (a DeepSpeed config given inline) are taken as they are."""
    nargs = {action.dest: action.nargs for action in parser._actions}
    out = {}
    for key, value in values.items():
        if isinstance(value, (bool, int, float)):
            value = str(value)
        if isinstance(value, str) and nargs.get(key) in ("+", "*"):
            value = [value]
        out[key] = value
    return out


def parse_arguments(argv: Sequence[str], extra: Sequence[type] = (), defaults: Mapping[str, Any] | None = None):
    """Parse ``argv`` into ``(ModelArguments, DataArguments, RunArguments, ReweightingArguments, *extra)``.

    Precedence, lowest first: each field's default, ``defaults`` (a script's own), ``--config``'s file, the
    flags in ``argv``. A first argument that is a ``.yaml``/``.yml``/``.json`` file is read as ``--config``
    (a Trainer script's one-file form). ``--local_rank`` from a launcher is dropped.

    Raises:
        ConfigError: an unknown key in the config file, an unknown flag, or a value a dataclass refuses.
    """
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if argv and not argv[0].startswith("-") and Path(argv[0]).suffix in CONFIG_SUFFIXES:
        argv = ["--config", *argv]
    parser = build_parser(extra)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config", default=None)
    config = first.parse_known_args(argv)[0].config
    values = dict(defaults or {})
    unknown = sorted(set(values) - field_names(parser))
    if unknown:
        raise ConfigError(f"defaults for unknown fields {unknown}")
    if config is not None:
        values.update(read_config(config, parser))
    parser.set_defaults(**_as_defaults(values, parser))
    try:
        *outputs, left = parser.parse_args_into_dataclasses(
            argv, look_for_args_file=False, return_remaining_strings=True
        )
    except ValueError as error:  # a dataclass's own check (an unknown scheme, a bad size, ...)
        raise ConfigError(str(error)) from error
    if left:
        raise ConfigError(f"unknown arguments {left}; scalemlo-reweight --help lists every flag")
    return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))  # the Namespace holds --config
