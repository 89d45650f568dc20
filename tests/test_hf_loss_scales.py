"""The Trainer's three losses on a batch shaped like real data (right padding, prompt-masked targets, a row
with no target at all), each against a reference written out with ``F.cross_entropy``:

- training: the weighted mean, over the rows that have a target, of each row's token-mean loss (a row
  without a target neither counts nor dilutes the others);
- meta: the token mean over the whole meta batch (long rows count more than short ones);
- evaluation: the token mean over the batch, unweighted.

The toy data of the other Trainer tests has none of these shapes, so a change to any of the three scales
passes them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from hf_toy import T, V, collate, rows
from transformers import GPT2Config, GPT2LMHeadModel

from scalemlo.distributed import ensure_distributed
from scalemlo.hf import ReweightingArguments, ReweightingTrainer, reset_trainer_state

IGNORE = -100


@pytest.fixture(autouse=True)
def fresh_trainer_state():
    ensure_distributed()
    yield
    reset_trainer_state()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer after 4 steps with the source scheme (its weights moved off 1 by the meta steps; each taken
    in its own forward, so none is left due for the next forward)."""
    ensure_distributed()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
    )
    args = ReweightingArguments(
        output_dir=str(tmp_path_factory.mktemp("scales")),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        meta_learning_rate=0.5,
        per_device_meta_batch_size=8,
        reweighting="source",
        meta_warmup_steps=1,
        shared_forward=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    t = ReweightingTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows(64, True, 0)),
        meta_dataset=Dataset.from_list(rows(16, False, 1)),
        data_collator=collate,
        reweighter_kwargs={"sources": ["clean", "noisy"]},
    )
    t.train()
    yield t
    reset_trainer_state()


def ragged_batch() -> dict[str, torch.Tensor]:
    """6 rows of the toy data: rows 1 and 4 right-padded to 9 and 5 tokens, rows 2 and 4 with their first
    6 / 2 targets masked as a prompt, row 3 with no target; sources 0, 1, 0, 0, 1, 0."""
    batch = collate(rows(6, True, 7))
    batch["source"] = torch.tensor([0, 1, 0, 0, 1, 0])
    mask, labels = batch["attention_mask"].clone(), batch["labels"].clone()
    for row, length in ((1, 9), (4, 5)):
        mask[row, length:] = 0
        labels[row, length:] = IGNORE
    labels[2, :6] = IGNORE
    labels[4, :2] = IGNORE
    labels[3, :] = IGNORE
    batch["attention_mask"], batch["labels"] = mask, labels
    return batch


def token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T-1] token cross-entropies and which of them count, the standard causal shift."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    attended = batch["attention_mask"].bool()
    counted = (targets != IGNORE) & attended[:, 1:] & attended[:, :-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets.clamp_min(0).reshape(-1), reduction="none")
    return ce.view(len(targets), -1), counted


def test_the_training_loss_is_the_weighted_mean_over_rows_with_a_target(trained):
    batch = ragged_batch()
    model = trained.model
    model.train()
    with torch.no_grad():
        ce, counted = token_losses(model, batch)
        per_row = (ce * counted).sum(1) / counted.sum(1).clamp_min(1)
        weights = trained.reweighter.weights(per_row, batch)
        loss = trained.compute_loss(model, batch)
    valid = counted.any(1)
    assert valid.tolist() == [True, True, True, False, True, True]
    assert float(weights.std()) > 1e-3  # the weighting moved: the weights do not all cancel
    expected = (weights * per_row)[valid].sum() / valid.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    without = {k: v[valid] for k, v in batch.items()}
    with torch.no_grad():
        ce, counted = token_losses(model, without)
        rows_loss = (ce * counted).sum(1) / counted.sum(1)
        weights = trained.reweighter.weights(rows_loss, without)
    assert float(trained.compute_loss(model, without)) == pytest.approx(float((weights * rows_loss).mean()), rel=1e-5)


def test_the_meta_loss_is_the_token_mean_over_the_meta_batch(trained):
    batch = ragged_batch()
    with torch.no_grad():
        ce, counted = token_losses(trained.model, batch)
        meta = trained._meta_level.training_step(batch)
    token_mean = (ce * counted).sum() / counted.sum()
    example_mean = ((ce * counted).sum(1) / counted.sum(1).clamp_min(1))[counted.any(1)].mean()
    assert abs(float(token_mean) - float(example_mean)) > 1e-3  # the batch tells the two apart
    assert float(meta) == pytest.approx(float(token_mean), rel=1e-5)


def test_the_evaluation_loss_is_the_unweighted_token_mean(trained):
    batch = ragged_batch()
    model = trained.model
    model.eval()
    try:
        with torch.no_grad():
            ce, counted = token_losses(model, batch)
            loss = trained.compute_loss(model, batch)
    finally:
        model.train()
    assert float(loss) == pytest.approx(float((ce * counted).sum() / counted.sum()), rel=1e-5)
