"""``scalemlo-reweight``: fine-tune a causal LM while an upper level learns which training data to trust.

    scalemlo-reweight --config run.yaml                       # any field below as a YAML key
    scalemlo-reweight --config run.yaml --max_steps 500       # flags override the file
    scalemlo-reweight --model_name_or_path gpt2 --train_file train.jsonl --meta_file meta.jsonl \\
        --heldout_file heldout.jsonl --output_dir out --deepspeed configs/ds/trainer_zero2.json
    torchrun --nproc_per_node 2 -m scalemlo.cli.reweight --config run.yaml   # or deepspeed --num_gpus 2 --module
    python -m scalemlo.cli.reweight --help                    # every field: model, data, run, Trainer, meta level

The model is ``--model_name_or_path`` (``from_pretrained``: a hub id or local directory) or one built from
``--config_name``; the data come through ``datasets`` from local files (json, jsonl, csv or text) or
``--dataset_name`` (``load_dataset``). It trains each uniform baseline (``--baselines``) and the learned run
(``ReweightingTrainer``) on the same budget, initialisation and data order, and writes the fine-tuned model,
its weight exports, ``report.json`` (held-out losses, with ground truth the ROC-AUC of the learned weights
separating corrupted from clean rows, the mean weight per source) and ``weights.png`` to ``--output_dir``.

Modules: ``arguments`` (the dataclasses, ``--config``), ``data`` (loading, tokenizing, batching), ``run``
(the runs, `main`), ``report``.
"""

from scalemlo.cli.reweight.arguments import (
    BASELINES,
    ConfigError,
    DataArguments,
    ModelArguments,
    RunArguments,
    build_parser,
    parse_arguments,
)
from scalemlo.cli.reweight.data import Collator, load_split, tokenize, with_meta
from scalemlo.cli.reweight.report import heldout_loss, make_report, versions
from scalemlo.cli.reweight.run import UniformTrainer, baseline_arguments, build_model, console_main, main, run

__all__ = [
    "BASELINES",
    "Collator",
    "ConfigError",
    "DataArguments",
    "ModelArguments",
    "RunArguments",
    "UniformTrainer",
    "baseline_arguments",
    "build_model",
    "build_parser",
    "console_main",
    "heldout_loss",
    "load_split",
    "main",
    "make_report",
    "parse_arguments",
    "run",
    "tokenize",
    "versions",
    "with_meta",
]
