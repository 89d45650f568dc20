"""Fine-tune a causal LM while an upper level learns which training data to trust (the main job).

    python examples/llm_reweighting/run_reweighting.py            # the default run: no arguments, no downloads
    python examples/llm_reweighting/run_reweighting.py --model_name_or_path gpt2 --train_file train.jsonl \\
        --meta_file meta.jsonl --validation_file val.jsonl --output_dir out --deepspeed configs/ds/trainer_zero2.json
    deepspeed --num_gpus 2 examples/llm_reweighting/run_reweighting.py args.json    # or torchrun --nproc_per_node 2

A thin wrapper over the ``scalemlo-reweight`` command (``scalemlo.cli.reweight``: its arguments, flags or
``--config run.yaml``, data from local files or ``--dataset_name``, the runs and the report); what it adds
is the default run and its own flags (``--corpus_seed``, ``--pretrain_steps``, ``--pretrain_cache``).

Without ``--train_file``, ``--dataset_name`` or a config file it runs the default: a corpus built from the
text shipped with Python (``corpus.py``: five sources, half of three sources' documents corrupted, 30 % of
all), a small GPT-2-style model pre-trained briefly on other text shipped with Python (``pretrain.py``: the
standard library's docstrings, cached), fine-tuned with learned weighting and with each uniform baseline on
the same budget, initialisation and data order, under ``config.yaml`` (flags given override it); the held-out
clean loss of each, the ROC-AUC of the learned weights separating corrupted from clean documents, the mean
weight per source, ``report.json`` and ``weights.png`` in the output directory.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from transformers import AutoTokenizer  # noqa: E402

from scalemlo.cli import reweight  # noqa: E402
from scalemlo.distributed import ensure_distributed, is_main_process  # noqa: E402

VISIBLE_KINDS = ("char_noise", "other_script", "near_duplicate")  # weight_auc_visible: the kinds the acceptance names
DEFAULTS = {"visible_corruptions": ",".join(VISIBLE_KINDS)}


@dataclass
class DefaultRunArguments:
    corpus_seed: int = field(default=0, metadata={"help": "Default run: seed of the built corpus"})
    pretrain_steps: int = field(
        default=0,
        metadata={
            "help": "Default run: fine-tune a model pre-trained this many steps on other clean text "
            "(pretrain.py, seeded by --model_seed, cached); 0: train a model built from a config, from scratch"
        },
    )
    pretrain_cache: str = field(
        default="runs/pretrained", metadata={"help": "Default run: where pre-trained starting models are cached"}
    )


def default_flags() -> dict:
    """The default run's flags: ``config.yaml`` beside this script (``report_to`` is always none)."""
    import yaml

    return yaml.safe_load((HERE / "config.yaml").read_text())


def parse(argv: list[str]):
    """``(ModelArguments, DataArguments, RunArguments, ReweightingArguments, DefaultRunArguments)``."""
    return reweight.parse_arguments(argv, (DefaultRunArguments,), DEFAULTS)


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
    there); ``--config config.yaml`` and the flags that use them, before ``argv``'s own."""
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
    argv = ["--config", str(HERE / "config.yaml"), f"--output_dir={out}", "--report_to", "none"]
    argv += [
        f"--train_file={data / 'train.jsonl'}",
        f"--meta_file={data / 'meta.jsonl'}",
        f"--validation_file={data / 'validation.jsonl'}",
        f"--heldout_file={data / 'heldout.jsonl'}",
    ]
    if start is not None:
        argv += [f"--model_name_or_path={start}", f"--tokenizer_name={start}"]
    else:
        argv += [f"--config_name={data / 'model_config'}", f"--tokenizer_name={data / 'tokenizer'}"]
    return argv


def is_default_run(argv: list[str]) -> bool:
    """No data given: no ``--train_file``, ``--dataset_name`` or config file (other flags override the default's);
    ``--help`` builds nothing."""
    given = any(
        a.startswith(("--train_file", "--dataset_name", "--config=")) or a in ("--config", "-h", "--help") for a in argv
    )
    return not given and not (argv and argv[0].endswith((".json", ".yaml", ".yml")))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The process group first (a one-process group without a launcher): building the default corpus on rank 0
    # waits at a barrier, and the Trainer's DeepSpeed then uses the group instead of looking for MPI.
    ensure_distributed()
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    if is_default_run(argv):
        argv = default_run_argv(argv) + argv
    return reweight.main(argv, (DefaultRunArguments,), DEFAULTS)


if __name__ == "__main__":
    main()
