"""Smoke test of examples/darts (DARTS on digits, finite_difference): a few search and retrain steps."""

import math

import examples_helper
import pytest


def load_example():
    return examples_helper.load_example("darts")


def test_smoke_search_moves_alpha_and_derives_an_architecture(capsys):
    example = load_example()
    result = example.main(["--smoke", "--quiet"])
    assert "derived" in capsys.readouterr().out
    ops = result["ops"]
    (run,) = result["runs"]
    assert run["arch_steps"] == example.SMOKE["max_steps"]  # unroll_steps 1: one arch step per weight step
    first, last = run["snapshots"][0]["softmax"], run["final_softmax"]
    assert len(last) == 3 and all(len(row) == len(ops) for row in last)
    for row in last:
        assert math.isclose(sum(row), 1.0, rel_tol=1e-5)
    # alpha starts at 1e-3 * randn (softmax ~ 1/7 everywhere); the hypergradient must have moved it
    moved = max(abs(a - b) for r0, r1 in zip(first, last) for a, b in zip(r0, r1))
    assert moved > 1e-3
    assert len(run["derived"]) == 3 and "zero" not in run["derived"] and set(run["derived"]) <= set(ops)
    for system in ("darts", "random", "uniform_mixture"):
        acc = result["summary"][system]["test_acc"]["mean"]
        assert math.isfinite(acc) and 0.0 <= acc <= 1.0


def test_unknown_config_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"typo": 1}')
    with pytest.raises(ValueError, match="unknown config keys \\['typo'\\]"):
        load_example().main(["--config", str(bad)])
