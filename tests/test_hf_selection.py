"""Choosing a micro-batch from a selection pool: the balanced schedule's coverage and proportions against
the random draw's, its state across a checkpoint, and the scorer centred on the meta set's scores."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_hf_scorer import fresh_trainer_state, toy_trainer  # noqa: F401 (fixture)

from scalemlo.hf import ExampleScorer, ReweightingArguments
from scalemlo.hf.selection import AGES_FILE, SELECTION_FLOOR, Selector, shares, with_floor


def run_epochs(
    selector: Selector, raw: torch.Tensor, epochs: int, pool: int, size: int, shuffle: bool = True, seed: int = 0
) -> torch.Tensor:
    """How often each row is chosen when every epoch deals the rows (shuffled, or in order) into pools."""
    n = len(raw)
    counts = torch.zeros(n, dtype=torch.int64)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order) if shuffle else torch.arange(n)
        for start in range(0, n, pool):
            ids = perm[start : start + pool]
            generator = torch.Generator().manual_seed(epoch * 1000 + start)
            chosen = selector.choose(raw[ids], ids, size, generator)
            counts[ids[chosen]] += 1
    return counts


def test_shares_are_the_expected_batch_share_capped_at_one():
    raw = torch.tensor([1.0, 1.0, 2.0, 0.0, 12.0])
    assert torch.allclose(shares(raw, 2), torch.tensor([2 / 16, 2 / 16, 4 / 16, 0.0, 1.0]))


def test_balanced_trains_every_row_as_often_as_plain_epochs_where_the_random_draw_does_not():
    """Equal weights, pools of 16 choosing 4, 8 epochs: each row is due 2 times. The balanced schedule gives
    every row 2 (at most one off); the random draw leaves rows out and trains others 4 times or more."""
    n, raw = 256, torch.ones(256)
    balanced = run_epochs(Selector("balanced", n), raw, epochs=8, pool=16, size=4)
    drawn = run_epochs(Selector("random", n), raw, epochs=8, pool=16, size=4)
    assert int(balanced.sum()) == int(drawn.sum()) == 2 * n
    assert int(balanced.min()) >= 1 and int(balanced.max()) <= 3
    assert float((balanced == 2).float().mean()) > 0.8
    assert int((drawn == 0).sum()) > 5 and int(drawn.max()) >= 5


def test_balanced_follows_the_weights_and_leaves_out_what_they_drop():
    """Rows of weight 2 train twice as often as rows of weight 1; rows of weight ~0 never, however long they
    have waited (every pool holds 4 rows of each weight, so a batch of 3 never needs them)."""
    n = 240
    raw = torch.tensor([2.0, 1.0, 1e-6]).repeat(n // 3)
    counts = run_epochs(Selector("balanced", n), raw, epochs=30, pool=12, size=3, shuffle=False)
    heavy, light, dropped = counts[0::3].double(), counts[1::3].double(), counts[2::3]
    assert int(dropped.sum()) == 0
    assert float(heavy.mean() / light.mean()) == pytest.approx(2.0, rel=0.05)
    assert float(light.std()) < 1.0  # evenly spread over the rows of one weight


def test_a_floor_keeps_dropped_rows_training_at_its_rate():
    """The rows the weights drop train about floor / (1 + floor) as often as with equal weights, at even
    intervals; the kept rows share the rest in proportion to their weights."""
    n, floor = 240, 0.25
    raw = torch.tensor([2.0, 1.0, 1e-6]).repeat(n // 3)
    drawn, added = with_floor(raw, floor)
    assert float(added) == pytest.approx(floor * float(raw.mean()))
    equal = run_epochs(Selector("balanced", n), torch.ones(n), epochs=120, pool=12, size=3, shuffle=False)
    counts = run_epochs(Selector("balanced", n), drawn, epochs=120, pool=12, size=3, shuffle=False)
    heavy, light, dropped = counts[0::3].double(), counts[1::3].double(), counts[2::3].double()
    expected = float(added) / float(drawn.mean()) * float(equal.double().mean())
    assert float(dropped.mean()) == pytest.approx(expected, rel=0.1)
    assert float(dropped.min()) >= 1 and float(dropped.std()) < 1.0
    assert float(heavy.mean() / light.mean()) == pytest.approx(float(drawn[0] / drawn[1]), rel=0.05)


def test_the_sampling_gradient_differentiates_the_weights_the_choice_was_made_with():
    """With a floor column, the sampled weights are 1 and their gradient is ∂log(raw + floor) centred over
    the batch: the score function of the floored draw, not of the raw weights."""
    scorer, batch, _ = scorer_with_reference()
    scorer.sampled = True
    rows = len(batch["input_ids"])
    losses = torch.rand(rows, dtype=torch.float64)
    plain = scorer.weights(losses, batch)
    assert torch.allclose(plain, torch.ones_like(plain))
    floor = torch.full((rows,), 0.3, dtype=torch.float64)
    floored = scorer.weights(losses, {**batch, SELECTION_FLOOR: floor})
    assert torch.allclose(floored, torch.ones_like(floored))
    probe = torch.randn(rows, dtype=torch.float64)
    (grad,) = torch.autograd.grad((floored * probe).sum(), [next(scorer.parameters())])
    raw = scorer.raw_weights(losses, batch)
    log_drawn = torch.log(raw + floor)
    expected = (log_drawn * (probe - probe.mean())).sum()
    (want,) = torch.autograd.grad(expected, [next(scorer.parameters())])
    assert torch.allclose(grad, want, atol=1e-6, rtol=1e-4)
    (unfloored,) = torch.autograd.grad((scorer.weights(losses, batch) * probe).sum(), [next(scorer.parameters())])
    assert not torch.allclose(grad, unfloored, atol=1e-6)


def test_a_floor_needs_a_pool_and_is_not_negative(tmp_path):
    with pytest.raises(ValueError, match="--selection_floor applies to the draw from a selection pool"):
        ReweightingArguments(output_dir=str(tmp_path), selection_floor=0.1)
    with pytest.raises(ValueError, match="--selection_floor must be >= 0"):
        ReweightingArguments(output_dir=str(tmp_path), selection_pool=4, selection_floor=-0.1)


def test_the_trainer_passes_the_floor_with_the_chosen_batch(tmp_path, fresh_trainer_state):  # noqa: F811
    """The chosen batch carries floor x the pool's mean raw weight; the model's forward ignores the column
    and the meta steps (held batches included) train."""
    t = toy_trainer(tmp_path, selection_pool=4, max_steps=8, meta_warmup_steps=2, selection_floor=0.5)
    seen = []
    original = t._select

    def spy(candidates):
        with torch.no_grad():
            raw = t.reweighter.raw_weights(None, candidates).float()
        batch = original(candidates)
        seen.append((batch[SELECTION_FLOOR].float(), 0.5 * float(raw.mean())))
        return batch

    t._select = spy
    before = [p.detach().clone() for p in t.reweighter.parameters()]
    t.train()
    assert len(seen) == 8
    for column, expected in seen:
        assert column.shape == (t.args.per_device_train_batch_size,)
        assert torch.allclose(column, torch.full_like(column, expected))
    assert any(not torch.equal(a, b) for a, b in zip(before, t.reweighter.parameters()))


def test_balanced_needs_ids_that_index_the_rows():
    selector = Selector("balanced", 4)
    with pytest.raises(ValueError, match="needs the batch's 'id' column"):
        selector.choose(torch.ones(4), None, 2, torch.Generator())
    with pytest.raises(ValueError, match="must index the training set's 4 rows"):
        selector.choose(torch.ones(2), torch.tensor([0, 7]), 1, torch.Generator())
    with pytest.raises(ValueError, match="--selection_schedule 'sorted' is not known"):
        Selector("sorted", 4)


def test_the_ages_survive_a_checkpoint_and_a_mismatch_is_refused(tmp_path):
    selector = Selector("balanced", 6)
    selector.choose(torch.ones(6), torch.arange(6), 2, torch.Generator().manual_seed(0))
    selector.save(tmp_path)
    restored = Selector("balanced", 6)
    restored.load(tmp_path)
    assert torch.equal(restored.ages, selector.ages) and int(selector.ages.sum()) == 4
    with pytest.raises(ValueError, match="covers 6 examples, the training set has 5"):
        Selector("balanced", 5).load(tmp_path)
    (tmp_path / AGES_FILE).unlink()
    with pytest.raises(ValueError, match=f"needs the selection state {AGES_FILE}"):
        Selector("balanced", 6).load(tmp_path)
    Selector("random", 6).load(tmp_path)  # the random draw keeps no state


def test_an_unknown_schedule_is_refused_with_the_arguments(tmp_path):
    with pytest.raises(ValueError, match="--selection_schedule 'sorted' is not known; allowed: balanced, random"):
        ReweightingArguments(output_dir=str(tmp_path), selection_schedule="sorted", use_cpu=True, report_to=[])


def scorer_with_reference(seed: int = 0) -> tuple[ExampleScorer, dict, dict]:
    torch.manual_seed(seed)
    scorer = ExampleScorer(buckets=8, centre="meta", reference_quantile=0.3).double()
    torch.nn.init.normal_(scorer.net.weight)
    batch = {"input_ids": torch.randint(0, 50, (6, 7)), "attention_mask": torch.ones(6, 7)}
    reference = {"input_ids": torch.randint(0, 50, (9, 7)), "attention_mask": torch.ones(9, 7)}
    scorer.set_reference(reference)
    return scorer, batch, reference


def test_the_meta_centre_is_a_quantile_of_the_reference_scores_and_carries_the_gradient():
    """raw = sigmoid(z − q₀.₃(z_ref)); its gradient, the centre's included, against central differences
    in float64."""
    scorer, batch, reference = scorer_with_reference()
    z, z_ref = scorer.scores(None, batch), scorer.scores(None, reference)
    expected = torch.sigmoid(z - torch.quantile(z_ref, 0.3))
    assert torch.allclose(scorer.raw_weights(None, batch), expected, atol=1e-12)
    slopes = torch.randn(6, dtype=torch.float64)
    weight = scorer.net.weight
    (grad,) = torch.autograd.grad((slopes * scorer.raw_weights(None, batch)).sum(), [weight])
    direction = torch.randn_like(weight)
    with torch.no_grad():
        weight += 1e-6 * direction
        up = (slopes * scorer.raw_weights(None, batch)).sum()
        weight -= 2e-6 * direction
        down = (slopes * scorer.raw_weights(None, batch)).sum()
        weight += 1e-6 * direction
    assert float((grad * direction).sum()) == pytest.approx(float((up - down) / 2e-6), rel=1e-6)
    # the whole-set weights use the same centre: proportional to the batch's raw weights
    whole = scorer.weights_of_scores(z.detach())
    assert torch.allclose(whole.double(), expected / expected.mean(), atol=1e-6)


def test_the_meta_centre_needs_a_reference_without_the_loss_feature():
    with pytest.raises(ValueError, match="cannot read the loss feature"):
        ExampleScorer(features=("ngrams", "loss"), centre="meta")
    with pytest.raises(ValueError, match="centre must be one of"):
        ExampleScorer(centre="mean")
    with pytest.raises(ValueError, match="reference_quantile must be in"):
        ExampleScorer(centre="meta", reference_quantile=1.5)
    scorer = ExampleScorer(buckets=8, centre="meta")
    batch = {"input_ids": torch.randint(0, 50, (3, 4))}
    with pytest.raises(ValueError, match=r"has no reference: call set_reference"):
        scorer.raw_weights(None, batch)
    copies = ExampleScorer(features=("ngrams", "near_copies"), buckets=8, centre="meta")
    with pytest.raises(ValueError, match=r"needs its columns \['near_copies'\]"):
        copies.set_reference(batch)


def test_the_trainer_centres_a_scorer_on_its_meta_set(tmp_path, fresh_trainer_state):  # noqa: F811
    t = toy_trainer(tmp_path, selection_pool=4, max_steps=2)
    assert t.reweighter.reference_features is None  # the default centre is each batch's median
    t = toy_trainer(tmp_path, selection_pool=4, max_steps=2, scorer_kwargs={"centre": "meta"})
    assert t.reweighter.reference_features.shape[0] == len(t.meta_dataset)


def test_a_balanced_selection_run_resumes_bit_for_bit(tmp_path, fresh_trainer_state):  # noqa: F811
    """16 steps straight against 8 steps, a checkpoint, and 8 more from it in a fresh trainer: the same
    model, the same scorer and the same ages."""
    common = dict(selection_pool=4, max_steps=16, save_strategy="steps", save_steps=8, scorer_kwargs={"centre": "meta"})
    straight = toy_trainer(tmp_path / "a", **common)
    straight.train()
    from test_hf_scorer import reset_trainer_state

    reset_trainer_state()
    resumed = toy_trainer(tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.reweighter.parameters(), resumed.reweighter.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(straight._selector.ages, resumed._selector.ages)
    assert int(straight._selector.ages.max()) >= 1
    assert isinstance(straight.train_dataset, Dataset)
