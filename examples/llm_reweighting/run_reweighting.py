"""Fine-tune a causal LM while an upper level learns which training data to trust (the main job).

    python examples/llm_reweighting/run_reweighting.py            # the default run: no arguments, no downloads
    python examples/llm_reweighting/run_reweighting.py --model_name_or_path gpt2 --train_file train.jsonl \\
        --meta_file meta.jsonl --validation_file val.jsonl --output_dir out --deepspeed configs/ds/trainer_zero2.json
    deepspeed --num_gpus 2 examples/llm_reweighting/run_reweighting.py args.json    # or torchrun --nproc_per_node 2

Arguments are a Trainer script's (``HfArgumentParser`` over ``ReweightingArguments``,
flags or one JSON/YAML file) plus the data and model ones below. Data come
through ``datasets`` from local files (json, jsonl, csv or text): text in a
``text`` column, an optional ``source`` column, an optional ``id`` column
(else the row index); ``--dataset_name`` when a hub is reachable.

Without arguments it runs the default: a corpus built from the text shipped
with Python (``corpus.py``: five sources, half of three sources' documents
corrupted, 30 % of all), a small GPT-2-style model pre-trained briefly on other
text shipped with Python (``pretrain.py``: the standard library's docstrings,
cached), fine-tuned with learned weighting and with each uniform baseline on
the same budget, initialisation and data order; the held-out clean loss of
each, the ROC-AUC of the learned weights separating corrupted from clean
documents, the mean weight per source, ``report.json`` and ``weights.png`` in
the output directory.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer  # noqa: E402

from scalemlo.backend import scale_fp16_zero0_loss  # noqa: E402
from scalemlo.distributed import ensure_distributed, is_main_process  # noqa: E402
from scalemlo.hf import ReweightingArguments, ReweightingTrainer, reset_trainer_state  # noqa: E402
from scalemlo.hf.losses import per_example_causal_lm_loss  # noqa: E402
from scalemlo.hf.reweighting import source_index  # noqa: E402
from scalemlo.hf.scorer import near_copy_counts  # noqa: E402

log = logging.getLogger("llm_reweighting")
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".text": "text"}


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
    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset with train/meta splits"})
    text_column: str = field(default="text", metadata={"help": "The column holding the text"})
    source_column: str = field(default="source", metadata={"help": "Optional: where each example comes from"})
    id_column: str = field(default="id", metadata={"help": "Optional: an example id (else the row index)"})
    corrupted_column: str = field(default="corrupted", metadata={"help": "Optional ground truth, for the report's AUC"})
    corruption_column: str = field(
        default="corruption", metadata={"help": "Optional kind of corruption (empty if clean), for per-kind AUCs"}
    )


BASELINES = ("uniform", "uniform_plus_meta", "clean_only")
VISIBLE_KINDS = ("char_noise", "other_script", "near_duplicate")  # weight_auc_visible: the kinds the acceptance names


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
        metadata={"help": "--reweighting scorer: the sigmoid's centre, 'meta' (a quantile of the meta set's scores) "
                  "or 'median' (each batch's)"},
    )  # fmt: skip
    scorer_reference_quantile: float = field(
        default=0.1, metadata={"help": "--reweighting scorer, --scorer_centre meta: the quantile of the meta set's "
                               "scores that is the centre"}
    )  # fmt: skip
    corpus_seed: int = field(default=0, metadata={"help": "Default run: seed of the built corpus"})
    pretrain_steps: int = field(
        default=0,
        metadata={"help": "Default run: fine-tune a model pre-trained this many steps on other clean text "
                  "(pretrain.py, seeded by --model_seed, cached); 0: train a model built from a config, from scratch"},
    )  # fmt: skip
    pretrain_cache: str = field(
        default="runs/pretrained", metadata={"help": "Default run: where pre-trained starting models are cached"}
    )

    def baseline_names(self) -> list[str]:
        choice = self.baselines.strip().lower()
        if choice in ("all", "true", "none", "false"):  # true/false: the earlier boolean --baseline flag
            return list(BASELINES) if choice in ("all", "true") else []
        names = [n.strip() for n in self.baselines.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BASELINES))
        if unknown:
            raise ValueError(f"--baselines: unknown {unknown}; use 'all', 'none' or names from {list(BASELINES)}")
        return names


def default_flags() -> dict:
    """The default run's flags: ``config.yaml`` beside this script (``report_to`` is always none)."""
    import yaml

    return yaml.safe_load((HERE / "config.yaml").read_text())


# ---- data ----------------------------------------------------------------------------------------------
def load_split(path: str | None, what: str, data: DataArguments, required: bool = True):
    from datasets import load_dataset

    if path is None:
        if required:
            raise ValueError(f"no {what}: pass --{what}_file (json, jsonl, csv or text) or --dataset_name")
        return None
    suffix = Path(path).suffix
    if suffix not in FORMATS:
        raise ValueError(f"--{what}_file {path}: unknown format {suffix!r}; use one of {sorted(FORMATS)}")
    if not Path(path).is_file():
        raise ValueError(f"--{what}_file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as fh:
        empty = not fh.read(4096).strip()
    if empty or (dataset := load_dataset(FORMATS[suffix], data_files={what: path}, split=what)).num_rows == 0:
        raise ValueError(f"--{what}_file {path} is empty: it needs at least one example")
    if data.text_column not in dataset.column_names:
        raise ValueError(
            f"--{what}_file {path} has no {data.text_column!r} column (columns: {dataset.column_names}); "
            "name the text column with --text_column"
        )
    return dataset


def tokenize(dataset, tokenizer, data: DataArguments, args: ReweightingArguments, sources: dict[str, int] | None,
             near_copies: list[int] | None = None):  # fmt: skip
    """input_ids (+ id = row index, + source index, + the given near_copies counts) with the long-sequence
    policy; the Collator pads them and adds attention_mask / labels."""
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
    from datasets import Dataset

    return Dataset.from_dict(columns)


class Collator:
    """Pads a batch to its longest example (right side): attention 0 and label -100 on the padding."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
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


# ---- training -------------------------------------------------------------------------------------------
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
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_args.config_name)
    torch.manual_seed(model_args.model_seed)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def heldout_loss(model, dataset, collate) -> float:
    """Token-level mean loss of ``model`` on a tokenized set (clean held-out text)."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), 32):
        batch = collate([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, counts = per_example_causal_lm_loss(logits, batch["labels"], batch["attention_mask"])
        total += float((losses * counts).sum())
        tokens += int(counts.sum())
    return total / max(tokens, 1)


# ---- the run --------------------------------------------------------------------------------------------
def parse(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, ReweightingArguments))
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if len(argv) == 1 and Path(argv[0]).suffix in (".json", ".yaml", ".yml"):
        reader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        return reader(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def flag_value(argv: list[str], name: str, default):
    """The last value of ``--name=value`` or ``--name value`` in ``argv`` (as argparse reads it), else ``default``."""
    value = default
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def default_run_argv(argv: list[str]) -> list[str]:
    """Build the default corpus (and tokenizer and model config) under the output directory and, with
    ``pretrain_steps`` > 0, the pre-trained starting model in ``pretrain_cache`` (``pretrain.py``, reused when
    there); the flags that use them, before ``argv``'s own."""
    import corpus
    import pretrain

    flags = default_flags()
    out = Path(flag_value(argv, "output_dir", flags["output_dir"]))
    seed = int(flag_value(argv, "corpus_seed", flags.get("corpus_seed", 0)))
    steps = int(flag_value(argv, "pretrain_steps", flags.get("pretrain_steps", 0)))
    cache = Path(flag_value(argv, "pretrain_cache", flags.get("pretrain_cache", "runs/pretrained")))
    model_seed = int(flag_value(argv, "model_seed", flags.get("model_seed", 0)))
    data, start = out / "corpus", None
    if is_main_process():
        if not corpus.is_built(data, seed):  # absent, or another seed, settings or Python
            corpus.build_corpus(data, seed=seed)
            tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
            corpus.model_config(tokenizer).save_pretrained(str(data / "model_config"))
        if steps > 0:
            start = pretrain.pretrain(cache, model_seed, steps=steps)
    from scalemlo.checkpoint import barrier

    barrier()
    if steps > 0 and start is None:  # another rank: the directory rank 0 built (its name follows the settings)
        start = pretrain.pretrain(cache, model_seed, steps=steps)
    flags["output_dir"] = str(out)
    argv = [f"--{k}={v}" for k, v in flags.items() if k != "report_to"] + ["--report_to", "none"]
    argv += [f"--train_file={data / 'train.jsonl'}", f"--meta_file={data / 'meta.jsonl'}",
             f"--validation_file={data / 'validation.jsonl'}", f"--heldout_file={data / 'heldout.jsonl'}"]  # fmt: skip
    if start is not None:
        argv += [f"--model_name_or_path={start}", f"--tokenizer_name={start}"]
    else:
        argv += [f"--config_name={data / 'model_config'}", f"--tokenizer_name={data / 'tokenizer'}"]
    return argv


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    # The process group first (a one-process group without a launcher): the Trainer's DeepSpeed then uses it
    # instead of looking for MPI.
    ensure_distributed()
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    if not any(a.startswith(("--train_file", "--dataset_name")) for a in argv) and not (
        len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))
    ):  # the default run (other flags given override its defaults)
        argv = default_run_argv(argv) + argv
    model_args, data, run, args = parse(argv)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    collate = Collator(tokenizer.pad_token_id)
    train = load_split(data.train_file, "train", data)
    meta = load_split(data.meta_file, "meta", data)
    heldout = load_split(data.heldout_file, "heldout", data, required=False)
    validation = load_split(data.validation_file, "validation", data, required=False)
    per_source = data.source_column in train.column_names
    if args.reweighting == "source" and not per_source:
        raise ValueError(f"--reweighting source needs a {data.source_column!r} column in the training set")
    if per_source and data.source_column in meta.column_names:
        unknown = set(list(meta[data.source_column])) - set(list(train[data.source_column]))
        if unknown:
            raise ValueError(f"the meta set has sources the training set has not: {sorted(unknown)}")
    baselines = run.baseline_names()
    labelled = data.corrupted_column in train.column_names
    if "clean_only" in baselines and not labelled:
        if run.baselines != "all":
            raise ValueError(f"--baselines clean_only needs ground truth: a {data.corrupted_column!r} column")
        baselines.remove("clean_only")
    sources = source_index(list(train[data.source_column])) if per_source else None
    names = sorted(sources, key=sources.get) if sources else None
    # the training sets of the runs: the learned run's (with the meta set under --train_on_meta) and the baselines'
    # (with --train_on_meta the learned run's data are uniform_plus_meta's, and clean_only keeps the meta set)
    train_sets = {"train": train, "uniform": train, "uniform_plus_meta": with_meta(train, meta, data)}
    if run.train_on_meta:
        train_sets["train"] = train_sets["uniform_plus_meta"]
    if labelled:
        train_sets["clean_only"] = train_sets["train"].filter(lambda row: not row[data.corrupted_column])
    learned_train = train_sets["train"]
    example_names = (
        [str(x) for x in list(learned_train[data.id_column])] if data.id_column in learned_train.column_names else None
    )
    scorer_features = [f.strip() for f in run.scorer_features.split(",") if f.strip()]
    counts = {}
    if args.reweighting == "scorer" and "near_copies" in scorer_features:  # the learned run's data and meta set
        texts = list(learned_train[data.text_column])  # with --train_on_meta the meta rows are its last
        found = near_copy_counts(texts if run.train_on_meta else texts + list(meta[data.text_column]))
        counts = {"train": found[: len(learned_train)], "meta": found[len(found) - len(meta) :]}
    tokenized = {k: tokenize(ds, tokenizer, data, args, sources if k in train_sets else None, counts.get(k))
                 for k, ds in {**train_sets, "meta": meta, "validation": validation, "heldout": heldout}.items()
                 if ds is not None and (k == "train" or k not in train_sets or k in baselines)}  # fmt: skip
    reweighter_kwargs = {
        "source": {"sources": names},
        "example": {"n_examples": len(learned_train)},
        "meta_weight_net": {"hidden_size": args.reweighting_hidden_size},
        "scorer": {
            "features": scorer_features,
            "buckets": run.scorer_buckets,
            "hidden_size": run.scorer_hidden_size,
            "centre": run.scorer_centre,
            "reference_quantile": run.scorer_reference_quantile,
        },
    }.get(args.reweighting, {})

    # Every model now, under the same settings (with a ZeRO-3 config all are built under zero.Init): the
    # same seed gives the same initialisation. Built after the first Trainer, a later run's model would
    # start from another draw (reset_trainer_state turns zero.Init off).
    learned_model = build_model(model_args, tokenizer)
    baseline_models = {name: build_model(model_args, tokenizer) for name in baselines}
    results: dict = {"train_on_meta": run.train_on_meta}
    for name, model in baseline_models.items():
        uniform = UniformTrainer(model=model, args=baseline_arguments(args, name), train_dataset=tokenized[name],
                                 eval_dataset=tokenized.get("validation"), data_collator=collate)  # fmt: skip
        t0 = time.perf_counter()
        uniform.train()
        results[f"seconds_{name}"] = time.perf_counter() - t0
        if "heldout" in tokenized:
            results[f"heldout_loss_{name}"] = heldout_loss(uniform.model, tokenized["heldout"], collate)
        reset_trainer_state()  # a second Trainer in this process
        del uniform, model
    baseline_models.clear()
    trainer = ReweightingTrainer(
        model=learned_model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized.get("validation"),
        meta_dataset=tokenized["meta"], data_collator=collate, reweighter_kwargs=reweighter_kwargs,
        example_names=example_names, source_names=names,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results["seconds_learned"] = time.perf_counter() - t0
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


def baseline_arguments(args: ReweightingArguments, name: str) -> ReweightingArguments:
    """The same arguments (budget, DeepSpeed config, seed), their own output directory."""
    import dataclasses

    return dataclasses.replace(args, output_dir=str(Path(args.output_dir) / name))


def make_report(results, weights, train, data: DataArguments, names, trainer, start) -> dict:
    report = {"steps": trainer.state.global_step, "seconds": time.perf_counter() - start, **results}
    for key in [k for k in report if k.startswith("heldout_loss_")]:
        report[key.replace("loss", "perplexity")] = math.exp(report[key])
    # the share of what removing the corrupted documents is worth that the learned weights recover, against
    # the uniform run on the learned run's own data (the training set, with the meta set under --train_on_meta)
    base = "heldout_loss_uniform_plus_meta" if report["train_on_meta"] else "heldout_loss_uniform"
    if {base, "heldout_loss_clean_only", "heldout_loss_learned"} <= set(report):
        headroom = report[base] - report["heldout_loss_clean_only"]
        gained = report[base] - report["heldout_loss_learned"]
        report["oracle_gap_recovered"] = gained / headroom if headroom > 0 else float("nan")
    if data.corrupted_column in train.column_names:
        from sklearn.metrics import roc_auc_score

        corrupted = torch.tensor([bool(x) for x in list(train[data.corrupted_column])])
        if corrupted.any() and not corrupted.all():
            report["weight_auc"] = float(roc_auc_score((~corrupted).numpy(), weights.numpy()))
            if data.corruption_column in train.column_names:
                # the kinds a model can tell from clean text at this budget (shuffled words: not, see README)
                kinds = list(train[data.corruption_column])
                visible = torch.tensor([not bad or k in VISIBLE_KINDS for k, bad in zip(kinds, corrupted.tolist())])
                if bool((corrupted & visible).any()):
                    report["weight_auc_visible"] = float(
                        roc_auc_score((~corrupted[visible]).numpy(), weights[visible].numpy())
                    )
            report["mean_weight_clean"] = float(weights[~corrupted].mean())
            report["mean_weight_corrupted"] = float(weights[corrupted].mean())
            if data.corruption_column in train.column_names:
                kinds = list(train[data.corruption_column])
                report["weight_auc_by_corruption"] = {}
                for kind in sorted({k for k, bad in zip(kinds, corrupted.tolist()) if bad}):
                    chosen = torch.tensor([not bad or k == kind for k, bad in zip(kinds, corrupted.tolist())])
                    report["weight_auc_by_corruption"][kind] = float(
                        roc_auc_score((~corrupted[chosen]).numpy(), weights[chosen].numpy())
                    )
    if names:
        column = list(train[data.source_column])
        report["source_weights"] = {
            n: float(weights[[i for i, s in enumerate(column) if s == n]].mean()) for n in names
        }
    report["versions"] = versions()
    return report


def versions() -> dict:
    """What the numbers depend on beyond the seeds: the Python (its pydoc_data is the corpus), the CPU
    (its float kernels: the same packages gave other digits on a slower machine of this kind) and the
    packages; printed in report.json."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version(), "torch_threads": torch.get_num_threads(), "cpu": cpu_model()}
    for package in ("torch", "transformers", "tokenizers", "datasets", "accelerate", "deepspeed", "scalemlo"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_report(report: dict) -> None:
    lines = [f"{k:>32}: {v:.4f}" if isinstance(v, float) else f"{k:>32}: {v}" for k, v in report.items()
             if not isinstance(v, dict)]  # fmt: skip
    for kind, auc in report.get("weight_auc_by_corruption", {}).items():
        lines.append(f"{'weight auc, ' + kind:>32}: {auc:.3f}")
    for name, w in report.get("source_weights", {}).items():
        lines.append(f"{'weight of ' + name:>32}: {w:.3f}")
    print("\n".join(lines))


def plot(report, trainer, weights, train, data: DataArguments, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (losses, over_time, histogram) = plt.subplots(1, 3, figsize=(15, 4))
    runs = [k[len("heldout_loss_") :] for k in report if k.startswith("heldout_loss_")]
    values = [report[f"heldout_loss_{name}"] for name in runs]
    bars = losses.bar(range(len(runs)), values, color=["C3" if name == "learned" else "C0" for name in runs])
    losses.bar_label(bars, fmt="%.3f", fontsize=7)
    losses.set_xticks(range(len(runs)), [name.replace("_", "\n") for name in runs], fontsize=7)
    if values:
        spread = max(values) - min(values)
        losses.set_ylim(min(values) - max(spread, 0.01), max(values) + 0.5 * max(spread, 0.01))
    gap = report.get("oracle_gap_recovered")
    losses.set(title="held-out loss" + (f" (gap recovered {gap:.2f})" if gap is not None else ""))
    history = [h for h in trainer.state.log_history if any(k.startswith("weight/source/") for k in h)]
    for key in sorted({k for h in history for k in h if k.startswith("weight/source/")}):
        over_time.plot([h["step"] for h in history], [h.get(key, float("nan")) for h in history], label=key[14:])
    over_time.set(title="mean weight per source (training batches)", xlabel="step", ylabel="weight")
    over_time.legend(fontsize=7)
    if data.corrupted_column in train.column_names:
        corrupted = torch.tensor([bool(x) for x in list(train[data.corrupted_column])])
        histogram.hist([weights[~corrupted].numpy(), weights[corrupted].numpy()], bins=40, label=["clean", "corrupted"])
        histogram.legend()
    histogram.set(title=f"final weights (AUC {report.get('weight_auc', float('nan')):.3f})", xlabel="weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
