"""Resume, exactly, for every method the Trainer allows: one process, ZeRO-0.

Each case runs the same ReweightingTrainer twice under DeepSpeed's ZeRO-0 (a checkpoint after every step):
once uninterrupted, once stopped after a step drawn at random (seeded by the case's name, shown in its test
id) and resumed from that step's checkpoint by a fresh trainer. The resumed run must end bit-identical to
the uninterrupted one: every model parameter and every weighting-model parameter ``torch.equal``, and the
exports of the last checkpoint (``weights.json``, ``example_weights.csv``, ``source_weights.csv``) equal
byte for byte. unroll_steps 1: every stop leaves a meta step due, which a shared forward takes inside
the next step, after the resume.

The matrix is the full product: every method the Trainer allows x shared forward on and off x every
reweighting scheme (about 2 s a case on a CPU: a tiny GPT-2, 5 steps; 80 s the file). A method that cannot
share the forward is refused by the arguments themselves (``LevelConfig``); such a case skips, and
``test_the_methods_that_share_a_forward_are_accepted`` keeps the known ones from being skipped. ZeRO-3 on
two ranks: the ``trainer_resume`` cases of ``tests/distributed/zero_suite.py``, checked in
``tests/test_distributed_zero.py``.
"""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch
from test_hf_trainer import ds, fresh_trainer_state, trainer  # noqa: F401 (fixture)
from test_hf_trainer_exports import StopAt

from scalemlo.hf import ReweightingArguments, ReweightingTrainer, reset_trainer_state
from scalemlo.hf.reweighting import REWEIGHTERS
from scalemlo.hypergrad import METHODS
from scalemlo.methods import shared_forward_methods

# exact: the Trainer leaves LevelConfig.exact_max_params at 4096, so it refuses any language model at the
# first meta step; it is not a method a Trainer run can use.
TRAINER_METHODS = sorted(set(METHODS) - {"exact"})
EXPORTS = ("weights.json", "example_weights.csv", "source_weights.csv")
MAX_STEPS = 5
# few inner iterations: what is checked is the resume, not the hypergradient's accuracy
SETTINGS = {"neumann_iterations": 2, "cg_iterations": 2, "unroll_steps": 1}


def stop_step(name: str) -> int:
    """The step after which the interrupted run stops: drawn in 1..MAX_STEPS-1, seeded by the case's name."""
    return random.Random(zlib.crc32(name.encode())).randint(1, MAX_STEPS - 1)


def cases() -> list:
    out = []
    for method, shared, scheme in itertools.product(TRAINER_METHODS, (True, False), sorted(REWEIGHTERS)):
        name = f"{method}-{'shared' if shared else 'unshared'}-{scheme}"
        out.append(pytest.param(method, shared, scheme, stop_step(name), id=f"{name}-stop{stop_step(name)}"))
    return out


def run(
    directory, method: str, shared: bool, scheme: str, stop: int | None = None, resume_from=None
) -> ReweightingTrainer:
    reset_trainer_state()  # each run as in a new process, as far as the Trainer's global state goes
    t = trainer(
        directory,
        deepspeed=ds(0),
        max_steps=MAX_STEPS,
        reweighting=scheme,
        hypergradient_method=method,
        shared_forward=shared,
        save_strategy="steps",
        save_steps=1,
        **SETTINGS,
    )
    t.initial_weighting = weighting_state(t)[1]
    if stop is not None:
        t.add_callback(StopAt(stop))
    t.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return t


def differing(a: list[torch.Tensor], b: list[torch.Tensor], names: list[str]) -> list[str]:
    assert len(a) == len(b) == len(names)
    return [n for n, x, y in zip(names, a, b) if not torch.equal(x, y)]


def model_state(t: ReweightingTrainer) -> tuple[list[str], list[torch.Tensor]]:
    named = [(n, p.detach().clone()) for n, p in t.model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def weighting_state(t: ReweightingTrainer) -> tuple[list[str], list[torch.Tensor]]:
    named = [(n, p.detach().clone()) for n, p in t.reweighter.named_parameters()]
    return [n for n, _ in named], [p for _, p in named]


@pytest.mark.parametrize("method, shared, scheme, stop", cases())
def test_a_stopped_run_resumes_bit_for_bit(tmp_path, method, shared, scheme, stop):
    try:
        uninterrupted = run(tmp_path / "uninterrupted", method, shared, scheme)
    except ValueError as exc:
        if shared and "shared_forward=True needs a method" in str(exc):
            pytest.skip(f"{method} does not share the forward (refused by the arguments: {exc})")
        raise
    first = run(tmp_path / "run", method, shared, scheme, stop=stop)
    assert first.state.global_step == stop
    checkpoint = tmp_path / "run" / f"checkpoint-{stop}"
    resumed = run(tmp_path / "run", method, shared, scheme, resume_from=checkpoint)
    where = f"{method}, shared_forward {shared}, {scheme}, stopped after step {stop} of {MAX_STEPS}"
    assert resumed.state.global_step == uninterrupted.state.global_step == MAX_STEPS
    assert resumed._meta_level.steps == uninterrupted._meta_level.steps > 0, where
    names, reference = model_state(uninterrupted)
    assert not differing(model_state(resumed)[1], reference, names), f"model parameters differ: {where}"
    names, reference = weighting_state(uninterrupted)
    assert differing(uninterrupted.initial_weighting, reference, names), f"the weighting did not learn: {where}"
    assert not differing(weighting_state(resumed)[1], reference, names), f"weighting parameters differ: {where}"
    for export in EXPORTS:
        expected = (tmp_path / "uninterrupted" / f"checkpoint-{MAX_STEPS}" / export).read_bytes()
        got = (tmp_path / "run" / f"checkpoint-{MAX_STEPS}" / export).read_bytes()
        assert got == expected, f"{export} differs: {where}"


def test_the_methods_that_share_a_forward_are_accepted(tmp_path):
    """The arguments decide which methods share the forward (the matrix skips the others); the four that
    scalemlo.config names must be among the accepted, so none of their resume cases is skipped."""
    accepted = set()
    for method in TRAINER_METHODS:
        try:
            ReweightingArguments(
                output_dir=str(tmp_path), hypergradient_method=method, shared_forward=True, use_cpu=True, report_to=[]
            )
            accepted.add(method)
        except ValueError as exc:
            assert "shared_forward=True needs a method" in str(exc)
    assert accepted == set(shared_forward_methods()) and {"finite_difference", "sama", "neumann", "cg"} <= accepted
