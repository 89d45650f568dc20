"""Tests of examples/learning_by_ignoring, a three-level reweight -> pretrain -> finetune program: smoke run,
the hypergradient's direction, and the per-rank losses of a launch on several ranks."""

import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import examples_helper
import pytest
import torch

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


@contextlib.contextmanager
def negated_hypergradient_of(owner: str):
    """Like examples_helper.negated_hypergradients, but only the hypergradient of level ``owner``.

    Here pretrain also steps through the coordinator (it has finetune below it), on a
    hypergradient that is just its own loss' gradient; negating that too would make it
    ascend its loss and wreck every system, the uniform one included.
    """
    from scalemlo.hypergrad.coordinator import Coordinator

    original = Coordinator.hypergradient

    def flipped(self, owner_name, *args, **kwargs):
        grads = original(self, owner_name, *args, **kwargs)
        return [-g for g in grads] if owner_name == owner else grads

    Coordinator.hypergradient = flipped
    try:
        yield
    finally:
        Coordinator.hypergradient = original


def test_the_reweight_hypergradient_lowers_the_target_validation_loss_and_its_negation_raises_it():
    # 120 iterations (warmup 30, 9 reweight steps), seed 0. The top level's objective is the fine-tuned
    # model's cross-entropy on the target validation set. Measured: uniform weights 0.809; learned with
    # the true hypergradient 0.717 (cg) / 0.719 (neumann); with the reweight hypergradient negated
    # 0.917 / 0.910, and the weights then favour the harmful examples (AUC 0.24 / 0.03).
    example = load_example()
    argv = ["--max-steps", "120", "--quiet", "--seed", "0", "--systems", "uniform", "cg", "neumann"]
    true = example.main(argv)["runs"][0]["systems"]
    with negated_hypergradient_of("reweight"):
        flipped = example.main(argv)["runs"][0]["systems"]
    uniform = true["uniform"]["val_loss"]
    assert flipped["uniform"]["val_loss"] == uniform  # only the reweight level's hypergradient was negated
    for method in ("cg", "neumann"):
        assert true[method]["reweight_steps"] == flipped[method]["reweight_steps"] == 9
        assert true[method]["val_loss"] < uniform - 0.05, method
        assert flipped[method]["val_loss"] > uniform + 0.05, method
        assert true[method]["weight_auc"] > 0.7 and flipped[method]["weight_auc"] < 0.3, method


def test_unknown_config_key_is_an_error(tmp_path):
    example = load_example()
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  mu: 0.1\n  momentum: 0.9\n")
    with pytest.raises(ValueError, match="momentum"):
        example.main(["--config", str(bad), "--smoke", "--quiet"])
    bad.write_text("methods:\n  cg:\n    method: cg\n    cg_iters: 5\n")
    with pytest.raises(ValueError, match="cg_iters"):
        example.main(["--config", str(bad), "--smoke", "--quiet"])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_rank_parts_average_to_the_one_process_losses(monkeypatch, ranks, normalize):
    """On N ranks each level's loss is its rank's part; their average must be the one-process loss.

    The library averages every level's gradients (and second-order products) over ranks, so
    losses whose average over ranks is the one-process loss, as a function of every level's
    parameters, give the one-process program. 1167 source examples: uneven shares for N = 2, 3, 4.
    """
    example = load_example()
    domains = example.make_domains(example.load_config(EXAMPLE / "config.yaml"), seed=0)
    torch.manual_seed(0)
    net_b, net_c = example.make_model(8), example.make_model(8)  # a hidden layer: nothing is linear
    weigher = example.SourceLogits(len(domains["harmful"]), 0.0)
    with torch.no_grad():
        weigher.logits.normal_()
    reweight = SimpleNamespace(level=lambda name: net_c)
    pretrain = SimpleNamespace(module=net_b, uppers={"reweight": weigher}, weight_decay=1e-3, normalize=normalize)
    finetune = SimpleNamespace(module=net_c, uppers={"pretrain": SimpleNamespace(module=net_b)}, mu=0.1)
    params = [*net_b.parameters(), *net_c.parameters(), weigher.logits]

    def losses_and_grads():
        losses = [
            example.Reweight.training_step(reweight, domains["val"]),
            example.Pretrain.training_step(pretrain, domains["source"]),
            example.Finetune.training_step(finetune, domains["target"]),
        ]
        out = []
        for loss in losses:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out.append([loss.detach()] + [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        return out

    one_process = losses_and_grads()
    monkeypatch.setattr(example, "world_size", lambda: ranks)
    parts = []
    for r in range(ranks):
        monkeypatch.setattr(example, "rank", lambda r=r: r)
        assert example.share(1167).stop - example.share(1167).start in (1167 // ranks, 1167 // ranks + 1)
        parts.append(losses_and_grads())
    for level, one in enumerate(one_process):
        for k, expected in enumerate(one):
            average = sum(part[level][k] for part in parts) / ranks
            torch.testing.assert_close(average, expected, rtol=1e-5, atol=1e-7, msg=f"level {level} tensor {k}")
