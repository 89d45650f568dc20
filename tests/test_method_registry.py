"""A hypergradient method registered from a test file, with no change inside ``scalemlo/``: it runs through
``Engine`` and ``ReweightingTrainer``, and what it declares it needs is what ``LevelConfig``, ``Engine`` and
the Trainer check. The tables of what the built-in methods need and allow (docs/methods.md, the README's
"Which method") match their declarations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_hf_scorer import fresh_trainer_state, toy_trainer  # noqa: F401 (fixture)

from scalemlo import LevelConfig, register
from scalemlo.hypergrad.problem import negate
from scalemlo.methods import (
    METHODS,
    get_method,
    large_model_methods,
    methods_help,
    shared_forward_methods,
    unregister,
    which_method_table,
)
from scalemlo.testing import RidgeData, ridge_engine

ROOT = Path(__file__).resolve().parents[1]
DATA = RidgeData.make(features=5, n=40, n_val=30, seed=0)
LOG_LAMBDA = torch.full((5,), -1.0, dtype=torch.float64)


def unrolled_once(problem):
    """One unrolled SGD step through a central difference: ``finite_difference`` written again."""
    w = problem.take_v()
    for t, lr in zip(w, problem.step_lrs()):
        t.mul_(lr)
    return negate(problem.mixed_difference_(w, problem.config.fd_radius))


@pytest.fixture
def toy():
    """``unrolled_once`` registered as "toy", declared unable to share a forward and reading the last step."""
    register("toy", shared_forward=False, reads_last_step=True)(unrolled_once)
    yield "toy"
    unregister("toy")


def test_a_method_of_ones_own_runs_through_the_engine(toy):
    """The same hypergradient as the built-in method it rewrites, bit for bit, on the ridge problem."""
    theta = DATA.solution(LOG_LAMBDA)
    mine = ridge_engine(DATA, LOG_LAMBDA, theta, LevelConfig(method=toy, backend="torch")).hypergradient("hyper")[0]
    builtin = ridge_engine(DATA, LOG_LAMBDA, theta, LevelConfig(method="finite_difference", backend="torch"))
    assert torch.equal(mine, builtin.hypergradient("hyper")[0])
    assert toy in METHODS and toy not in shared_forward_methods()


def test_what_it_declares_is_what_the_checks_read(toy):
    with pytest.raises(ValueError, match=r"shared_forward=True needs a method whose mixed product .*not 'toy'"):
        LevelConfig(method=toy, shared_forward=True)
    # reads_last_step: the level below keeps its last gradients, and must be at ZeRO stage 0
    upper = LevelConfig(method=toy, backend="torch")
    engine = ridge_engine(DATA, LOG_LAMBDA, DATA.solution(LOG_LAMBDA), upper)
    assert engine.levels["model"].keep_last_grads
    low = LevelConfig(deepspeed_config={"zero_optimization": {"stage": 1}})
    with pytest.raises(ValueError, match=r"method 'toy', which needs per-parameter optimizer state"):
        ridge_engine(DATA, LOG_LAMBDA, DATA.solution(LOG_LAMBDA), upper, model_config=low, dtype=torch.float32)


def test_a_declaration_is_checked_and_a_name_is_taken_once(toy):
    with pytest.raises(ValueError, match="is registered twice"):
        register(toy)(unrolled_once)
    with pytest.raises(ValueError, match="double_backward='sometimes' is not known"):
        register("other", double_backward="sometimes")(unrolled_once)
    assert "other" not in METHODS
    with pytest.raises(ValueError, match="unknown hypergradient method 'other'"):
        get_method("other")
    with pytest.raises(ValueError, match=r"precisions=\('fp8',\) must be a non-empty tuple of fp32, bf16, fp16"):
        register("other", precisions=("fp8",))(unrolled_once)
    assert "other" not in METHODS


def test_a_precision_the_method_does_not_allow_is_refused_when_the_engine_is_built():
    register("fp32_only", precisions=("fp32",))(unrolled_once)
    try:
        theta = DATA.solution(LOG_LAMBDA)
        config = LevelConfig(method="fp32_only", backend="torch")
        ridge_engine(DATA, LOG_LAMBDA, theta, config, dtype=torch.float32)  # fp32 (float64 too): allowed
        with pytest.raises(ValueError, match=r"method 'fp32_only', which allows the precisions fp32, but level "):
            ridge_engine(DATA, LOG_LAMBDA, theta, config, dtype=torch.bfloat16)
    finally:
        unregister("fp32_only")


def test_a_dense_hessian_method_is_offered_for_small_models_only():
    register("dense", shared_forward=False, double_backward="always", dense_hessian=True)(unrolled_once)
    try:
        assert "dense" not in large_model_methods() and "exact" not in large_model_methods()
        assert methods_help().endswith("(exact, dense: small models only, a dense Hessian)")
    finally:
        unregister("dense")
    assert methods_help() == "cg, finite_difference, neumann, penalty, sama (exact: small models only, a dense Hessian)"


def test_a_method_of_ones_own_trains_the_reweighting_trainer(tmp_path, toy, fresh_trainer_state):  # noqa: F811
    """The Trainer reads the declaration too: a method reading the last step gets the model's step
    gradients kept (as sama does), and without a shared forward the meta steps are separate."""
    t = toy_trainer(tmp_path, hypergradient_method=toy, shared_forward=False, max_steps=8, meta_warmup_steps=2)
    before = [p.detach().clone() for p in t.reweighter.parameters()]
    t.train()
    assert t._meta_level.steps >= 3
    assert any(not torch.equal(a, b) for a, b in zip(before, t.reweighter.parameters()))
    assert t._model_level.keep_last_grads


def test_the_documented_table_of_needs_matches_the_declarations():
    text = (ROOT / "docs" / "methods.md").read_text()
    header = (
        "| method | shared forward | reads the last step (levels below at ZeRO-0) | double backward (no ZeRO-3 level) |"
    )
    assert header in text
    rows = {}
    for line in text[text.index(header) :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, shared, reads, double = [cell.strip() for cell in line.strip("|").split("|")]
        rows[name.strip("`")] = (shared, reads, double)
    words = {"never": "never", "always": "always", "second_order": 'with `second_order="autograd"`'}
    expected = {
        m.name: ("yes" if m.shared_forward else "no", "yes" if m.reads_last_step else "no", words[m.double_backward])
        for m in METHODS.values()
    }
    assert rows == expected
    assert re.search(r"\| `sama` \| yes \| yes \| never \|", text)


def documented_table(path: Path, header: str) -> str:
    """The markdown table in ``path`` that starts at the line ``header``, a newline after each row."""
    lines = path.read_text().splitlines()
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


@pytest.mark.parametrize("page", ["README.md", "docs/methods.md"])
def test_the_which_method_table_is_rendered_from_the_declarations(page):
    rendered = which_method_table()
    assert documented_table(ROOT / page, rendered.splitlines()[0]) == rendered
    # read by hand from the engine's refusals (docs/distributed.md): sama's levels below at ZeRO-0 only; exact
    # never at ZeRO-3; neumann and cg at ZeRO-3 with differences of gradients only
    rows = {
        line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]] for line in rendered.splitlines()[2:]
    }
    assert set(rows) == set(METHODS)
    assert rows["sama"][:2] == ["0", "0-3"] and rows["exact"][:2] == ["0-2", "0-2"]
    assert rows["cg"][0] == rows["neumann"][0] == '0-3 (0-2 with `second_order="autograd"`)'
    assert rows["finite_difference"][:4] == ["0-3", "0-3", "fp32, bf16, fp16", "yes (above: ZeRO 0-2)"]
    assert rows["penalty"][3] == rows["exact"][3] == "no"
