"""ReweightingTrainer's evaluation: the unweighted token-mean causal-LM loss, whatever the weighting.

``evaluate()``, ``--eval_strategy steps|epoch``, ``load_best_model_at_end`` and ``predict()`` on an
evaluation set with padding, prompt masking (labels -100 on the prompt), a row with no target at all, a
text column and no ``id``/``source`` column, checked against an independent oracle: each row run alone,
unpadded, through the model, its targets' cross-entropy summed in float64 and divided by the number of
targets over the whole set (a mean of batch means would differ: the batches hold different numbers of
targets).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from hf_toy import V
from test_hf_trainer import ds, fresh_trainer_state, trainer  # noqa: F401 (fixture)

from scalemlo.hf.state import reset_trainer_state

PROMPTS = [0, 3, 4, 0, 2, 0, 6]  # tokens of each evaluation row masked as its prompt
LENGTHS = [16, 9, 12, 5, 16, 7, 11]
NO_TARGET = 3  # the row whose labels are all -100


def eval_rows() -> list[dict]:
    """7 rows of different lengths (counting sequences, every third one random tokens), a text column."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for i, (length, prompt) in enumerate(zip(LENGTHS, PROMPTS)):
        start = int(torch.randint(0, V, (1,), generator=g))
        ids = ((start + torch.arange(length)) % V).tolist()
        if i % 3 == 1:
            ids = torch.randint(0, V, (length,), generator=g).tolist()
        labels = [-100] * length if i == NO_TARGET else [-100] * prompt + ids[prompt:]
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * length, "labels": labels, "text": " ".join(map(str, ids))}
        )
    return rows


def pad_collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding to the longest row (labels -100, mask 0); every other column as it is (a string column
    would fail here: torch.tensor cannot hold strings)."""
    width = max(len(it["input_ids"]) for it in items)
    batch = {
        name: torch.tensor([it[name] + [pad] * (width - len(it[name])) for it in items])
        for name, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))
    }
    batch.update({k: torch.tensor([it[k] for it in items]) for k in items[0] if k not in batch})
    return batch


@torch.no_grad()
def token_mean_oracle(model: torch.nn.Module, rows: list[dict]) -> float:
    """sum of every target's cross-entropy / number of targets, each row alone and unpadded, in float64."""
    import deepspeed

    model.eval()
    total, count = 0.0, 0
    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # a ZeRO-3 model's partitions; else nothing
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(row["labels"][1:])
            counted = targets != -100
            total += float(F.cross_entropy(logits[counted], targets[counted], reduction="sum"))
            count += int(counted.sum())
    return total / count


def mean_of_batch_means(model, rows: list[dict], size: int) -> float:
    """What a per-batch mean would report (the Trainer's default): not the oracle on these rows."""
    means = []
    for start in range(0, len(rows), size):
        part = [r for r in rows[start : start + size] if any(x != -100 for x in r["labels"][1:])]
        means.append(token_mean_oracle(model, part))
    return sum(means) / len(means)


@pytest.mark.parametrize(
    "reweighting, stage",
    [("example", None), ("source", 3), ("meta_weight_net", 0)],
    ids=["example", "source-zero3", "meta_weight_net-zero0"],
)
def test_evaluate_reports_the_unweighted_token_mean_loss(tmp_path, reweighting, stage):
    rows = eval_rows()
    t = trainer(
        tmp_path,
        deepspeed=None if stage is None else ds(stage),
        reweighting=reweighting,
        max_steps=2,
        eval_dataset=Dataset.from_list(rows),
        collator=pad_collate,
        per_device_eval_batch_size=3,
    )
    # before training too (not under DeepSpeed: transformers' Trainer then trains the inference engine
    # evaluate() built, a plain Trainer included)
    before = t.evaluate() if stage is None else {"eval_loss": token_mean_oracle(t.model, rows)}
    t.train()
    after = t.evaluate()
    assert t._meta_level.steps >= 1  # the weighting model has stepped: the weights are not uniform
    expected = token_mean_oracle(t.model, rows)
    assert after["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert after["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert abs(mean_of_batch_means(t.model, rows, 3) - expected) > 1e-3
    assert before["eval_loss"] > after["eval_loss"]


def test_predict_gives_logits_labels_and_the_token_mean_loss(tmp_path):
    rows = eval_rows()
    t = trainer(tmp_path, reweighting="source", max_steps=1, collator=pad_collate, per_device_eval_batch_size=3)
    t.train()
    out = t.predict(Dataset.from_list(rows))
    assert out.predictions.shape == (len(rows), max(LENGTHS), V) and out.label_ids.shape == (len(rows), max(LENGTHS))
    assert out.metrics["test_loss"] == pytest.approx(token_mean_oracle(t.model, rows), rel=1e-5)
    assert "test_perplexity" in out.metrics
    with torch.no_grad():
        alone = t.model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
    assert torch.allclose(torch.as_tensor(out.predictions[1, : LENGTHS[1]]), alone, atol=1e-5)
    assert out.label_ids[1].tolist() == rows[1]["labels"] + [-100] * (max(LENGTHS) - LENGTHS[1])


@pytest.mark.parametrize("strategy, evaluated_at", [("steps", [2, 4, 6]), ("epoch", [8])])
def test_evaluation_during_training_and_the_best_model_at_end(tmp_path, strategy, evaluated_at):
    rows = eval_rows()
    schedule = {"eval_strategy": strategy, "save_strategy": strategy}
    if strategy == "steps":
        schedule.update(eval_steps=2, save_steps=2)
    else:
        schedule.update(max_steps=-1, num_train_epochs=1)  # 64 rows in batches of 8
    t = trainer(
        tmp_path,
        reweighting="meta_weight_net",
        eval_dataset=Dataset.from_list(rows),
        collator=pad_collate,
        per_device_eval_batch_size=3,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        **schedule,
    )
    t.train()
    evaluations = [h for h in t.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evaluations] == evaluated_at
    assert all(h["eval_perplexity"] == pytest.approx(math.exp(h["eval_loss"])) for h in evaluations)
    best = min(evaluations, key=lambda h: h["eval_loss"])
    assert t.state.best_metric == best["eval_loss"]
    assert t.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    assert token_mean_oracle(t.model, rows) == pytest.approx(best["eval_loss"], rel=1e-5)  # the best, loaded


def test_an_evaluation_set_without_targets_is_refused(tmp_path):
    rows = [{**r, "labels": [-100] * len(r["labels"])} for r in eval_rows()]
    t = trainer(tmp_path, collator=pad_collate)
    with pytest.raises(ValueError, match="no counted target token"):
        t.evaluate(Dataset.from_list(rows))


def test_a_resumed_run_keeps_the_best_checkpoint(tmp_path):
    """Each checkpoint's trainer_state.json names the best checkpoint by its final path (the Trainer writes
    it into a staging folder first), so a run resumed from checkpoint-2 loads the same best model at the
    end as the uninterrupted run. ``greater_is_better`` makes the first evaluation the best one, so the
    best is an earlier checkpoint than the last."""
    rows = eval_rows()
    kw = dict(
        reweighting="meta_weight_net",
        eval_dataset=Dataset.from_list(rows),
        collator=pad_collate,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    whole = trainer(tmp_path / "whole", **kw)
    whole.train()
    best = max((h for h in whole.state.log_history if "eval_loss" in h), key=lambda h: h["eval_loss"])
    assert whole.state.best_model_checkpoint == str(tmp_path / "whole" / f"checkpoint-{best['step']}")
    for checkpoint in sorted((tmp_path / "whole").glob("checkpoint-*")):
        named = json.loads((checkpoint / "trainer_state.json").read_text())["best_model_checkpoint"]
        assert ".staging" not in named and Path(named).is_dir()
    reset_trainer_state()  # a second Trainer in this process
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", run)
    for later in [c for c in run.glob("checkpoint-*") if int(c.name.split("-")[1]) > 2]:
        shutil.rmtree(later)
    state = run / "checkpoint-2" / "trainer_state.json"  # the copy names the first run's folders: its own
    state.write_text(state.read_text().replace(str(tmp_path / "whole"), str(run)))
    resumed = trainer(run, **kw)
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert resumed.state.best_model_checkpoint == str(run / f"checkpoint-{best['step']}")
    assert token_mean_oracle(resumed.model, rows) == pytest.approx(best["eval_loss"], rel=1e-5)  # the best, loaded
