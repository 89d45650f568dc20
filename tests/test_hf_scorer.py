"""ExampleScorer: hashed n-gram features against a direct count, the weighting's algebra, and a scorer
trained by ReweightingTrainer that weights examples it never saw."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from hf_toy import T, V, collate, rows
from transformers import GPT2Config, GPT2LMHeadModel

from scalemlo.distributed import ensure_distributed
from scalemlo.hf import ExampleScorer, ReweightingArguments, ReweightingTrainer, build_reweighter, reset_trainer_state
from scalemlo.hf.reweighting import ExampleWeights, SourceWeights
from scalemlo.hf.scorer import _BIGRAM_STRIDE, _MULTIPLIER, dataset_weights, near_copy_counts, ngram_features


def reference_features(ids: list[int], buckets: int) -> torch.Tensor:
    """The same features by counting in Python (float64)."""
    out = torch.zeros(2 * buckets, dtype=torch.float64)
    for token in ids:
        out[(token * _MULTIPLIER) % buckets] += 1 / len(ids)
    pairs = list(zip(ids[:-1], ids[1:]))
    for a, b in pairs:
        out[buckets + ((a * _BIGRAM_STRIDE + b) * _MULTIPLIER) % buckets] += 1 / len(pairs)
    return out.sqrt()


def test_ngram_features_count_the_attended_tokens_only():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 3, 1]
    ids = torch.randint(0, 50_000, (3, 7), generator=g)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    got = ngram_features(ids, mask, buckets=16).double()
    for row, n in enumerate(lengths):
        assert torch.allclose(got[row], reference_features(ids[row, :n].tolist(), 16), atol=1e-6)
        # the same example alone, unpadded, has the same features (padding changes nothing)
        assert torch.allclose(ngram_features(ids[row : row + 1, :n], None, 16)[0], got[row].float(), atol=1e-6)
    assert got[2, 16:].abs().sum() == 0  # one token: no bigram


def test_scorer_starts_uniform_and_normalises_to_batch_mean_one():
    scorer = ExampleScorer(buckets=8)
    batch = {"input_ids": torch.randint(0, 100, (5, 6)), "attention_mask": torch.ones(5, 6)}
    assert torch.equal(scorer.weights(torch.rand(5), batch), torch.ones(5))
    torch.nn.init.normal_(scorer.net.weight)
    weights = scorer.weights(torch.rand(5), batch)
    z = scorer.net(ngram_features(batch["input_ids"], batch["attention_mask"], 8)).squeeze(-1)
    raw = torch.sigmoid(z - z.median())
    assert torch.allclose(weights, raw / raw.mean())
    assert float(weights.mean()) == pytest.approx(1.0)
    assert float(weights.max()) <= 4.0  # half of the batch at or above 1/2: at most 4x the mean


def test_scorer_with_the_loss_reads_its_rank_in_the_batch():
    scorer = ExampleScorer(features=("loss",))
    with torch.no_grad():
        scorer.net.weight.fill_(-1.0)
    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long)}
    low = scorer.weights(torch.tensor([1.0, 2.0, 3.0]), batch)
    high = scorer.weights(torch.tensor([11.0, 12, 13]), batch)
    assert torch.allclose(low, high)  # a shift of every loss changes nothing
    assert low[0] > low[1] > low[2]


def jaccard_reference(a: str, b: str, n: int) -> float:
    def grams(text):
        words = text.split()
        return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}

    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def test_near_copy_counts_match_pairwise_jaccard():
    import random

    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(2, 30))) for _ in range(30)]
    for k in range(6):  # near-copies of text 0 with k word edits, and an exact repeat
        words = texts[0].split()
        for _ in range(k):
            words[rng.randrange(len(words))] = "edited"
        texts.append(" ".join(words))
    texts.append("a b")  # shorter than n: its one n-gram
    texts.append("a b")
    for n, threshold in ((3, 0.5), (2, 0.3), (1, 0.9)):
        expected = [
            sum(1 for j, b in enumerate(texts) if j != i and jaccard_reference(a, b, n) >= threshold)
            for i, a in enumerate(texts)
        ]
        assert near_copy_counts(texts, n=n, threshold=threshold) == expected
    assert near_copy_counts(texts)[-1] == 1 and near_copy_counts(texts)[0] >= 3
    with pytest.raises(ValueError, match="threshold"):
        near_copy_counts(texts, threshold=0.0)


def test_scorer_reads_the_near_copy_count_as_log1p():
    scorer = ExampleScorer(features=("ngrams", "near_copies"), buckets=4)
    assert scorer.requires == ("input_ids", "near_copies")
    with torch.no_grad():
        scorer.net.weight.zero_()
        scorer.net.weight[0, -1] = -2.0  # the last input is the count
    batch = {"input_ids": torch.randint(0, 50, (4, 5)), "near_copies": torch.tensor([0, 0, 3, 14])}
    z = scorer.scores(None, batch)
    assert torch.allclose(z, -2.0 * torch.log1p(torch.tensor([0.0, 0, 3, 14])))
    weights = scorer.weights(torch.zeros(4), batch)
    assert weights[0] == weights[1] > weights[2] > weights[3]
    with pytest.raises(ValueError, match="near_copies"):
        scorer.weights(torch.zeros(4), {"input_ids": batch["input_ids"]})


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"features": ()}, "features must be"),
        ({"features": ("ngrams", "embedding")}, "features must be"),
        ({"buckets": 0}, "buckets must be"),
        ({"hidden_size": -1}, "hidden_size must be"),
    ],
)
def test_bad_scorer_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        build_reweighter("scorer", **kwargs)


@pytest.fixture
def fresh_trainer_state():
    ensure_distributed()
    yield
    reset_trainer_state()


def auc(clean_weights: torch.Tensor, noisy_weights: torch.Tensor) -> float:
    """P(a clean example outweighs a noisy one), ties counted half."""
    c, n = clean_weights[:, None], noisy_weights[None, :]
    return float(((c > n).double() + 0.5 * (c == n).double()).mean())


@pytest.mark.parametrize("method", ["finite_difference", "sama"])
def test_a_trained_scorer_weights_examples_it_never_saw(tmp_path, fresh_trainer_state, method):
    """Counting sequences are clean, random tokens noisy (hf_toy); the scorer trains on one set and must rank a
    fresh set, drawn with another seed, clean above noisy: the table schemes cannot weight those rows at all."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
    )
    args = ReweightingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=40,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        meta_learning_rate=0.05,
        per_device_meta_batch_size=16,
        reweighting="scorer",
        hypergradient_method=method,
        shared_forward=False,
        save_strategy="no",
        disable_tqdm=True,
        meta_warmup_steps=5,
    )
    train, meta = Dataset.from_list(rows(128, True, 0)), Dataset.from_list(rows(32, False, 1))
    t = ReweightingTrainer(
        model=model,
        args=args,
        train_dataset=train,
        meta_dataset=meta,
        data_collator=collate,
        reweighter_kwargs={"buckets": 64},
    )
    t.train()
    unseen = rows(64, True, 7)
    weights = dataset_weights(t.reweighter, t.model, unseen, collate)
    noisy = torch.tensor([row["source"] == 1 for row in unseen])
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-5)
    assert auc(weights[~noisy], weights[noisy]) > 0.95
    assert math.isfinite(float(weights.sum()))


@pytest.mark.parametrize(
    "scheme, column, hint",
    [
        (ExampleWeights, "id", "per-example table weighs only the training rows"),
        (SourceWeights, "source", "add the column"),
    ],
)
def test_scoring_rows_without_the_schemes_column_names_the_fix(scheme, column, hint):
    """A table scheme cannot weigh rows it never trained on: the error says so and names a scheme that can,
    instead of pointing at remove_unused_columns."""
    reweighter = scheme(8)
    unseen = [{k: v for k, v in row.items() if k != column} for row in rows(4, True, 3)]
    with pytest.raises(ValueError, match=hint) as raised:
        dataset_weights(reweighter, None, unseen, collate)
    assert "remove_unused_columns" not in str(raised.value)


def test_a_drawn_batch_trains_with_weight_one_and_the_sampling_gradient():
    """With the batch drawn ∝ raw, weights are 1 and ∂/∂φ mean(cᵢ wᵢ) = mean(cᵢ (∂log rawᵢ − mean ∂log raw))."""
    torch.manual_seed(0)
    scorer = ExampleScorer(buckets=8, hidden_size=4)
    torch.nn.init.normal_(scorer.net[-1].weight)
    scorer.sampled = True
    batch = {"input_ids": torch.randint(0, 100, (6, 5)), "attention_mask": torch.ones(6, 5)}
    slopes = torch.randn(6)
    weights = scorer.weights(torch.rand(6), batch)
    assert torch.equal(weights.detach(), torch.ones(6))
    params = list(scorer.parameters())
    got = torch.autograd.grad((slopes * weights).mean(), params)
    log_raw = torch.log(scorer.raw_weights(None, batch))
    expected = torch.autograd.grad((slopes * (log_raw - log_raw.mean())).mean(), params)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)


def toy_trainer(tmp_path, scorer_kwargs=None, **kwargs):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
    )
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=40,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        meta_learning_rate=0.05,
        per_device_meta_batch_size=16,
        reweighting="scorer",
        hypergradient_method="sama",
        shared_forward=False,
        save_strategy="no",
        disable_tqdm=True,
        meta_warmup_steps=5,
    )
    settings.update(kwargs)
    train, meta = Dataset.from_list(rows(128, True, 0)), Dataset.from_list(rows(32, False, 1))
    reweighter_kwargs = {"buckets": 64, **(scorer_kwargs or {})} if settings["reweighting"] == "scorer" else {}
    args = ReweightingArguments(**settings)
    return ReweightingTrainer(
        model=model,
        args=args,
        train_dataset=train,
        meta_dataset=meta,
        data_collator=collate,
        reweighter_kwargs=reweighter_kwargs,
    )


def test_a_selection_pool_trains_batches_drawn_away_from_the_noise(tmp_path, fresh_trainer_state):
    t = toy_trainer(tmp_path, selection_pool=4)
    trained = []
    t.model.register_forward_pre_hook(
        lambda module, args, kwargs: trained.append(kwargs["input_ids"].shape[0]) if module.training else None,
        with_kwargs=True,
    )
    seen_noisy = []
    original = t._select

    def spy(candidates):
        batch = original(candidates)
        seen_noisy.append(float(batch["source"].float().mean()))
        return batch

    t._select = spy
    t.train()
    assert set(trained) == {16}  # every trained micro-batch has per_device_train_batch_size rows
    assert sum(seen_noisy[:5]) / 5 > 0.15  # a quarter noisy while the scorer is still uniform
    assert sum(seen_noisy[-10:]) / 10 < 0.05  # drawn away from the noise once it has learned
    unseen = rows(64, True, 7)
    weights = t.score(Dataset.from_list(unseen))
    noisy = torch.tensor([row["source"] == 1 for row in unseen])
    assert auc(weights[~noisy], weights[noisy]) > 0.95


def test_a_selection_pool_needs_weights_without_the_forward(tmp_path, fresh_trainer_state):
    with pytest.raises(ValueError, match="weighs examples by their losses"):
        toy_trainer(tmp_path, selection_pool=4, reweighting="meta_weight_net")


def test_logged_source_means_count_only_the_batches_that_hold_the_source(tmp_path, fresh_trainer_state):
    t = toy_trainer(tmp_path, max_steps=1)
    sources = torch.tensor([0, 0])
    t._track_weights(torch.tensor([1.0, 1.0]), sources)  # a batch without source 1
    t._track_weights(torch.tensor([0.5, 1.5]), torch.tensor([0, 1]))
    logs = {}
    t.callback_handler.callbacks = []  # nothing to report to
    from transformers import Trainer

    original = Trainer.log
    Trainer.log = lambda self, logs_, *a, **k: logs.update(logs_)
    try:
        t.log({})
    finally:
        Trainer.log = original
    assert logs["weight/source/1"] == pytest.approx(1.5)  # one batch held source 1, with weight 1.5
    assert logs["weight/source/0"] == pytest.approx(0.75)
