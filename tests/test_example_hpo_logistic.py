"""Smoke test of the Quickstart job, examples/hpo_logistic (a few steps)."""

import math

import examples_helper
import pytest


def load_example():
    return examples_helper.load_example("hpo_logistic")


def test_a_few_steps_learn_something(capsys):
    example = load_example()
    result = example.main(["--max-steps", "40"])
    out = capsys.readouterr().out
    assert "val_loss before=" in out
    assert result["hyper_steps"] >= 1
    for split in ("before", "after"):
        assert all(math.isfinite(v) for v in result[split].values())
    learned = result["learned_log_decay"]
    assert len(learned) == 30
    assert max(learned) - min(learned) > 1e-4  # per-feature decays moved apart: the hypergradient reached them


def test_unknown_config_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"seed": 0, "typo": 1}')
    with pytest.raises(ValueError, match="unknown config keys \\['typo'\\]"):
        load_example().main(["--config", str(bad)])
