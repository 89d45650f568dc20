"""Engine checkpoints: exact resume, data positions, atomic writes, refusals (one process).

Killing real processes at random points is ``tests/test_kill_and_resume.py``.
"""

import json
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

from scalemlo import Engine, EngineConfig, Level, LevelConfig
from scalemlo.checkpoint import MANIFEST, CheckpointError, complete_checkpoints, rng_state, set_rng_state
from scalemlo.data import DataCursor


# ---- data positions ------------------------------------------------------------------
class OwnGenerator:
    """A user's iterable that shuffles with its own generator (as the noisy-label example does)."""

    def __init__(self, n: int = 10, batch: int = 3):
        self.data, self.batch = torch.arange(n), batch
        self.generator = torch.Generator().manual_seed(5)

    def __iter__(self):
        order = torch.randperm(len(self.data), generator=self.generator)
        for i in range(0, len(order) - self.batch + 1, self.batch):
            yield self.data[order[i : i + self.batch]]


class Stateful:
    """An iterable with state_dict/load_state_dict (as torchdata's StatefulDataLoader)."""

    def __init__(self):
        self.position = 0

    def __iter__(self):
        while self.position < 7:
            self.position += 1
            yield torch.tensor([self.position])
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def dataset():
    return TensorDataset(torch.arange(10.0))


DATA = {
    "plain list": lambda: [torch.tensor([i]) for i in range(4)],
    "DataLoader, seeded sampler": lambda: DataLoader(
        dataset(), batch_size=3, sampler=RandomSampler(dataset(), generator=torch.Generator().manual_seed(0))
    ),
    "DataLoader, generator=": lambda: DataLoader(
        dataset(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)
    ),
    "DataLoader, shuffle from the global generator": lambda: DataLoader(dataset(), batch_size=3, shuffle=True),
    "DistributedSampler": lambda: DataLoader(
        dataset(), batch_size=2, sampler=DistributedSampler(dataset(), num_replicas=2, rank=1, seed=3)
    ),
    "own generator attribute": OwnGenerator,
    "state_dict / load_state_dict": Stateful,
}


def as_list(batch):
    return (batch[0] if isinstance(batch, list) else batch).tolist()


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("drawn", [0, 2, 9])
def test_a_resumed_cursor_draws_the_batch_the_interrupted_one_would_have(kind, drawn):
    torch.manual_seed(0)
    first = DataCursor(DATA[kind](), "lv")
    for _ in range(drawn):
        first.next()
    state, generators = first.state_dict(), rng_state()
    expected = [as_list(first.next()) for _ in range(8)]  # crosses epoch boundaries

    torch.manual_seed(99)  # a new process: other generator states, a fresh iterable
    random.seed(99)
    np.random.seed(99)
    second = DataCursor(DATA[kind](), "lv")
    second.load_state_dict(state)
    set_rng_state(generators)  # the engine restores the generators after every level's data
    assert [as_list(second.next()) for _ in range(8)] == expected
    assert second.epoch == first.epoch


def test_distributed_sampler_is_told_the_epoch():
    sampler = DistributedSampler(dataset(), num_replicas=2, rank=0, seed=3)
    cursor = DataCursor(DataLoader(dataset(), batch_size=5, sampler=sampler), "lv")
    cursor.next()
    assert sampler.epoch == 0
    cursor.next()  # the epoch's 5 examples are one batch: this is epoch 1
    assert sampler.epoch == 1 and cursor.epoch == 1


def test_resuming_with_shorter_data_is_an_error():
    first = DataCursor([torch.tensor([i]) for i in range(6)], "lv")
    for _ in range(5):
        first.next()
    second = DataCursor([torch.tensor([i]) for i in range(3)], "lv")
    with pytest.raises(ValueError, match="resuming needs batch 5 of epoch 0, but the data now ends after 3"):
        second.load_state_dict(first.state_dict())


# ---- whole programs ----------------------------------------------------------------------
class Lower(Level):
    def training_step(self, batch):
        x, y = batch
        logits = self.module(x)
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        weights = self.uppers["upper"](losses.detach().unsqueeze(-1)).squeeze(-1)
        return (weights * losses).mean()


class Upper(Level):
    def training_step(self, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.lowers["lower"](x), y)


def program(tmp_path, method="finite_difference", backend="deepspeed", max_steps=9, hidden=8, **engine_kwargs):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, hidden), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(hidden, 3)
    )
    weigher = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1), torch.nn.Sigmoid())
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    train = DataLoader(TensorDataset(xs, ys), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
    meta = [(xs[i : i + 10], ys[i : i + 10]) for i in range(0, 30, 10)]
    lower = Lower(
        "lower",
        net,
        torch.optim.Adam(net.parameters(), lr=1e-2),
        train,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.7),
        config=LevelConfig(backend=backend, gradient_accumulation=2),
    )
    upper = Upper(
        "upper",
        weigher,
        torch.optim.Adam(weigher.parameters(), lr=1e-2),
        meta,
        config=LevelConfig(backend=backend, method=method, unroll_steps=3),
    )
    config = EngineConfig(
        max_steps=max_steps, progress_bar=False, log_every=1, checkpoint_dir=str(tmp_path), **engine_kwargs
    )
    return Engine([lower, upper], {"upper": ["lower"]}, config)


def snapshot(engine):
    out = {}
    for name, lv in engine.levels.items():
        out[name] = [p.detach().clone() for p in lv.params]
        out[name + ".opt"] = json.dumps(
            {
                k: {kk: vv.tolist() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                for k, v in lv.optimizer.state_dict()["state"].items()
            }
        )
        out[name + ".lr"] = lv.lr
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], list):
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
@pytest.mark.parametrize("method", ["finite_difference", "sama", "penalty"])
def test_resume_is_bit_identical(tmp_path, method, backend):
    reference = program(tmp_path / "a", method, backend)
    reference.run()
    interrupted = program(tmp_path / "b", method, backend, max_steps=5, save_every=2)
    interrupted.run()  # saves at 2, 4 and at the end, 5
    resumed = program(tmp_path / "b", method, backend)
    assert resumed.load_checkpoint(tmp_path / "b" / "checkpoint-4").name == "checkpoint-4"
    assert resumed.global_step == 4
    history = resumed.run()
    assert_same(snapshot(resumed), snapshot(reference))
    assert [h["step"] for h in history] == list(range(1, 10))
    assert history[-1] == reference.history[-1]


def test_latest_names_the_newest_and_keep_last_prunes(tmp_path):
    engine = program(tmp_path, max_steps=7, save_every=2, keep_last=2)
    engine.run()  # 2, 4, 6, and 7 at the end
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-7"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-7"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    other = program(tmp_path)
    assert other.load_checkpoint().name == "checkpoint-7"  # the checkpoint_dir's latest


def test_a_crash_mid_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    engine = program(tmp_path, max_steps=2)
    engine.run()
    engine.save_checkpoint()
    lower_backend = type(engine.levels["lower"].backend)

    def crash(self, directory):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(lower_backend, "save", crash)
    engine.step()
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-2"
    assert (tmp_path / ".checkpoint-3.partial").exists()  # hidden, no manifest
    with pytest.raises(CheckpointError, match="the last complete checkpoint there is .*checkpoint-2"):
        program(tmp_path).load_checkpoint(tmp_path / ".checkpoint-3.partial")


def test_a_damaged_checkpoint_is_refused_naming_the_last_complete_one(tmp_path):
    engine = program(tmp_path, max_steps=4, save_every=2)
    engine.run()
    victim = next((tmp_path / "checkpoint-4" / "levels" / "lower").rglob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"checkpoint-4 is incomplete or corrupt: .* has \d+ bytes.*checkpoint-2"):
        program(tmp_path).load_checkpoint(tmp_path / "checkpoint-4")
    os.remove(tmp_path / "checkpoint-2" / MANIFEST)
    with pytest.raises(CheckpointError, match="no complete one there"):
        program(tmp_path).load_checkpoint(tmp_path / "checkpoint-2")


def test_a_checkpoint_of_another_program_is_refused_before_loading(tmp_path):
    engine = program(tmp_path, max_steps=2, save_every=2)
    engine.run()
    other = program(tmp_path / "other", hidden=16)
    before = snapshot(other)
    with pytest.raises(
        CheckpointError, match=r"another program: level 'lower': parameters differ .*\[8, 4\].*\[16, 4\]"
    ):
        other.load_checkpoint(tmp_path)
    assert_same(snapshot(other), before)
    torch_backend = program(tmp_path / "torch", backend="torch")
    with pytest.raises(CheckpointError, match="backend 'deepspeed' in the checkpoint, 'torch' here"):
        torch_backend.load_checkpoint(tmp_path)


def test_save_and_load_need_a_place(tmp_path):
    engine = program(tmp_path)
    engine.config = EngineConfig(max_steps=1, progress_bar=False)
    with pytest.raises(ValueError, match="needs a path, or EngineConfig.checkpoint_dir"):
        engine.save_checkpoint()
    with pytest.raises(CheckpointError, match="does not exist"):
        engine.load_checkpoint(tmp_path / "nowhere")
