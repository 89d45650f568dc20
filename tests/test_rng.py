"""``scalemlo.rng.rng_preserved`` puts Python's, numpy's and torch's generators back after a block, and the
Trainer's batch check (``scalemlo.hf.data.check_batch``) collates through it: a collator that draws from all
three leaves the run's random streams where they were, whether it succeeds or fails."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from scalemlo.hf.data import check_batch
from scalemlo.rng import rng_preserved


def draws() -> tuple:
    """The next draw of each generator (consuming it)."""
    return random.random(), float(np.random.random()), float(torch.rand(()))


def drawing_collator(rows):
    draws()
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def failing_collator(rows):
    draws()
    raise KeyError("text")


def untouched(block) -> bool:
    """Whether the draws after ``block`` are those a run without it makes."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    block()
    return draws() == expected


def test_a_preserved_block_leaves_every_generator_as_it_was():
    def block():
        with rng_preserved(cuda=False):
            draws()

    def raising():
        with pytest.raises(RuntimeError), rng_preserved(cuda=False):
            draws()
            raise RuntimeError("inside")

    assert untouched(block) and untouched(raising)
    assert not untouched(draws)  # the check can fail


def test_the_batch_check_leaves_the_run_s_generators_where_they_were():
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}]
    assert untouched(lambda: check_batch("train_dataset", rows, drawing_collator, 2))

    def failing():
        with pytest.raises(ValueError, match="the data collator cannot batch its rows"):
            check_batch("train_dataset", rows, failing_collator, 2)

    assert untouched(failing)
