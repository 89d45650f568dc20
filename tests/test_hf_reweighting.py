"""Reweighters against hand-written float64 formulas; weight_stats against hand-computed values; the monitor."""

import logging
import math

import pytest
import torch

from scalemlo.hf.reweighting import (
    REWEIGHTERS,
    CollapseMonitor,
    ExampleWeights,
    MetaWeightNet,
    Reweighter,
    SourceWeights,
    build_reweighter,
    source_index,
    weight_stats,
)


def reference_meta_weight_net(net, losses, features=None):
    """sigmoid(W2 relu(W1 x + b1) + b2) / mean, written out in float64 from the module's parameters."""
    first, second = net.net[0], net.net[2]
    x = losses.double()[:, None]
    if features is not None:
        x = torch.cat([x, features.double()], dim=1)
    hidden = torch.relu(x @ first.weight.double().T + first.bias.double())
    raw = torch.sigmoid(hidden @ second.weight.double().T + second.bias.double()).squeeze(-1)
    return raw / raw.mean(), raw


def gradients(output, parameters, upstream):
    return torch.autograd.grad((upstream.to(output.dtype) * output).sum(), parameters)


@pytest.mark.parametrize("n_features", [0, 3])
def test_meta_weight_net_mean_one_and_gradients_match_reference(n_features):
    torch.manual_seed(0)
    net = MetaWeightNet(hidden_size=7, n_features=n_features, centered=False, uniform_start=False)  # the original
    losses = torch.rand(10) * 5
    batch = {"features": torch.randn(10, 3)} if n_features else {}
    weights = net.weights(losses, batch)
    expected, expected_raw = reference_meta_weight_net(net, losses, batch.get("features"))
    assert weights.shape == (10,) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.last_raw.double(), expected_raw, rtol=1e-6, atol=1e-6)
    assert net.requires == (("features",) if n_features else ())

    upstream = torch.randn(10)  # Σ wᵢ is constant (= B), so weight the outputs unevenly
    parameters = list(net.parameters())
    ours = gradients(net.weights(losses, batch), parameters, upstream)
    theirs = gradients(expected, parameters, upstream.double())  # through the mean as well
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # both float32: grads take the parameter dtype
    assert any(g.abs().sum() > 0 for g in ours)


def test_meta_weight_net_reaches_no_input():
    torch.manual_seed(1)
    net = MetaWeightNet(hidden_size=5, n_features=2)
    losses = torch.rand(6, requires_grad=True)  # a caller who forgot to detach
    features = torch.randn(6, 2, requires_grad=True)
    weights = net.weights(losses, {"features": features})
    assert not weights.is_leaf and weights.requires_grad
    grads = torch.autograd.grad((weights * torch.randn(6)).sum(), [losses, features], allow_unused=True)
    assert grads == (None, None)


def test_meta_weight_net_sum_is_constant_so_only_relative_weights_learn():
    torch.manual_seed(2)
    net = MetaWeightNet(hidden_size=4, uniform_start=False)
    total = net.weights(torch.rand(8) * 3, {}).sum()
    torch.testing.assert_close(total, torch.tensor(8.0))
    for grad in torch.autograd.grad(total, list(net.parameters())):
        assert grad.abs().max() < 1e-6


def test_centered_meta_weight_net_starts_uniform_and_cannot_saturate():
    torch.manual_seed(3)
    net = MetaWeightNet(hidden_size=6)  # the defaults: centred, uniform start
    losses = torch.rand(9) * 4
    torch.testing.assert_close(net.weights(losses, {}), torch.ones(9))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 30.0)  # far into saturation for a plain sigmoid
    weights = net.weights(losses, {})
    z = net.net(losses[:, None]).squeeze(-1).double()
    raw = torch.sigmoid(z - z.median())
    torch.testing.assert_close(weights.double(), raw / raw.mean(), rtol=1e-6, atol=1e-6)
    assert (raw >= 0.5).sum() >= 5 and (raw <= 0.5).sum() >= 5  # half the batch on either side of 1/2
    assert float(weights.max()) <= 4.0 + 1e-6
    assert net.net[-1].bias is None  # a shift of every output is invisible after centring: no bias to learn it


def test_meta_weight_net_describe_is_the_sigmoid_curve():
    net = MetaWeightNet(hidden_size=3, centered=False, uniform_start=False)
    curve = net.describe(losses=(0.0, 2.0))
    _, raw = reference_meta_weight_net(net, torch.tensor([0.0, 2.0]))
    assert list(curve) == ["meta_weight_net/raw_at_loss/0", "meta_weight_net/raw_at_loss/2"]
    assert list(curve.values()) == pytest.approx(raw.tolist(), rel=1e-6)


def test_source_weights_uniform_start_and_softmax():
    weights = SourceWeights(["web", "code", "books", "code"])
    assert weights.names == ["books", "code", "web"]  # distinct, sorted
    batch = {"source": weights.index_of(["web", "books", "code", "code"])}
    assert batch["source"].tolist() == [2, 0, 1, 1]
    torch.testing.assert_close(weights.weights(torch.rand(4), batch), torch.ones(4))
    assert weights.source_weights() == pytest.approx({"books": 1 / 3, "code": 1 / 3, "web": 1 / 3})

    with torch.no_grad():
        weights.logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    alpha = torch.softmax(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0)
    assert sum(weights.source_weights().values()) == pytest.approx(1.0)
    assert weights.describe() == pytest.approx({f"alpha/{n}": a for n, a in zip(weights.names, alpha.tolist())})
    torch.testing.assert_close(weights.weights(torch.rand(4), batch).double(), 3 * alpha[[2, 0, 1, 1]])


def test_source_weights_on_a_balanced_batch_is_doremis_objective_and_gradient():
    torch.manual_seed(3)
    weights = SourceWeights(3)
    assert weights.names == ["0", "1", "2"]
    with torch.no_grad():
        weights.logits.copy_(torch.randn(3))
    sources = torch.tensor([0, 1, 2, 2, 1, 0])  # every source twice
    losses = torch.rand(6) * 4
    objective = (weights.weights(losses, {"source": sources}) * losses).mean()
    logits = weights.logits.detach().double().requires_grad_()
    alpha = torch.softmax(logits, 0)
    per_source = torch.stack([losses[sources == s].double().mean() for s in range(3)])
    expected = (alpha * per_source).sum()  # Σ_s α_s L̄_s
    torch.testing.assert_close(objective.double(), expected, rtol=1e-6, atol=1e-7)
    (ours,) = torch.autograd.grad(objective, weights.logits)
    (theirs,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-7)


def test_source_mapping_errors():
    with pytest.raises(ValueError, match=r"unknown source names \['wiki'\].*knows \['books', 'code'\]"):
        SourceWeights(["code", "books"]).index_of(["code", "wiki"])
    with pytest.raises(ValueError, match="one string"):
        SourceWeights("code")
    with pytest.raises(ValueError, match="non-empty"):
        SourceWeights([])
    with pytest.raises(ValueError, match=">= 1"):
        SourceWeights(0)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        SourceWeights(["a", "b"]).weights(torch.rand(2), {"source": torch.tensor([0, 2])})
    with pytest.raises(ValueError, match="integer indices"):
        SourceWeights(["a", "b"]).weights(torch.rand(2), {"source": torch.tensor([0.0, 1.0])})
    assert source_index(["b", "a", "b", "c"]) == {"a": 0, "b": 1, "c": 2}


def test_example_weights_start_at_one_and_learn_only_the_batch_logits():
    weights = ExampleWeights(10)
    ids = torch.tensor([7, 2, 2, 9])
    torch.testing.assert_close(weights.weights(torch.rand(4), {"id": ids}), torch.ones(4))
    with torch.no_grad():
        weights.logits.copy_(torch.linspace(-2, 2, 10))
    out = weights.weights(torch.rand(4), {"id": ids})
    logits = weights.logits.detach().double().requires_grad_()
    raw = torch.sigmoid(logits[ids])
    expected = raw / raw.mean()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.mean(), torch.tensor(1.0))
    upstream = torch.tensor([1.0, -0.5, 2.0, 0.3])
    (ours,) = gradients(out, [weights.logits], upstream)
    (theirs,) = gradients(expected, [logits], upstream.double())
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-7)
    untouched = [i for i in range(10) if i not in (2, 7, 9)]
    assert ours[untouched].abs().sum() == 0 and ours[[2, 7, 9]].abs().min() > 0
    torch.testing.assert_close(weights.example_weights().mean(), torch.tensor(1.0))
    assert weights.describe()["example_weights/fraction_below_half"] == pytest.approx(0.5)


def test_a_user_reweighter_and_base_class_checks():
    class InverseLoss(Reweighter):
        requires = ("source",)

        def raw_weights(self, losses, batch):
            return 1 / (1 + losses) * self.scale

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

    reweighter = InverseLoss()
    losses = torch.tensor([0.0, 1.0, 3.0])
    weights = reweighter(losses, {"source": torch.zeros(3)})  # forward == weights
    raw = torch.tensor([1.0, 0.5, 0.25])
    torch.testing.assert_close(weights, raw / raw.mean())
    torch.testing.assert_close(reweighter.last_raw, raw)
    with pytest.raises(ValueError, match=r"needs batch columns \['source'\].*remove_unused_columns=False"):
        reweighter.weights(losses, {"id": torch.zeros(3)})
    with pytest.raises(ValueError, match="1-D floating tensor"):
        reweighter.weights(losses[None], {"source": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"batch\['features'\] must be floating \[B, n_features\] = \[3, 2\]"):
        MetaWeightNet(n_features=2).weights(losses, {"features": torch.zeros(3, 3)})


def test_registry_and_factory():
    assert set(REWEIGHTERS) == {"meta_weight_net", "source", "example", "scorer"}
    assert isinstance(build_reweighter("meta_weight_net"), MetaWeightNet)
    assert build_reweighter("meta_weight_net").net[0].out_features == 100  # Meta-Weight-Net's default
    assert build_reweighter("source", sources=["a", "b"]).names == ["a", "b"]
    assert build_reweighter("example", n_examples=5).logits.shape == (5,)
    with pytest.raises(ValueError, match=r"unknown reweighter 'doremi'; choose one of \['example', 'meta_weight_net'"):
        build_reweighter("doremi")
    with pytest.raises(ValueError, match=r"reweighter 'source' needs \['sources'\]"):
        build_reweighter("source")
    with pytest.raises(ValueError, match=r"does not take \['hidden'\]; it takes .*'hidden_size'"):
        build_reweighter("meta_weight_net", hidden=10)
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1"):
        build_reweighter("meta_weight_net", hidden_size=0)


def test_weight_stats_uniform_and_one_hot():
    uniform = weight_stats(torch.ones(8))
    assert uniform["weight/ess"] == pytest.approx(8) and uniform["weight/ess_ratio"] == pytest.approx(1)
    assert uniform["weight/entropy"] == pytest.approx(math.log(8))
    assert uniform["weight/entropy_normalized"] == pytest.approx(1)
    assert uniform["weight/max_share"] == pytest.approx(1 / 8)
    one_hot = weight_stats(torch.tensor([0.0, 0, 8, 0, 0, 0, 0, 0]))
    assert one_hot["weight/ess"] == pytest.approx(1) and one_hot["weight/ess_ratio"] == pytest.approx(1 / 8)
    assert one_hot["weight/entropy"] == 0 and one_hot["weight/max_share"] == 1
    assert (one_hot["weight/min"], one_hot["weight/mean"], one_hot["weight/max"]) == (0, 1, 8)


def test_weight_stats_hand_computed_with_sources():
    stats = weight_stats(
        torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0, 0, 2, 2]), ["a", "b", "c"], raw=torch.tensor([0.1, 0.9])
    )
    p = [1 / 6, 2 / 6, 3 / 6]
    assert stats["weight/entropy"] == pytest.approx(-sum(x * math.log(x) for x in p))
    assert stats["weight/entropy_normalized"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(4))
    assert stats["weight/ess"] == pytest.approx(36 / 14) and stats["weight/ess_ratio"] == pytest.approx(36 / 56)
    assert stats["weight/source/a"] == pytest.approx(1.5) and stats["weight/source/c"] == pytest.approx(1.5)
    assert "weight/source/b" not in stats  # absent from the batch
    assert stats["weight/max_source_share"] == pytest.approx(0.5) and stats["weight/sources_present"] == 2
    assert (stats["weight/raw_min"], stats["weight/raw_max"]) == pytest.approx((0.1, 0.9))
    assert "weight/source/2" in weight_stats(torch.ones(4), torch.tensor([0, 0, 2, 2]))  # names default to indices


def test_weight_stats_edge_cases():
    single = weight_stats(torch.tensor([0.7]))
    assert (single["weight/ess"], single["weight/ess_ratio"], single["weight/entropy"]) == (1, 1, 0)
    assert single["weight/entropy_normalized"] == 1
    zeros = weight_stats(torch.zeros(4), torch.tensor([0, 1, 1, 0]))
    assert all(math.isfinite(v) for v in zeros.values())
    assert zeros["weight/ess"] == 0 and zeros["weight/entropy"] == 0 and zeros["weight/max_share"] == 0
    with pytest.raises(ValueError, match="non-negative"):
        weight_stats(torch.tensor([1.0, -0.1]))
    with pytest.raises(ValueError, match=r"sources must be \[B\] = \[2\]"):
        weight_stats(torch.ones(2), torch.tensor([0, 1, 1]))


WARNING_LOGGER = "scalemlo.hf.reweighting"


def collapse_warnings(caplog):
    return [r for r in caplog.records if r.name == WARNING_LOGGER and r.levelno == logging.WARNING]


def test_monitor_quiet_for_healthy_weights(caplog):
    torch.manual_seed(4)
    monitor = CollapseMonitor()
    net = MetaWeightNet(hidden_size=8)
    with caplog.at_level(logging.WARNING, logger=WARNING_LOGGER):
        for _ in range(5):
            weights = net.weights(torch.rand(16) * 4, {})
            assert not monitor.update(weight_stats(weights, raw=net.last_raw))
        assert not monitor.update(weight_stats(torch.tensor([0.4, 1.6])))  # B = 2: uneven but not collapsed
        sources = torch.tensor([0, 1, 0, 1])
        assert not monitor.update(weight_stats(torch.tensor([1.6, 0.4, 1.6, 0.4]), sources))
    assert collapse_warnings(caplog) == [] and not monitor.warned


@pytest.mark.parametrize(
    "stats, reason",
    [
        (weight_stats(torch.tensor([0.0] * 15 + [16.0])), "effective sample size"),
        (weight_stats(torch.tensor([0.01, 0.01, 3.0])), "one example holds"),
        (weight_stats(torch.tensor([0.1, 0.1, 1.9, 1.9]), torch.tensor([0, 0, 1, 1])), "one source holds"),
        (weight_stats(torch.ones(4), raw=torch.full((4,), 1e-5)), "every raw weight is below"),
    ],
)
def test_monitor_warns_once_naming_the_collapse_and_the_fix(caplog, stats, reason):
    monitor = CollapseMonitor(threshold_ess=0.1, threshold_max_share=0.9, raw_epsilon=1e-3, threshold_source_share=0.9)
    with caplog.at_level(logging.WARNING, logger=WARNING_LOGGER):
        assert monitor.update(stats)
        assert monitor.update(stats)  # still collapsed, but no second warning
        assert not monitor.update(weight_stats(torch.ones(16)))
        assert monitor.update(stats)
    (record,) = collapse_warnings(caplog)
    message = record.getMessage()
    assert reason in message and reason in monitor.reasons[0]
    assert "learning rate" in message and "warm" in message and "normalisation" in message


def test_monitor_argument_checks():
    with pytest.raises(ValueError, match="0 < threshold_ess < 1"):
        CollapseMonitor(threshold_ess=1.5)
