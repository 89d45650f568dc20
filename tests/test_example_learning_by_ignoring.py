"""Smoke test of examples/learning_by_ignoring: a three-level reweight -> pretrain -> finetune program."""

import math
from pathlib import Path

import examples_helper
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "learning_by_ignoring"


def load_example():
    return examples_helper.load_example("learning_by_ignoring")


@pytest.fixture(scope="module")
def smoke():
    return load_example().main(["--smoke", "--quiet", "--seed", "0"])


def test_every_system_reports_finite_metrics(smoke):
    assert set(smoke["summary"]) == {"target_only", "uniform", "oracle", "cg", "neumann"}
    for system, metrics in smoke["summary"].items():
        for key, stat in metrics.items():
            assert math.isfinite(stat["mean"]), (system, key)
        assert 0.0 <= metrics["test_acc"]["mean"] <= 1.0


def test_schedule_of_the_three_levels(smoke):
    # smoke: 60 iterations, pretrain every 2, reweight every 2 x 5 = 10 after a warmup of 20.
    systems = smoke["runs"][0]["systems"]
    for name, r in systems.items():
        assert r["finetune_steps"] == 60
        assert r["pretrain_steps"] == 30
        assert r["reweight_steps"] == (4 if name in ("cg", "neumann") else 0)


def test_learned_weights_move_and_point_the_right_way(smoke):
    run = smoke["runs"][0]
    n_source = run["n_source"]
    for method in ("cg", "neumann"):
        r = run["systems"][method]
        weights = r["weights"]
        assert weights.shape == (n_source,)
        assert float(weights.std()) > 1e-3  # the hypergradient moved them, and not all alike
        # Already after 4 reweight steps the permuted-label examples weigh less than the clean ones.
        assert r["w_harmful"] < r["w_useful"]
        assert r["weight_auc"] > 0.6
    uniform = run["systems"]["uniform"]["weights"]
    assert float(uniform.min()) == float(uniform.max()) == 0.5
    assert run["systems"]["oracle"]["w_harmful"] < 1e-3


def test_unknown_config_key_is_an_error(tmp_path):
    example = load_example()
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  mu: 0.1\n  momentum: 0.9\n")
    with pytest.raises(ValueError, match="momentum"):
        example.main(["--config", str(bad), "--smoke", "--quiet"])
    bad.write_text("methods:\n  cg:\n    method: cg\n    cg_iters: 5\n")
    with pytest.raises(ValueError, match="cg_iters"):
        example.main(["--config", str(bad), "--smoke", "--quiet"])
