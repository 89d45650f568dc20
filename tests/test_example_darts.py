"""Tests of examples/darts (DARTS on digits, finite_difference): a few search and retrain steps, and the
direction of the architecture hypergradient against a double-backward reference."""

import math

import examples_helper
import pytest
import torch
import torch.nn.functional as F


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


def darts_reference(weights, arch):
    """DARTS' hypergradient at the current state, by double backward in plain torch.

    grad_alpha L_val(w, alpha) - xi * d^2 L_train / d alpha d w . grad_w L_val(w, alpha), xi = the weights'
    lr, on the batches the engine used last: the direct term and the response, separately.
    """
    (xv, yv), (xt, yt) = arch.current_batch(), weights.current_batch()
    alpha, params = arch.module.alpha, weights.params
    val_loss = F.cross_entropy(weights.module(xv, alpha), yv)
    direct = torch.autograd.grad(val_loss, [alpha], retain_graph=True)[0]
    v = torch.autograd.grad(val_loss, params)
    train_grads = torch.autograd.grad(F.cross_entropy(weights.module(xt, alpha), yt), params, create_graph=True)
    mixed = torch.autograd.grad(sum((g * vi).sum() for g, vi in zip(train_grads, v)), [alpha])[0]
    return direct.detach(), (-weights.lr * mixed).detach()


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_the_hypergradient_points_along_the_double_backward_reference():
    # After 60 search steps of the default config (seed 0) the response term (through the unrolled
    # weight step) is ~3 % of the direct term grad_alpha L_val; both must point the right way.
    # Measured here: cos(total) 0.99997, cos(response) 0.998 (finite-difference error 9 %).
    example = load_example()
    cfg = example.load_config(example.DEFAULT_CONFIG)
    d = cfg["data"]
    splits = example.load_splits(int(d["split_seed"]), int(d["train_size"]), int(d["val_size"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine, weights, arch = example.build_search(cfg, splits, seed=0, max_steps=60)
        engine.run()
        hypergradient = engine.hypergradient("arch")[0]
        with examples_helper.negated_hypergradients():
            negated = engine.hypergradient("arch")[0]
        direct, response = darts_reference(weights, arch)
    finally:
        torch.set_num_threads(threads)
    assert response.norm() > 0.01 * direct.norm()  # the response is large enough for its sign to be checked
    assert cosine(hypergradient, direct + response) > 0.999
    assert cosine(hypergradient - direct, response) > 0.9  # the part through the lower level, on its own
    assert cosine(negated, direct + response) < -0.999  # the check tells a sign-flipped hypergradient apart
