"""``scalemlo-reweight``: --help lists every field, --config with flags over it, unknown keys refused before
anything loads, and a tiny run on a user's own JSONL data shaped unlike the example's."""

import dataclasses
import importlib.metadata
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from scalemlo.cli.reweight import ConfigError, DataArguments, ModelArguments, RunArguments, load_split, main
from scalemlo.cli.reweight.arguments import parse_arguments
from scalemlo.hf import ReweightingArguments

WORDS = (
    "the model reads a page of text and learns which words follow which others in the data it is given; "
    "clean sentences carry the signal while noise carries none"
).split()
DOMAINS = ("books", "code", "web")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def fresh_trainer_state():
    yield
    from scalemlo.hf import reset_trainer_state

    reset_trainer_state()


def command() -> list[str]:
    """The installed console script, else the module it runs."""
    script = shutil.which("scalemlo-reweight")
    return [script] if script else [sys.executable, "-m", "scalemlo.cli.reweight"]


def run_command(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("ACCELERATE_")}
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command(), *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def noise(rng: random.Random, chars: int) -> str:
    return "".join(rng.choice("qxzjvk#@%&*") for _ in range(chars))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """A user's own data: text in ``body``, a string ``doc`` id, a string ``domain`` source, an extra ``title``
    text column and a boolean ``noisy`` label (the training set); lengths from 2 to 40 words, so every batch
    pads. A tokenizer (byte-level BPE with its own pad token) and a tiny GPT-2 config in directories."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("user")
    rng = random.Random(0)
    train = []
    for i in range(48):
        noisy = i % 3 == 0
        text = noise(rng, rng.randint(5, 120)) if noisy else sentence(rng, rng.randint(2, 40))
        train.append(
            {
                "doc": f"doc-{i:03d}",
                "title": sentence(rng, 3),
                "body": text,
                "domain": "web" if noisy else DOMAINS[(i // 3) % 3],
                "noisy": noisy,
            }
        )
    meta = [{"title": "m", "body": sentence(rng, rng.randint(3, 30)), "domain": DOMAINS[i % 2]} for i in range(12)]
    heldout = [{"body": sentence(rng, rng.randint(2, 40))} for _ in range(10)]
    files = {
        name: write_jsonl(root / f"{name}.jsonl", rows)
        for name, rows in (("train", train), ("meta", meta), ("heldout", heldout))
    }

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>", "<pad>"], initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator([row["body"] for row in train + meta + heldout], trainer=bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", model_max_length=64)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=1,
    )
    config.save_pretrained(str(root / "model_config"))
    return {"root": root, "rows": {"train": train, "meta": meta, "heldout": heldout}, **files}


def write_config(path, user_data, **fields) -> str:
    import yaml

    config = {
        "output_dir": str(path.parent / "out"),
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "config_name": str(user_data["root"] / "model_config"),
        "tokenizer_name": str(user_data["root"] / "tokenizer"),
        "train_file": user_data["train"],
        "meta_file": user_data["meta"],
        "heldout_file": user_data["heldout"],
        "text_column": "body",
        "id_column": "doc",
        "source_column": "domain",
        "corrupted_column": "noisy",
        "baselines": "uniform",
        "reweighting": "source",
        "hypergradient_method": "finite_difference",
        "max_steps": 5,
        "per_device_train_batch_size": 4,
        "per_device_meta_batch_size": 4,
        "learning_rate": "1e-3",
        "meta_learning_rate": 0.1,
        "logging_steps": 1,
        **fields,
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_help_lists_every_field():
    fields = [
        f.name
        for cls in (ModelArguments, DataArguments, RunArguments, ReweightingArguments)
        for f in dataclasses.fields(cls)
        if f.init
    ]
    try:  # installed (pip install -e .): the console script runs this package's entry
        (entry,) = importlib.metadata.entry_points(group="console_scripts", name="scalemlo-reweight")
        assert entry.value == "scalemlo.cli.reweight:console_main"
    except (ValueError, importlib.metadata.PackageNotFoundError):
        pass
    result = run_command("--help")
    assert result.returncode == 0, result.stderr[-3000:]
    listed = {word.split("=")[0].rstrip(",") for word in result.stdout.split() if word.startswith("--")}
    missing = [name for name in fields if f"--{name}" not in listed]
    assert not missing and "--config" in listed
    assert {"--selection_floor", "--train_file", "--text_column", "--baselines", "--dataset_name"} <= listed


def test_config_values_reach_the_arguments_and_flags_override_them(user_data, tmp_path):
    config = write_config(
        tmp_path / "run.yaml",
        user_data,
        selection_pool=2,
        selection_floor=0.25,
        warmup_steps=3,
        lora_target_modules="all-linear",
        train_on_meta=True,
    )
    model, data, run, args = parse_arguments(["--config", config, "--max_steps", "2", "--text_column=title"])
    assert (args.max_steps, data.text_column) == (2, "title")  # the flags, over the file's 5 and body
    assert (args.selection_pool, args.selection_floor, args.learning_rate) == (2, 0.25, 1e-3)  # "1e-3": a float
    assert args.warmup_steps == 3.0 and isinstance(args.warmup_steps, float)  # as --warmup_steps 3 gives it
    assert args.lora_target_modules == "all-linear" and run.train_on_meta is True
    assert (model.config_name, data.source_column, run.baselines) == (
        str(user_data["root"] / "model_config"),
        "domain",
        "uniform",
    )
    # the one-file form of a Trainer script (a .yaml/.json first argument) is --config, flags still over it
    assert parse_arguments([config, "--seed=7"])[3].seed == 7


def test_a_bad_config_is_refused_before_anything_loads(user_data, tmp_path):
    config = write_config(tmp_path / "run.yaml", user_data, learning_rat=0.1, warmup_step=2)
    with pytest.raises(ConfigError, match="unknown keys 'learning_rat', 'warmup_step'.*did you mean learning_rate"):
        main(["--config", config])
    assert not (tmp_path / "out").exists()
    result = run_command("--config", config, cwd=tmp_path)  # the command: one line on stderr, exit status 2
    assert result.returncode == 2 and "scalemlo-reweight: error: --config" in result.stderr
    assert "'learning_rat'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "list.yaml").write_text("- max_steps\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_arguments(["--config", str(tmp_path / "list.yaml")])
    with pytest.raises(ConfigError, match="unknown arguments \\['--max_stepz'"):
        parse_arguments(["--config", write_config(tmp_path / "good.yaml", user_data), "--max_stepz", "2"])
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        parse_arguments(["--config", str(tmp_path / "missing.yaml")])


def test_dataset_name_loads_its_splits_through_load_dataset(user_data, tmp_path):
    data_dir = tmp_path / "dataset"  # a local dataset directory: its files named by split
    data_dir.mkdir()
    write_jsonl(data_dir / "train.jsonl", user_data["rows"]["train"])
    write_jsonl(data_dir / "test.jsonl", user_data["rows"]["meta"])
    data = DataArguments(dataset_name=str(data_dir), meta_split="test", heldout_split="test[:5]", text_column="body")
    train, meta, heldout = (load_split(data, what) for what in ("train", "meta", "heldout"))
    assert list(train["doc"]) == [r["doc"] for r in user_data["rows"]["train"]]
    assert list(meta["body"]) == [r["body"] for r in user_data["rows"]["meta"]] and heldout.num_rows == 5
    assert load_split(data, "validation", required=False) is None  # no --validation_split: none
    with pytest.raises(ValueError, match="no split 'meta' for the meta set.*--meta_split"):
        load_split(dataclasses.replace(data, meta_split="meta"), "meta")
    # a --*_file wins for its set
    assert load_split(dataclasses.replace(data, meta_file=user_data["heldout"]), "meta").num_rows == 10


@pytest.fixture(scope="module")
def user_run(user_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    config = write_config(work / "run.yaml", user_data)
    report = main(["--config", config, "--max_steps", "2"])  # the flag over the file's max_steps: 5
    return work / "out", report


def test_a_run_on_a_users_own_data(user_data, user_run):
    out, report = user_run
    assert report["steps"] == 2 and report["train_on_meta"] is False
    assert json.loads((out / "report.json").read_text()) == report
    assert {"heldout_loss_uniform", "heldout_loss_learned", "weight_auc", "mean_weight_clean"} <= set(report)
    assert "heldout_loss_clean_only" not in report and "weight_auc_visible" not in report  # baselines: uniform
    for name in ("uniform", "learned"):
        assert report[f"heldout_perplexity_{name}"] == pytest.approx(math.exp(report[f"heldout_loss_{name}"]))
    # the weights: named by the string ids, one mean per domain as the training rows give them
    weights = json.loads((out / "weights.json").read_text())["examples"]
    train = user_data["rows"]["train"]
    assert list(weights) == [row["doc"] for row in train]
    for domain in DOMAINS:
        values = [weights[r["doc"]] for r in train if r["domain"] == domain]
        mean = sum(values) / len(values)
        assert report["source_weights"][domain] == pytest.approx(mean, rel=1e-6)
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score([not r["noisy"] for r in train], [weights[r["doc"]] for r in train])
    assert report["weight_auc"] == pytest.approx(expected, abs=1e-6)


def test_the_padded_heldout_loss_is_each_text_alone(user_data, user_run):
    """The report's held-out loss (batches of 32, right-padded) equals the saved model's loss on each text alone,
    through the model's own loss, token-weighted: padding takes no part."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = user_run
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(user_data["root"] / "tokenizer"))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in user_data["rows"]["heldout"]:
            ids = tokenizer(row["body"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([ids])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    lengths = {len(r["body"].split()) for r in user_data["rows"]["heldout"]}
    assert len(lengths) > 1  # texts of different lengths: the batch pads
    assert report["heldout_loss_learned"] == pytest.approx(total / tokens, rel=1e-5)


def test_a_proxy_run_hands_its_weighting_to_the_learned_run(user_data, tmp_path, monkeypatch):
    """--proxy_steps K: a learned run of K steps from the same starting model, whose weighting the learned run
    starts from (and goes on learning); the proxy's time counts in the learned run's. The proxy learns the
    weighting on every step it has, whatever --meta_stop_ratio says (that share is the learned run's)."""
    from scalemlo.hf import trainer as hf_trainer

    def state(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    starts, ends, ratios = [], [], []
    start, train = hf_trainer.ReweightingTrainer._start_mlo, hf_trainer.ReweightingTrainer.train

    def recording_start(self):
        starts.append((self.args.max_steps, state(self.reweighter), state(self.model)))
        ratios.append(self.args.meta_stop_ratio)
        start(self)

    def recording_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        ends.append(state(self.reweighter))
        return result

    monkeypatch.setattr(hf_trainer.ReweightingTrainer, "_start_mlo", recording_start)
    monkeypatch.setattr(hf_trainer.ReweightingTrainer, "train", recording_train)
    config = write_config(
        tmp_path / "run.yaml",
        user_data,
        reweighting="scorer",
        hypergradient_method="sama",
        baselines="none",
        proxy_steps=3,
        max_steps=4,
        meta_stop_ratio=0.75,
    )
    report = main(["--config", config])
    assert ratios == [1.0, 0.75]
    (proxy_steps, proxy_start, proxy_model), (steps, learned_start, learned_model) = starts
    assert (proxy_steps, steps, report["steps"]) == (3, 4, 4)
    assert all(torch.equal(proxy_model[k], learned_model[k]) for k in proxy_model)  # the same starting model
    assert all(torch.equal(ends[0][k], learned_start[k]) for k in ends[0])  # the proxy's weighting, handed on
    assert any(not torch.equal(proxy_start[k], learned_start[k]) for k in proxy_start)  # which the proxy moved
    assert any(not torch.equal(ends[1][k], learned_start[k]) for k in ends[1])  # and which goes on learning
    assert 0 < report["seconds_proxy"] < report["seconds_learned"]


def test_a_negative_proxy_run_is_refused_before_anything_trains(user_data, tmp_path):
    config = write_config(tmp_path / "run.yaml", user_data, proxy_steps=-1)
    with pytest.raises(ValueError, match="--proxy_steps must be >= 0"):
        main(["--config", config])
    assert not (tmp_path / "out").exists()
