"""``scalemlo-reweight``: the learned run and its uniform baselines, on the same budget, initialisation and data
order, then the report.

Reads top to bottom: arguments, data, models, the baselines, the learned run, the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer

from scalemlo.backend import scale_fp16_zero0_loss
from scalemlo.cli.reweight.arguments import (
    ConfigError,
    DataArguments,
    ModelArguments,
    RunArguments,
    parse_arguments,
)
from scalemlo.cli.reweight.data import Collator, load_split, tokenize, with_meta
from scalemlo.cli.reweight.report import heldout_loss, make_report, plot, print_report
from scalemlo.distributed import ensure_distributed, is_main_process
from scalemlo.hf import ReweightingArguments, ReweightingTrainer, reset_trainer_state
from scalemlo.hf.losses import per_example_causal_lm_loss
from scalemlo.hf.reweighting import source_index
from scalemlo.hf.scorer import near_copy_counts

log = logging.getLogger(__name__)


class UniformTrainer(Trainer):
    """The baseline: the same per-example mean loss, every weight 1."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        losses, counts = per_example_causal_lm_loss(logits, inputs["labels"], inputs["attention_mask"])
        valid = counts > 0
        loss = losses[valid].sum() / valid.sum().clamp_min(1)
        # as ReweightingTrainer: DeepSpeed 0.19 leaves an fp16 ZeRO-0 loss unscaled (a fair baseline)
        scale_fp16_zero0_loss(self.model_wrapped, loss)
        return (loss, None) if return_outputs else loss


def build_model(model_args: ModelArguments, tokenizer):
    """``--model_name_or_path``'s pre-trained model (``from_pretrained``: a hub id or a local directory), else
    one built from ``--config_name`` with its weights drawn under ``--model_seed``.

    Raises:
        ValueError: neither is given.
    """
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    if not model_args.config_name:
        raise ValueError("no model: pass --model_name_or_path (a hub id or a local directory) or --config_name")
    config = AutoConfig.from_pretrained(model_args.config_name)
    torch.manual_seed(model_args.model_seed)
    return AutoModelForCausalLM.from_config(config)


def baseline_arguments(args: ReweightingArguments, name: str) -> ReweightingArguments:
    """The same arguments (budget, DeepSpeed config, seed), their own output directory."""
    return dataclasses.replace(args, output_dir=str(Path(args.output_dir) / name))


def proxy_arguments(args: ReweightingArguments, steps: int) -> ReweightingArguments:
    """The learned run's arguments for its proxy run: ``steps`` steps, its own output directory, nothing saved,
    evaluated or reported, the weighting learning to its last step."""
    return dataclasses.replace(
        args,
        output_dir=str(Path(args.output_dir) / "proxy"),
        max_steps=steps,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        resume_from_checkpoint=None,
        meta_stop_ratio=1.0,  # the proxy run learns the weighting on every step it has
    )


def run(model_args: ModelArguments, data: DataArguments, run_args: RunArguments, args: ReweightingArguments) -> dict:
    """Train the baselines and the learned run; write the model, its weight exports, ``report.json`` and
    ``weights.png`` to ``args.output_dir``; return the report.

    Raises:
        ValueError: data or settings that cannot work (named in the message), before any training.
    """
    start = time.perf_counter()
    if not (model_args.tokenizer_name or model_args.model_name_or_path):
        raise ValueError("no tokenizer: pass --tokenizer_name (needed with --config_name) or --model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    collate = Collator(tokenizer.pad_token_id)
    train = load_split(data, "train")
    meta = load_split(data, "meta")
    heldout = load_split(data, "heldout", required=False)
    validation = load_split(data, "validation", required=False)
    per_source = data.source_column in train.column_names
    if args.reweighting == "source" and not per_source:
        raise ValueError(f"--reweighting source needs a {data.source_column!r} column in the training set")
    if per_source and data.source_column in meta.column_names:
        unknown = set(list(meta[data.source_column])) - set(list(train[data.source_column]))
        if unknown:
            raise ValueError(f"the meta set has sources the training set has not: {sorted(unknown)}")
    if run_args.proxy_steps < 0:
        raise ValueError(f"--proxy_steps must be >= 0 (0: no proxy run); got {run_args.proxy_steps}")
    baselines = run_args.baseline_names()
    labelled = data.corrupted_column in train.column_names
    if "clean_only" in baselines and not labelled:
        if run_args.baselines != "all":
            raise ValueError(f"--baselines clean_only needs ground truth: a {data.corrupted_column!r} column")
        baselines.remove("clean_only")
    sources = source_index(list(train[data.source_column])) if per_source else None
    names = sorted(sources, key=sources.get) if sources else None
    # the training sets of the runs: the learned run's (with the meta set under --train_on_meta) and the baselines'
    # (with --train_on_meta the learned run's data are uniform_plus_meta's, and clean_only keeps the meta set)
    train_sets = {"train": train, "uniform": train, "uniform_plus_meta": with_meta(train, meta, data)}
    if run_args.train_on_meta:
        train_sets["train"] = train_sets["uniform_plus_meta"]
    if labelled:
        train_sets["clean_only"] = train_sets["train"].filter(lambda row: not row[data.corrupted_column])
    learned_train = train_sets["train"]
    example_names = (
        [str(x) for x in list(learned_train[data.id_column])] if data.id_column in learned_train.column_names else None
    )
    scorer_features = [f.strip() for f in run_args.scorer_features.split(",") if f.strip()]
    counts = {}
    if args.reweighting == "scorer" and "near_copies" in scorer_features:  # the learned run's data and meta set
        texts = list(learned_train[data.text_column])  # with --train_on_meta the meta rows are its last
        found = near_copy_counts(texts if run_args.train_on_meta else texts + list(meta[data.text_column]))
        counts = {"train": found[: len(learned_train)], "meta": found[len(found) - len(meta) :]}
    tokenized = {
        k: tokenize(ds, tokenizer, data, args, sources if k in train_sets else None, counts.get(k))
        for k, ds in {**train_sets, "meta": meta, "validation": validation, "heldout": heldout}.items()
        if ds is not None and (k == "train" or k not in train_sets or k in baselines)
    }
    reweighter_kwargs = {
        "source": {"sources": names},
        "example": {"n_examples": len(learned_train)},
        "meta_weight_net": {"hidden_size": args.reweighting_hidden_size},
        "scorer": {
            "features": scorer_features,
            "buckets": run_args.scorer_buckets,
            "hidden_size": run_args.scorer_hidden_size,
            "centre": run_args.scorer_centre,
            "reference_quantile": run_args.scorer_reference_quantile,
        },
    }.get(args.reweighting, {})

    # Every model now, under the same settings (with a ZeRO-3 config all are built under zero.Init): the
    # same seed gives the same initialisation. Built after the first Trainer, a later run's model would
    # start from another draw (reset_trainer_state turns zero.Init off).
    learned_model = build_model(model_args, tokenizer)
    proxy = run_args.proxy_steps > 0 and not args.resume_from_checkpoint  # a checkpoint holds the weighting
    proxy_model = build_model(model_args, tokenizer) if proxy else None
    baseline_models = {name: build_model(model_args, tokenizer) for name in baselines}
    results: dict = {"train_on_meta": run_args.train_on_meta}
    for name, model in baseline_models.items():
        uniform = UniformTrainer(
            model=model,
            args=baseline_arguments(args, name),
            train_dataset=tokenized[name],
            eval_dataset=tokenized.get("validation"),
            data_collator=collate,
        )
        t0 = time.perf_counter()
        uniform.train()
        results[f"seconds_{name}"] = time.perf_counter() - t0
        if "heldout" in tokenized:
            results[f"heldout_loss_{name}"] = heldout_loss(uniform.model, tokenized["heldout"], collate)
        reset_trainer_state()  # a second Trainer in this process
        del uniform, model
    baseline_models.clear()

    def learned_trainer(model, arguments):
        return ReweightingTrainer(
            model=model,
            args=arguments,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized.get("validation"),
            meta_dataset=tokenized["meta"],
            data_collator=collate,
            reweighter_kwargs=reweighter_kwargs,
            example_names=example_names,
            source_names=names,
        )

    t0 = time.perf_counter()
    warm = None
    if proxy:  # the weighting learned on a short run from the same start (see --proxy_steps)
        proxy_trainer = learned_trainer(proxy_model, proxy_arguments(args, run_args.proxy_steps))
        proxy_trainer.train()
        warm = {k: v.detach().clone() for k, v in proxy_trainer.reweighter.state_dict().items()}
        results["seconds_proxy"] = time.perf_counter() - t0
        reset_trainer_state()
        del proxy_trainer, proxy_model
    trainer = learned_trainer(learned_model, args)
    if warm is not None:
        trainer.reweighter.load_state_dict(warm)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results["seconds_learned"] = time.perf_counter() - t0  # with the proxy run's
    weights = trainer.export_weights()  # the final weighting's weight of every training example, mean 1
    if "heldout" in tokenized:
        results["heldout_loss_learned"] = heldout_loss(trainer.model, tokenized["heldout"], collate)
    report = make_report(results, weights, learned_train, data, names, trainer, start)
    # the fine-tuned model, its weight exports and a model card that names the baselines' held-out losses
    trainer.model_card_metrics = {k: v for k, v in report.items() if k.startswith("heldout_loss_")}
    trainer.save_model()
    if is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "report.json").write_text(json.dumps(report, indent=1))
        plot(report, trainer, weights, learned_train, data, Path(args.output_dir) / "weights.png")
        print_report(report)
    return report


def main(
    argv: Sequence[str] | None = None, extra_arguments: Sequence[type] = (), defaults: Mapping[str, Any] | None = None
) -> dict:
    """Parse ``argv`` (default ``sys.argv[1:]``; see `parse_arguments`) and `run`; return the report.

    Args:
        extra_arguments: a script's own dataclasses, parsed beside the others (their fields are flags and
            config keys too) and otherwise unused here.
        defaults: a script's own defaults for any field, below ``--config`` and the flags.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # The process group first (a one-process group without a launcher): the Trainer's DeepSpeed then uses it
    # instead of looking for MPI.
    ensure_distributed()
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    model_args, data, run_args, args, *_ = parse_arguments(argv, extra_arguments, defaults)
    return run(model_args, data, run_args, args)


def console_main() -> None:
    """The ``scalemlo-reweight`` console script: `main`, with a bad config file reported in one line."""
    try:
        main()
    except ConfigError as error:
        print(f"scalemlo-reweight: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
