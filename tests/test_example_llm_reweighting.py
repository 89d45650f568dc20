"""The LLM reweighting script: a short default run end to end, and its refusals of bad input."""

import json
import math

import examples_helper
import pytest
import torch

SCRIPT = examples_helper.EXAMPLES / "llm_reweighting" / "run_reweighting.py"


def load():
    import sys

    sys.path.insert(0, str(SCRIPT.parent))  # the script imports corpus.py beside it
    return examples_helper.load_file(SCRIPT, "run_reweighting")


@pytest.fixture(autouse=True)
def fresh_trainer_state():
    yield
    from scalemlo.hf import reset_trainer_state

    reset_trainer_state()


@pytest.fixture(scope="module")
def script():
    return load()


@pytest.fixture(scope="module")
def short_run(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # the default run's pre-trained start, shortened: 4 steps, cached beside the run
    report = script.main(
        [
            f"--output_dir={out}",
            "--max_steps=6",
            "--meta_warmup_steps=2",
            "--logging_steps=2",
            "--pretrain_steps=4",
            f"--pretrain_cache={out / 'pretrained'}",
            "--proxy_steps=3",
        ]
    )
    return out, report


def test_the_default_run_reports_what_it_promises(short_run):
    out, report = short_run
    for key in (
        "heldout_loss_uniform",
        "heldout_loss_learned",
        "weight_auc",
        "source_weights",
        "steps",
        "seconds",
        "heldout_loss_uniform_plus_meta",
        "heldout_loss_clean_only",
        "weight_auc_visible",
    ):
        assert key in report
    # the default learned run trains on the meta set too: its uniform baseline is uniform_plus_meta, and
    # clean_only is the clean part of the same data
    assert report["train_on_meta"] is True
    base, clean, learned = (report[f"heldout_loss_{k}"] for k in ("uniform_plus_meta", "clean_only", "learned"))
    assert report["oracle_gap_recovered"] == pytest.approx((base - learned) / (base - clean))
    for name in ("uniform", "uniform_plus_meta", "clean_only", "learned"):  # each run trained, each its own loss
        assert report[f"seconds_{name}"] > 0 and report[f"heldout_perplexity_{name}"] == pytest.approx(
            math.exp(report[f"heldout_loss_{name}"])
        )
    assert len({report[f"heldout_loss_{k}"] for k in ("uniform", "uniform_plus_meta", "clean_only")}) == 3
    assert report["steps"] == 6 and 0.0 <= report["weight_auc"] <= 1.0
    assert 0 < report["seconds_proxy"] < report["seconds_learned"]  # the default's proxy run, counted in the learned
    assert set(report["source_weights"]) == {"builtin_types", "data_model", "expressions", "library", "statements"}
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["weight_auc_by_corruption"]) == {"char_noise", "near_duplicate", "other_script", "shuffled"}
    versions = report["versions"]  # what the numbers depend on
    assert versions["transformers"] and versions["python"] and versions["cpu"]
    assert (out / "weights.png").stat().st_size > 1000
    card = (out / "README.md").read_text()  # the saved model's card names every run's held-out loss
    assert (out / "config.json").is_file() and all(f"heldout_loss_{k}" in card for k in ("uniform", "learned"))
    weights = json.loads((out / "weights.json").read_text())
    assert len(weights["examples"]) > 0 and set(weights["sources"]) == set(report["source_weights"])


def test_the_reported_aucs_are_those_of_the_exported_weights(short_run):
    """Each AUC of the report, recomputed from example_weights.csv and the corpus's labels (the meta rows
    the learned run trained on are clean)."""
    import csv

    from sklearn.metrics import roc_auc_score

    out, report = short_run
    kind = {}
    for line in (out / "corpus" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        kind[row["id"]] = row["corruption"] or "clean"
    with open(out / "example_weights.csv") as f:
        weights = {row["id"]: float(row["weight"]) for row in csv.DictReader(f)}
    kinds = [kind.get(name, "clean" if name.startswith("meta/") else None) for name in weights]
    assert None not in kinds and kinds.count("clean") > 100
    values = list(weights.values())

    def auc(chosen: set[str]) -> float:
        rows = [(k == "clean", v) for k, v in zip(kinds, values) if k == "clean" or k in chosen]
        return roc_auc_score([c for c, _ in rows], [v for _, v in rows])

    every = set(kinds) - {"clean"}
    assert report["weight_auc"] == pytest.approx(auc(every), abs=1e-6)
    assert report["weight_auc_visible"] == pytest.approx(auc(every - {"shuffled"}), abs=1e-6)
    for name, value in report["weight_auc_by_corruption"].items():
        assert value == pytest.approx(auc({name}), abs=1e-6)


def test_the_signal_diagnosis_runs_on_the_default_corpus(short_run):
    out, _ = short_run
    module = examples_helper.load_file(SCRIPT.parent / "diagnose_signal.py", "diagnose_signal")
    (row,) = module.main(
        [
            "--steps=2",
            "--at",
            "2",
            f"--work_dir={out}",
            f"--out={out / 'signal.json'}",
            "--pretrain_steps=4",
            f"--pretrain_cache={out / 'pretrained'}",
        ]
    )
    kinds = {"all", "char_noise", "near_duplicate", "other_script", "shuffled"}
    for signal in ("dot", "cos", "pdot", "votes_pdot", "neg_loss"):
        assert set(row[signal]) == kinds and all(0.0 <= v <= 1.0 for v in row[signal].values())
    assert json.loads((out / "signal.json").read_text())["rows"] == [row]


def test_fixed_weights_choose_every_batch(short_run, tmp_path, monkeypatch):
    """--truth 0: every batch is chosen by the ground truth's weights, the visible kinds at 0 (never chosen)."""
    from scalemlo.hf import selection

    out, _ = short_run
    module = examples_helper.load_file(SCRIPT.parent / "fixed_weights.py", "fixed_weights")
    pools = []
    choose = selection.Selector.choose

    def recording(self, raw, ids, size, generator):
        chosen = choose(self, raw, ids, size, generator)
        pools.append((raw.clone(), torch.as_tensor(ids)[chosen].tolist()))
        return chosen

    monkeypatch.setattr(selection.Selector, "choose", recording)
    cache = f"--pretrain_cache={out / 'pretrained'}"
    module.main(
        [
            f"--output_dir={tmp_path}",
            "--truth",
            "0",
            "--max_steps=3",
            "--meta_warmup_steps=2",
            "--pretrain_steps=4",
            cache,
            "--baselines",
            "none",
            "--proxy_steps=0",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "corpus" / "train.jsonl").read_text().splitlines()]
    visible = {i for i, row in enumerate(rows) if row["corruption"] in module.VISIBLE}
    assert len(pools) == 3 and all(set(raw.tolist()) <= {0.0, 1.0} for raw, _ in pools)
    assert all(not visible & set(chosen) for _, chosen in pools)
    with pytest.raises(ValueError, match="give one of --truth"):
        module.main([f"--output_dir={tmp_path}"])


def test_dropping_kinds_trains_the_baseline_without_them(short_run, tmp_path):
    out, _ = short_run
    module = examples_helper.load_file(SCRIPT.parent / "drop_kinds.py", "drop_kinds")
    cache = f"--pretrain_cache={out / 'pretrained'}"
    report = module.main(
        [
            f"--output_dir={tmp_path}",
            "--max_steps=2",
            "--meta_warmup_steps=2",
            "--kinds",
            "char_noise,other_script",
            "--pretrain_steps=4",
            cache,
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "corpus" / "train.jsonl").read_text().splitlines()]
    kept = [
        json.loads(line)
        for line in (tmp_path / "corpus" / "train_without_char_noise_other_script.jsonl").read_text().splitlines()
    ]
    assert kept == [r for r in rows if r["corruption"] not in ("char_noise", "other_script")] and len(kept) < len(rows)
    assert "heldout_loss_uniform_plus_meta" in report and "heldout_loss_uniform" not in report
    with pytest.raises(ValueError, match="--kinds: unknown \\['typos'\\]"):
        module.main([f"--output_dir={tmp_path}", "--kinds=typos"])


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "case, words",
    [
        ("no meta", "no meta: pass --meta_file"),
        ("empty train", "is empty: it needs at least one example"),
        ("no text column", "has no 'text' column"),
        ("meta source not in train", "the meta set has sources the training set has not: \\['web'\\]"),
        ("source weights without sources", "--reweighting source needs a 'source' column"),
        ("too long, refused", "texts are longer than 8 tokens"),
        ("resume from a non-checkpoint", "is not a complete checkpoint of a ReweightingTrainer run"),
    ],
)
def test_bad_input_is_refused_before_training(script, short_run, tmp_path, case, words):
    corpus = short_run[0] / "corpus"
    good = {"train": str(corpus / "train.jsonl"), "meta": str(corpus / "meta.jsonl")}
    flags = {
        "--output_dir": str(tmp_path / "out"),
        "--tokenizer_name": str(corpus / "tokenizer"),
        "--config_name": str(corpus / "model_config"),
        "--max_steps": "2",
    }
    text = [{"text": "a b c d e f g h i j k l m n o p", "source": "statements"}]
    if case == "no meta":
        flags["--train_file"] = good["train"]
    else:
        flags["--train_file"], flags["--meta_file"] = good["train"], good["meta"]
    if case == "empty train":
        (tmp_path / "empty.jsonl").write_text("")
        flags["--train_file"] = str(tmp_path / "empty.jsonl")
    if case == "no text column":
        flags["--meta_file"] = write(tmp_path / "m.jsonl", [{"body": "a b c"}])
    if case == "meta source not in train":
        flags["--meta_file"] = write(tmp_path / "m.jsonl", [{"text": "a b c", "source": "web"}])
    if case == "source weights without sources":
        flags["--train_file"] = write(tmp_path / "t.jsonl", [{"text": "a b c"}])
        flags["--reweighting"] = "source"
    if case == "too long, refused":
        flags["--meta_file"] = write(tmp_path / "m.jsonl", text)
        flags.update({"--max_length": "8", "--long_sequences": "refuse"})
    if case == "resume from a non-checkpoint":
        (tmp_path / "nothing").mkdir()
        flags["--resume_from_checkpoint"] = str(tmp_path / "nothing")
    argv = [f"{k}={v}" for k, v in flags.items()] + ["--baseline=False"]
    with pytest.raises(ValueError, match=words):
        script.main(argv)
    assert not (tmp_path / "out" / "report.json").exists()
