"""Smoke test of examples/imaml_sinusoid (a few meta-iterations of every system)."""

import math
from pathlib import Path

import examples_helper
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "imaml_sinusoid" / "train.py"


def load_example():
    return examples_helper.load_example("imaml_sinusoid")


def test_smoke_run_meta_learns_through_scalemlo(capsys):
    result = load_example().main(["--smoke"])
    assert "meta-test query MSE" in capsys.readouterr().out
    (run,) = result["runs"]
    assert set(run) == {"random_init", "pretrained", "fomaml", "imaml"}
    steps = result["config"]["inner"]["steps"]
    for system, numbers in run.items():
        assert math.isfinite(numbers["mse_0"]) and math.isfinite(numbers[f"mse_{steps}"]), system
    # one meta step per inner loop: 10 meta-iterations -> 10 hypergradient steps of the meta level
    assert run["imaml"]["meta_steps"] == 10
    # the hypergradient moved phi: the iMAML initialization differs from the random one it started at
    assert run["imaml"]["mse_0"] != run["random_init"]["mse_0"]
    assert run["imaml"]["phi_norm"] != run["random_init"]["phi_norm"]


def test_unknown_config_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (EXAMPLE.parent / "config.yaml").read_text().replace("  lam: 1.0", "  lam: 1.0\n  typo: 3")
    bad.write_text(text)
    with pytest.raises(ValueError, match="unknown keys \\['typo'\\] in 'imaml'"):
        load_example().main(["--config", str(bad), "--smoke"])
