"""benchmarks/reweighting_quality.py: a few steps of both tasks, its numbers checked against independent
computations (its full-budget results are in docs/benchmarks.md)."""

import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def bench():
    import examples_helper

    return examples_helper.load_file(ROOT / "benchmarks" / "reweighting_quality.py", "reweighting_quality")


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("rq") / "rq.json"
    warmup = bench.COMMON["meta_warmup_steps"]
    bench.COMMON["meta_warmup_steps"] = 1  # meta steps after steps 2 and 4 of 4
    try:
        result = bench.main(["--seeds", "0", "--steps", "4", "--out", str(out)])
    finally:
        bench.COMMON["meta_warmup_steps"] = warmup
        from scalemlo.hf import reset_trainer_state

        reset_trainer_state()
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    return result


def test_every_baseline_trained_with_its_own_data_and_the_same_budget(report):
    for task, names in (
        ("instruction", {"uniform", "uniform_plus_meta", "clean_only", "learned"}),
        ("domain", {"uniform", "uniform_plus_meta", "clean_only", "learned", "uniform_mixture", "doremi_mixture"}),
    ):
        (row,) = report["tasks"][task]["rows"]
        assert set(row["runs"]) == names and row["steps"] == 4
        losses = row["heldout_loss"]
        assert all(math.isfinite(v) and v > 0 for v in losses.values())
        splits = row["splits"]
        examples = {name: run["examples"] for name, run in row["runs"].items()}
        assert examples["uniform"] == examples["learned"] == splits["train"]
        assert examples["uniform_plus_meta"] == splits["train"] + splits["meta"]
        assert 0 < examples["clean_only"] < splits["train"]
        # the formula, against the row's own losses
        expected = (losses["uniform"] - losses["learned"]) / (losses["uniform"] - losses["clean_only"])
        if losses["uniform"] > losses["clean_only"]:
            assert row["oracle_gap_recovered_learned"] == pytest.approx(expected)
        else:
            assert math.isnan(row["oracle_gap_recovered_learned"])


def test_the_instruction_split_and_its_auc(report, bench):
    import reweighting_quality_data as data
    from sklearn.metrics import roc_auc_score

    (row,) = report["tasks"]["instruction"]["rows"]
    splits = data.instruction_task(0)
    train = splits["train"]
    assert len(train) == row["splits"]["train"] and row["runs"]["clean_only"]["examples"] == sum(
        not r["corrupted"] for r in train
    )
    kinds = Counter(r["corruption"] for r in train if r["corrupted"])
    assert sum(kinds.values()) == round(0.3 * len(train)) and set(kinds) == set(data.INSTRUCTION_CORRUPTIONS)
    pairs = data.instruction_pairs()
    originals = {p["prompt"]: p["response"] for p in pairs}
    owners = {p["response"]: p for p in pairs}  # responses are unique
    for r in train:  # a corrupted response is another pair's, of the same module or of another one
        owner = owners[r["response"]]
        assert (originals[r["prompt"]] == r["response"]) != r["corrupted"]
        if r["corruption"] == "wrong_same_module":
            assert owner["module"] == r["module"]
        elif r["corruption"] == "other_prompt":
            assert owner["module"] != r["module"]
    heldout = {r["prompt"] for r in splits["heldout"]}
    assert heldout == {r["prompt"] for r in data.instruction_task(1)["heldout"]}  # the same for every seed
    assert not heldout & {r["prompt"] for r in train + splits["meta"]}
    # the pair-counting AUC against sklearn's, ties included
    scores = [0.1, 0.4, 0.4, 0.8, 0.3, 0.4]
    labels = [0, 1, 0, 1, 1, 1]
    ours = bench.auc([s for s, y in zip(scores, labels) if y], [s for s, y in zip(scores, labels) if not y])
    assert ours == pytest.approx(roc_auc_score(labels, scores))
    assert 0.0 <= row["weight_auc"] <= 1.0 and set(row["weight_auc_by_corruption"]) == set(kinds)


def test_prompt_tokens_carry_no_loss(bench):
    from scalemlo.hf.losses import per_example_causal_lm_loss

    sys.path.insert(0, str(ROOT / "examples" / "llm_reweighting"))
    import corpus

    rows = [
        {"prompt": "What does `json.dumps(obj)` do?", "response": "Serialize obj to a JSON formatted str."},
        {"prompt": "What does `os.getcwd()` do?", "response": "Return the current directory."},
    ]
    tokenizer = corpus.train_tokenizer([r["prompt"] + "\n" + r["response"] for r in rows] * 20, vocab_size=300)
    batch = bench.PromptMaskedCollator(tokenizer.pad_token_id)([dict(x) for x in bench.encode(rows, tokenizer)])
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer), dtype=torch.float64)
    losses, counts = per_example_causal_lm_loss(logits, batch["labels"], batch["attention_mask"])
    for i, r in enumerate(rows):  # independent: the response's tokens and EOS, each predicted from the one before
        n_prompt = len(tokenizer(r["prompt"] + "\n", add_special_tokens=False)["input_ids"])
        targets = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert batch["input_ids"][i, n_prompt : n_prompt + len(targets)].tolist() == targets
        log_probs = logits[i].log_softmax(-1)
        expected = -sum(log_probs[n_prompt - 1 + k, t] for k, t in enumerate(targets)) / len(targets)
        assert int(counts[i]) == len(targets) and float(losses[i]) == pytest.approx(float(expected))


def test_the_domain_weights_come_from_the_file_and_shape_the_mixture(report, bench):
    import reweighting_quality_data as data

    (row,) = report["tasks"]["domain"]["rows"]
    weights = row["source_weights"]
    assert set(weights) == set(data.DOMAIN_SOURCES) and sum(weights.values()) == pytest.approx(1.0)
    assert len(set(weights.values())) > 1  # the meta steps moved them
    assert row["target_mass"] == pytest.approx(sum(weights[s] for s in data.TARGET_SOURCES))
    ranked = [(t, o) for t in data.TARGET_SOURCES for o in weights if o not in data.TARGET_SOURCES]
    assert row["source_auc"] == pytest.approx(sum(weights[t] > weights[o] for t, o in ranked) / len(ranked))
    # the plain run's mixture: target share as the weights say (sampled: within 4 standard errors)
    size = row["runs"]["doremi_mixture"]["examples"]
    assert size == 4 * 16 == row["runs"]["uniform_mixture"]["examples"]
    tolerance = 4 * math.sqrt(0.25 / size)
    assert row["runs"]["doremi_mixture"]["target_share"] == pytest.approx(row["target_mass"], abs=tolerance)
    assert row["runs"]["uniform_mixture"]["target_share"] == pytest.approx(0.25, abs=tolerance)
    exported = (
        json.loads((Path(row["runs"]["learned"]["weights_file"])).read_text())
        if Path(row["runs"]["learned"]["weights_file"]).is_file()
        else None
    )  # the run's directory is temporary: gone after the report
    assert exported is None
    assert bench_read(bench, {"sources": {"a": 2.0, "b": 6.0}, "source_softmax": {"a": 0.3, "b": 0.7}}) == {
        "a": 0.3,
        "b": 0.7,
    }  # the learned softmax where the scheme has one
    assert bench_read(bench, {"sources": {"a": 0.5, "b": 1.5}}) == {"a": 0.25, "b": 0.75}  # else the means, normalised
    rows = [{"source": s, "i": i} for s in "abc" for i in range(50)]  # a large draw follows the weights closely
    drawn = Counter(r["source"] for r in bench.mixture(rows, {"a": 0.6, "b": 0.3, "c": 0.1}, 20000, seed=0))
    assert [drawn[s] / 20000 for s in "abc"] == pytest.approx([0.6, 0.3, 0.1], abs=0.015)
    assert bench.mixture(rows, {"a": 1.0, "b": 1.0, "c": 0.0}, 30, seed=1) == bench.mixture(
        rows, {"a": 1.0, "b": 1.0, "c": 0.0}, 30, seed=1
    )
    splits = data.domain_task(0)
    assert {r["source"] for r in splits["meta"] + splits["heldout"]} == set(data.TARGET_SOURCES)
    texts = [r["text"] for split in splits.values() for r in split]
    assert len(texts) == len(set(texts))  # no document in two splits
    assert row["runs"]["clean_only"]["examples"] == sum(r["target"] for r in splits["train"])


def test_the_summary_is_the_mean_and_spread_of_the_rows(report, bench):
    for task in ("instruction", "domain"):
        rows, stats = report["tasks"][task]["rows"], report["tasks"][task]["summary"]
        assert stats["uniform"]["mean"] == pytest.approx(rows[0]["heldout_loss"]["uniform"])
        assert stats["uniform"]["std"] == 0.0
    fake = [
        {"task": "instruction", "seed": s, "heldout_loss": {"uniform": u}} for s, u in ((0, 1.0), (1, 2.0), (2, 4.0))
    ]
    stats = bench.summary(fake)
    assert stats["uniform"]["mean"] == pytest.approx(7 / 3) and stats["uniform"]["std"] == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    rows = report["tasks"]["domain"]["rows"]
    lines = bench.table(rows, report["tasks"]["domain"]["summary"]).splitlines()
    assert lines[0].startswith("| seed | uniform |") and lines[2].startswith("| 0 |") and lines[-1].startswith("| mean")


def bench_read(bench, exported: dict) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.json"
        path.write_text(json.dumps(exported))
        return bench.read_source_weights(path)
