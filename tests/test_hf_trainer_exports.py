"""Exports that mean one thing: the final weighting model's weight of every training example, mean 1 over the
training set, per-source means on the same scale, complete after a resume; and the weighted dataset on disk.

Before: after a resume ``weights.json`` held only the examples seen since the resume; ``example_weights.csv``
the weight each example last trained with, normalised within its batch; source weights summed to 1 for the
source scheme and averaged 1 for the others. Each check here is against an independent computation from
the weighting model's own parameters (sigmoid of the example logits; the softmax α and the source counts).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from datasets import Dataset, load_from_disk
from hf_toy import rows
from test_hf_trainer import fresh_trainer_state, trainer  # noqa: F401 (fixture)
from test_hf_trainer_data import SOURCES, arguments, model, tokenizer, user_sets
from transformers import DataCollatorForLanguageModeling, TrainerCallback

from scalemlo.hf import ReweightingTrainer

NOISY = [i % 4 == 0 for i in range(64)]  # hf_toy: every 4th training row is noise, source 1


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def read_json(directory) -> dict:
    return json.loads((directory / "weights.json").read_text())


def test_example_weights_after_a_resume_are_every_examples_final_weight(tmp_path):
    """The example scheme, stopped at step 4 of 6 and resumed: the export names all 64 examples (the resumed
    run saw only 16), equals the uninterrupted run's, and is sigmoid(logit) / its mean over the set."""
    kw = {"reweighting": "example", "save_strategy": "steps", "save_steps": 2}
    uninterrupted = trainer(tmp_path / "uninterrupted", **kw)
    uninterrupted.train()
    expected = uninterrupted.export_weights(tmp_path / "uninterrupted_export")
    first = trainer(tmp_path / "run", **kw)
    first.add_callback(StopAt(4))
    first.train()
    resumed = trainer(tmp_path / "run", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert len(resumed.weight_table.weights) == 16  # the last-trained record: only the 2 steps of 8 since the resume
    resumed.export_weights(tmp_path / "export")
    data = read_json(tmp_path / "export")
    assert data == read_json(tmp_path / "uninterrupted_export") and data["scale"] == "mean 1 over the training set"
    raw = torch.sigmoid(resumed.reweighter.logits.detach().double())
    oracle = (raw / raw.mean()).tolist()
    assert list(data["examples"]) == [str(i) for i in range(64)]
    assert list(data["examples"].values()) == pytest.approx(oracle, rel=1e-6)
    assert torch.allclose(expected.double(), torch.tensor(oracle, dtype=torch.float64), rtol=1e-6)
    # no source names given: the integer source column's indices name them (hf_toy: 1 is the noise)
    means = {
        str(int(noisy)): sum(w for w, n in zip(oracle, NOISY) if n == noisy) / NOISY.count(noisy)
        for noisy in (False, True)
    }
    assert data["sources"] == pytest.approx(means) and data["source_examples"] == {"0": 48, "1": 16}
    assert "source_softmax" not in data
    with open(tmp_path / "export" / "example_weights.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 64 and [r["source"] for r in table] == [str(int(n)) for n in NOISY]
    assert [float(r["weight"]) for r in table] == pytest.approx(oracle, rel=1e-6)


def test_source_weights_are_on_the_examples_scale_with_the_softmax_beside_them(tmp_path):
    """Source scheme: example i's weight is n_sources * alpha[s_i] divided by its mean over the set (48
    clean, 16 noisy); a source's weight is its examples' (count-weighted mean 1); alpha under its own name."""
    t = trainer(tmp_path, reweighting="source", max_steps=3)
    t.train()
    weights = t.export_weights(tmp_path / "export", last_trained=True)
    data = read_json(tmp_path / "export")
    alpha = t.reweighter.source_weights()
    mean = (48 * 2 * alpha["clean"] + 16 * 2 * alpha["noisy"]) / 64
    expected = {name: 2 * alpha[name] / mean for name in ("clean", "noisy")}
    assert data["sources"] == pytest.approx(expected, rel=1e-6)
    assert (48 * data["sources"]["clean"] + 16 * data["sources"]["noisy"]) / 64 == pytest.approx(1.0)
    assert data["source_softmax"] == pytest.approx(alpha) and sum(data["source_softmax"].values()) == pytest.approx(1)
    assert weights.tolist() == pytest.approx([expected["noisy" if n else "clean"] for n in NOISY], rel=1e-6)
    with open(tmp_path / "export" / "source_weights.csv") as fh:
        assert list(csv.reader(fh))[0] == ["source", "weight", "examples"]
    # the weight each example last trained with: kept only when asked, under a name that says so
    with open(tmp_path / "export" / "last_trained_weights.csv") as fh:
        last = list(csv.DictReader(fh))
    assert last and set(last[0]) == {"id", "source", "last_trained_weight"} and len(last) <= 64


@pytest.mark.parametrize("mode", ["column", "filter", "resample"])
def test_the_weighted_training_set_is_written_as_a_dataset(tmp_path, mode):
    """User-shaped data (text and a string source column kept in the saved set); --save_weighted_dataset."""
    tok = tokenizer()
    train, meta = user_sets(tok)
    args = arguments(
        tmp_path, "example", save_weighted_dataset=mode, weighted_dataset_threshold=1.0, meta_learning_rate=1.0
    )
    t = ReweightingTrainer(
        model=model(),
        args=args,
        train_dataset=train,
        meta_dataset=meta,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    t.train()
    saved = load_from_disk(str(tmp_path / "weighted_dataset"))
    raw = torch.sigmoid(t.reweighter.logits.detach().double())
    weights = (raw / raw.mean()).tolist()
    assert {"text", "source", "scalemlo_weight"} <= set(saved.column_names)
    assert set(saved["source"]) <= set(SOURCES)
    if mode == "column":
        assert saved["text"] == train["text"] and saved["scalemlo_weight"] == pytest.approx(weights, rel=1e-6)
    elif mode == "filter":
        kept = [text for text, w in zip(train["text"], weights) if w >= 1.0]
        assert 0 < len(kept) < len(train) and saved["text"] == kept
    else:
        g = torch.Generator().manual_seed(args.seed)
        drawn = torch.multinomial(torch.tensor(weights), len(weights), replacement=True, generator=g).tolist()
        assert saved["text"] == [train["text"][i] for i in drawn]


def test_a_weighted_dataset_needs_a_datasets_dataset(tmp_path):
    t = trainer(tmp_path, reweighting="source", max_steps=1)
    with pytest.raises(ValueError, match="--save_weighted_dataset filter writes a datasets.Dataset, but the training"):
        ReweightingTrainer(
            model=t.model,
            args=arguments(tmp_path, "source", save_weighted_dataset="filter"),
            train_dataset=rows(64, 16, 0),
            meta_dataset=Dataset.from_list(rows(16, 0, 1)),
            data_collator=t.data_collator,
            reweighter_kwargs={"sources": 2},
        )
