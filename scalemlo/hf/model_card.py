"""The model card (``README.md``) a ``ReweightingTrainer`` writes beside a saved model, as TRL's trainers do.

``ReweightingTrainer.save_model`` (and so ``push_to_hub``, which saves, then writes the card, then uploads
the folder) leaves a card that says what the Hub page should: a YAML front matter (``library_name``,
``tags: [scalemlo, data-reweighting, ...]``, ``base_model`` when the model came from the Hub, ``datasets``
when named) and, in Markdown, the base model (or "built from a config"), the training and meta data, the
reweighting scheme, hypergradient method and unroll steps, the learned per-source weights (mean 1 over the
training set, as ``weights.json`` has them; the ``source`` scheme's softmax beside them), the held-out losses
it was told (``ReweightingTrainer.model_card_metrics``, e.g. the baselines') and the last evaluation's.

`render_model_card` is the text from plain values; `trainer_facts` reads them off a trainer;
`ModelCards` is the trainer's side (``save_model``, ``create_model_card``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scalemlo.distributed import world_size

CARD_TAGS = ("scalemlo", "data-reweighting")
CARD_NAME = "README.md"


@dataclass
class SourceRow:
    """One source of the training set on the card: its examples and learned weights."""

    name: str
    examples: int
    mean_weight: float  # the mean final weight of its examples; mean 1 over the training set
    softmax: float | None = None  # the ``source`` scheme's α (sums to 1 over sources)


@dataclass
class CardFacts:
    """What a model card says, as plain values (`render_model_card`)."""

    model_name: str
    base_model: str | None  # a Hub id (front matter ``base_model``), or None
    base_text: str  # one sentence on where the weights started
    training: Mapping[str, Any]  # row label -> value (the reweighting settings, steps, ...)
    data: Sequence[tuple[str, str]]  # (set, description)
    sources: Sequence[SourceRow] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    adapter: Mapping[str, Any] | None = None  # a PEFT adapter's settings; None: a full model
    tags: Sequence[str] = CARD_TAGS
    datasets: Sequence[str] = ()
    hub_model_id: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)


def render_model_card(facts: CardFacts) -> str:
    """The card's text: YAML front matter, then Markdown."""
    from huggingface_hub import ModelCardData

    tags = list(dict.fromkeys([*CARD_TAGS, *facts.tags]))
    data = ModelCardData(
        library_name="peft" if facts.adapter is not None else "transformers",
        base_model=facts.base_model,
        model_name=facts.model_name,
        tags=tags,
        datasets=list(facts.datasets) or None,
    )
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# Model card for {facts.model_name}", "", facts.base_text]
    lines += [
        "It was trained with scalemlo's `ReweightingTrainer`, a "
        "`transformers.Trainer` that learns how to weight its training data: a weighting model steps on the "
        "hypergradient of the model's loss on a small clean meta set.",
        "",
    ]
    if facts.adapter is not None:
        load = facts.hub_model_id or "<this folder>"
        lines += [
            "## Adapter",
            "",
            "A LoRA adapter (PEFT) over the base model; load it with "
            f'`peft.AutoPeftModelForCausalLM.from_pretrained("{load}")`.',
            "",
        ]
        lines += _table(("setting", "value"), [(k, _fmt(v)) for k, v in facts.adapter.items()])
    lines += ["## Training data", ""]
    lines += [f"- {name}: {text}" for name, text in facts.data] + [""]
    lines += ["## Reweighting", ""]
    lines += _table(("setting", "value"), [(k, _fmt(v)) for k, v in facts.training.items()])
    if facts.sources:
        lines += [
            "## Learned source weights",
            "",
            "The final weighting model's weight of every training example, averaged over each source's "
            "examples, on one scale: mean 1 over the training set (as `weights.json` has them).",
        ]
        softmax = any(row.softmax is not None for row in facts.sources)
        if softmax:
            lines[-1] += " `softmax` is the `source` scheme's α (summing to 1 over the sources)."
        lines += [""]
        header = ("source", "examples", "mean weight", *(("softmax",) if softmax else ()))
        rows = [
            (row.name, str(row.examples), f"{row.mean_weight:.4f}", *((_fmt(row.softmax),) if softmax else ()))
            for row in facts.sources
        ]
        lines += _table(header, rows)
    if facts.metrics:
        lines += ["## Held-out results", "", "Losses are token-mean causal-LM losses (lower is better)."]
        lines += [""] + _table(("metric", "value"), [(k, _fmt(v)) for k, v in facts.metrics.items()])
    if facts.versions:
        lines += ["## Framework versions", ""] + [f"- {k}: {v}" for k, v in facts.versions.items()] + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(directory: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``directory/README.md``, replaced whole (written under another name, then renamed).

    Returns:
        The card's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CARD_NAME
    staging = directory / f".{CARD_NAME}.tmp"
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(map(str, sorted(value) if isinstance(value, set) else value))
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    cells = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in cells] + [""]


# ---- facts from a trainer ---------------------------------------------------------------------------------
def base_model_of(model: Any) -> tuple[str | None, str]:
    """Where the model's weights started.

    A local folder is no Hub id (TRL's rule); a model built from a config has no ``name_or_path``.

    Returns:
        (the Hub id the model was loaded from, or None; a sentence on where its weights started).
    """
    from scalemlo.hf.adapters import base_model

    base = base_model(model)
    config = getattr(base, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or ""
    params = sum(p.numel() for p in base.parameters())
    kind = f"{getattr(config, 'model_type', '?')}, {params:,} parameters"
    if not name:
        return None, (
            f"The model was built from a `{type(config).__name__}` ({kind}), not loaded from a pretrained checkpoint."
        )
    if os.path.isdir(name):
        return None, f"The model was fine-tuned from the local checkpoint `{name}` ({kind})."
    return name, f"This model is a fine-tuned version of [{name}](https://huggingface.co/{name}) ({kind})."


def dataset_text(dataset: Any) -> str:
    """'N rows' and the dataset's name where ``datasets`` knows it (loaded from the Hub)."""
    rows = f"{len(dataset):,} rows"
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None)
    return f"{rows} of `{name}`" if name else rows


def source_rows(
    weights, sources: Sequence[int], names: Sequence[str] | None, softmax: Mapping[str, float] | None
) -> list[SourceRow]:
    """The card's source table from the training set's final weights [N] and source indices [N].

    Args:
        weights: [N] the training set's final weights.
        sources: [N] int source index of each example.
        names: index -> source name (None: the index as a string).
        softmax: the ``source`` scheme's α by name, if any.
    """
    from scalemlo.hf.exports import source_weights

    means, counts = source_weights(weights, sources, names)
    softmax = softmax or {}
    return [SourceRow(name, counts[name], value, softmax.get(name)) for name, value in means.items()]


def framework_versions(adapter: bool) -> dict[str, str]:
    """The installed versions of scalemlo, transformers, torch, datasets (and peft with ``adapter``), by package."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("scalemlo", "transformers", "torch", "datasets", *(("peft",) if adapter else ())):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def trainer_facts(
    trainer: Any,
    weights=None,
    model_name: str | None = None,
    dataset_name: str | Sequence[str] | None = None,
    tags: str | Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> CardFacts:
    """A ``ReweightingTrainer``'s card facts.

    Args:
        trainer: the trainer (its model, arguments, data, weighting and state).
        weights: float [N] the training set's final weights, mean 1 (``trainer.score()``); None: no source table
            but the ``source`` scheme's softmax.
        model_name: the card's title (default: the Hub repo's name, else the output folder's).
        dataset_name: Hub dataset id(s) of the training data (front matter ``datasets``).
        tags: tags beside scalemlo's.
        metrics: held-out results beside ``trainer.model_card_metrics`` (e.g. baselines' losses).
    """
    from scalemlo.hf.adapters import adapter_settings

    args = trainer.args
    if model_name is None:
        model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(args.output_dir).name
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    hub_id, base_text = base_model_of(model)
    adapter = adapter_settings(model)
    names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    data = []
    train = trainer.user_train_dataset if trainer.user_train_dataset is not None else trainer.train_dataset
    if train is not None:
        data.append(("training set", dataset_text(train) + (f" ({', '.join(names)})" if names else "")))
    data.append(("meta set (clean; the weights are judged on it)", dataset_text(trainer.meta_dataset)))
    evaluation = trainer.eval_dataset
    for key, value in evaluation.items() if isinstance(evaluation, Mapping) else [("", evaluation)]:
        if value is not None:
            data.append((f"evaluation set{' ' + key if key else ''}", dataset_text(value)))
    mlo = getattr(trainer, "mlo", None)
    training: dict[str, Any] = {
        "reweighting scheme": f"{args.reweighting} ({type(trainer.reweighter).__name__})",
        "hypergradient method": args.hypergradient_method,
        "unroll steps (model steps per meta step)": args.unroll_steps,
        "meta warm-up steps": args.meta_warmup_steps,
        "meta stop ratio": args.meta_stop_ratio,
        "shared forward": args.meta_level_config().shared_forward,
        "meta optimizer, learning rate": f"{args.meta_optimizer}, {args.meta_learning_rate:g}",
        "model learning rate": f"{args.learning_rate:g}",
        "batch (per device x accumulation)": f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}",
        "optimizer steps": trainer.state.global_step,
        "meta steps": mlo.levels["meta"].steps if mlo is not None else 0,
    }
    if args.selection_pool > 1:
        training["selection pool"] = args.selection_pool
    if args.deepspeed:
        training["DeepSpeed config"] = Path(str(args.deepspeed)).name if isinstance(args.deepspeed, str) else "dict"
    softmax = trainer.reweighter.source_weights() if hasattr(trainer.reweighter, "source_weights") else None
    source_names = trainer._source_names
    if softmax is not None and source_names is not None and len(softmax) == len(source_names):
        softmax = dict(zip(source_names, softmax.values()))  # named as the data names its indices
    sources: list[SourceRow] = []
    columns = getattr(trainer.train_dataset, "column_names", None) or []
    if weights is not None and "source" in columns:
        sources = source_rows(weights, trainer.train_dataset["source"], source_names, softmax)
    elif softmax:  # weights not at hand (create_model_card on rank 0 alone, several ranks): the softmax only
        training["source softmax"] = ", ".join(f"{k} {v:.4f}" for k, v in softmax.items())
    results = {**trainer.model_card_metrics, **dict(metrics or {})}
    for entry in reversed(trainer.state.log_history):  # the last evaluation
        if "eval_loss" in entry:
            results.update({k: v for k, v in entry.items() if k in ("eval_loss", "eval_perplexity")})
            break
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    if adapter is not None:
        tags.append("lora")
    return CardFacts(
        model_name=model_name,
        base_model=hub_id,
        base_text=base_text,
        training=training,
        data=data,
        sources=sources,
        metrics=results,
        adapter=adapter,
        tags=tags,
        datasets=names,
        hub_model_id=getattr(trainer, "hub_model_id", None),
        versions=framework_versions(adapter is not None),
    )


class ModelCards:
    """``save_model`` and ``create_model_card`` of ``ReweightingTrainer``: the card beside every saved model.

    A base before ``transformers.Trainer``. Reads the trainer's ``_final_weights`` / ``_scored`` /
    ``_score_key`` (the training set's scores, computed once per step) and what `trainer_facts` reads.
    """

    def _card_needs_weights(self) -> bool:
        return "source" in (getattr(self.train_dataset, "column_names", None) or [])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, then the model card ``README.md`` beside the model, in checkpoints too.

        The card is written by `create_model_card`. Every rank must call it, as the Trainer's: the card's
        per-source weights are the final weights of the training set (``score()``: a forward over it when the
        data have sources, shared with a checkpoint's weight exports).
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        weights = self._final_weights() if self._card_needs_weights() else None
        self.create_model_card(output_dir=output_dir, weights=weights)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        metrics: Mapping[str, float] | None = None,
        output_dir: str | None = None,
        weights: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        """Write the model card ``README.md`` to ``output_dir`` on the main process, as TRL's trainers do.

        It replaces the Trainer's draft, which knows nothing of the weighting: base model, data, reweighting
        scheme, method and unroll steps, the learned per-source weights and held-out results
        (`scalemlo.hf.model_card`). ``push_to_hub`` calls it after ``save_model``, before the upload.

        Args:
            model_name: the card's title (default: the Hub repo's name, else the output folder's).
            dataset_name: Hub dataset id(s) of the training data (front matter ``datasets``); also read from
                the Trainer's ``dataset`` keyword.
            tags: tags beside ``scalemlo`` and ``data-reweighting``.
            metrics: held-out results beside `model_card_metrics` (e.g. the baselines' losses).
            output_dir: where to write it (default output_dir).
            weights: float [N] the training set's final weights (default: those of this step, if computed on
                every rank, or computed here in a one-process run).
            kwargs: the Trainer's other card arguments (``language``, ``license``, ``finetuned_from``, ...):
                accepted and not used.
        """
        dataset_name = dataset_name or kwargs.get("dataset")
        if weights is None and self._card_needs_weights():
            if self._scored is not None and self._scored[0] == self._score_key():
                weights = self._scored[1]
            elif world_size() == 1:
                weights = self._final_weights()
        if not self.is_world_process_zero():
            return
        facts = trainer_facts(self, weights, model_name, dataset_name, tags, metrics)
        write_model_card(output_dir or self.args.output_dir, render_model_card(facts))
