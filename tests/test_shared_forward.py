"""LevelConfig.shared_forward: the reweighting estimator that shares the lower level's forward.

The references are written out with autograd in float64 and share no code with the
estimator: the detach-aware mixed product of the training dynamics,

    -(d/dλ) mean_i m_λ(s_i) (∇ℓ_i · w),    s_i = ℓ_i(θ) held fixed,

with ∇ℓ_i · w from a double backward, for the w each method builds.
"""

import pytest
import torch
import torch.nn.functional as F

from scalemlo import Engine, EngineConfig, Level, LevelConfig
from scalemlo.hypergrad import problem as problem_module
from scalemlo.hypergrad.shared_forward import SharedForward

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

VOCAB, LR, META_LR, REG = 61, 0.05, 0.1, 2.5


def tiny_gpt2(dtype, layers=2, width=32, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).to(dtype)


def weight_net(dtype, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def per_example(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def weights_of(net, losses):
    return 2 * torch.sigmoid(net(losses.unsqueeze(1).to(next(net.parameters()).dtype)).squeeze(1))


class Model(Level):
    def per_example_losses(self, batch):
        return per_example(self.module, batch)

    def example_weights(self, batch, losses):
        return weights_of(self.uppers["meta"].module, losses)


class ConvexModel(Model):
    """Per-example losses plus 0.5 c |θ|² each: a positive-definite Hessian, for conjugate gradients."""

    def per_example_losses(self, batch):
        return per_example(self.module, batch) + REG * sum((p * p).sum() for p in self.params)


class Meta(Level):
    def training_step(self, batch):
        return per_example(self.lowers["model"].module, batch).mean()


def data(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (8, 20), generator=g) for _ in range(n)], [
        torch.randint(0, VOCAB, (6, 20), generator=g) for _ in range(n)
    ]


def program(
    dtype=torch.float64,
    method="finite_difference",
    optimizer="sgd",
    shared=True,
    layers=2,
    width=32,
    steps=1,
    model_cls=None,
    **config,
):
    lm, net = tiny_gpt2(dtype, layers, width), weight_net(dtype)
    train, meta = data()
    make = (lambda p: torch.optim.SGD(p, lr=LR)) if optimizer == "sgd" else (lambda p: torch.optim.Adam(p, lr=1e-3))
    model = (model_cls or Model)("model", lm, make, train, config=LevelConfig(backend="torch"))
    upper = Meta(
        "meta",
        net,
        lambda p: torch.optim.SGD(p, lr=META_LR),
        meta,
        config=LevelConfig(backend="torch", method=method, shared_forward=shared, **config),
    )
    return Engine([model, upper], {"meta": ["model"]}, EngineConfig(max_steps=steps, progress_bar=False, log_every=0))


def mixed_reference(lm, net, batch, w, reg=0.0):
    """-(d/dλ) mean_i m_λ(s_i) (∇ℓ_i · w) in float64, s_i = ℓ_i(θ) held; ``reg``: ConvexModel's term."""
    lm64 = tiny_gpt2(torch.float64, lm.config.n_layer, lm.config.n_embd)
    lm64.load_state_dict({k: v.double() for k, v in lm.state_dict().items()})
    net64 = weight_net(torch.float64)
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    params = list(lm64.parameters())
    losses = per_example(lm64, batch) + reg * sum((p * p).sum() for p in params)
    z = torch.ones_like(losses, requires_grad=True)
    grads = torch.autograd.grad((z * losses).sum(), params, create_graph=True)
    (slopes,) = torch.autograd.grad(sum((g * wi.double()).sum() for g, wi in zip(grads, w)), z)  # ∇ℓ_i · w
    out = torch.autograd.grad(-(weights_of(net64, losses.detach()) * slopes).mean(), list(net64.parameters()))
    return torch.cat([o.flatten() for o in out])


def shared_hypergradient(engine, monkeypatch):
    """The meta level's hypergradient with the model's next batch shared, and the w the method built."""
    captured = []
    original = problem_module.ResponseProblem.mixed_difference_

    def capture(self, w, radius):
        captured.append([t.detach().clone() for t in w])
        return original(self, w, radius)

    monkeypatch.setattr(problem_module.ResponseProblem, "mixed_difference_", capture)
    model = engine.levels["model"]
    shared = SharedForward(model, model.next_batch())
    grads = engine.coordinator.hypergradient("meta", engine.levels["meta"].next_batch(), shared=shared)
    return torch.cat([g.flatten() for g in grads]).double(), captured[-1], shared


def relative_error(got, ref):
    return float((got - ref).norm() / ref.norm()), float(got @ ref / (got.norm() * ref.norm()))


@pytest.mark.parametrize(
    "method, optimizer, extra",
    [
        ("finite_difference", "sgd", {}),
        ("sama", "adam", {}),
        ("neumann", "sgd", {"neumann_iterations": 3}),
        ("cg", "sgd", {"cg_iterations": 3, "second_order": "finite_difference", "model_cls": ConvexModel}),
    ],
)
def test_float64_estimator_matches_detach_aware_reference(method, optimizer, extra, monkeypatch):
    engine = program(method=method, optimizer=optimizer, **extra)
    engine.step_level("model")  # an optimizer step first: sama reads its state
    got, w, shared = shared_hypergradient(engine, monkeypatch)
    assert float(torch.cat([t.flatten() for t in w]).norm()) > 0
    reg = REG if extra.get("model_cls") is ConvexModel else 0.0
    ref = mixed_reference(engine.levels["model"].module, engine.levels["meta"].module, shared.batch, w, reg)
    err, cos = relative_error(got, ref)
    assert err <= 1e-3 and cos > 0.999999, (method, err, cos)


def test_finite_difference_w_is_the_coming_steps_lr_times_the_meta_gradient(monkeypatch):
    engine = program()
    model = engine.levels["model"]
    model.optimizer.param_groups[0]["lr"] = 0.02  # the coming step's lr, not the last step's (none yet)
    _, w, _ = shared_hypergradient(engine, monkeypatch)
    v = torch.autograd.grad(per_example(model.module, engine.levels["meta"].current_batch()).mean(), model.params)
    assert all(torch.allclose(a, 0.02 * b, rtol=1e-12, atol=1e-15) for a, b in zip(w, v))


@pytest.mark.parametrize("layers, width, bound", [(2, 32, 2e-2), (4, 64, 2e-2)])
def test_float32_estimator_close_to_reference(layers, width, bound, monkeypatch):
    """float32: the default radius 1e-3 balances truncation (linear in r) against rounding; the
    error is almost one factor for every example (cosine 1 - 1e-9), a scale more than a turn."""
    engine = program(torch.float32, layers=layers, width=width)
    got, w, shared = shared_hypergradient(engine, monkeypatch)
    ref = mixed_reference(engine.levels["model"].module, engine.levels["meta"].module, shared.batch, w)
    err, cos = relative_error(got, ref)
    assert err <= bound and cos > 0.9999, (err, cos)


def test_central_difference_option_is_second_order(monkeypatch):
    errors = []
    for radius in (1e-2, 1e-3):
        engine = program(shared_forward_difference="central", fd_radius=radius)
        got, w, shared = shared_hypergradient(engine, monkeypatch)
        ref = mixed_reference(engine.levels["model"].module, engine.levels["meta"].module, shared.batch, w)
        errors.append(relative_error(got, ref)[0])
    assert 70 < errors[0] / errors[1] < 130 and errors[0] < 1e-3, errors


def test_truncation_error_is_linear_in_the_radius(monkeypatch):
    errors = []
    for radius in (1e-2, 1e-3):
        engine = program(shared_forward_radius=radius)
        got, w, shared = shared_hypergradient(engine, monkeypatch)
        ref = mixed_reference(engine.levels["model"].module, engine.levels["meta"].module, shared.batch, w)
        errors.append(relative_error(got, ref)[0])
    assert 7 < errors[0] / errors[1] < 13, errors


def test_hypergradient_leaves_parameters_and_keeps_the_graph_usable(monkeypatch):
    engine = program()
    model = engine.levels["model"]
    before = [p.detach().clone() for p in model.params]
    _, _, shared = shared_hypergradient(engine, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.params))
    # the kept graph (whose saved tensors include the parameters) still differentiates, to the
    # gradient of a fresh forward
    kept = torch.autograd.grad(shared.losses.sum(), model.params)
    fresh = torch.autograd.grad(per_example(model.module, shared.batch).sum(), model.params)
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh))


def manual_run(steps, radius=1e-5):
    """The 7-unit algorithm written out: meta gradient, shared forward, one moved forward,
    upper step, then the lower step with the new weights."""
    lm, net = tiny_gpt2(torch.float64), weight_net(torch.float64)
    train, meta = data()
    theta, lam = list(lm.parameters()), list(net.parameters())
    for t in range(steps):
        batch, meta_batch = train[t % len(train)], meta[t % len(meta)]
        v = torch.autograd.grad(per_example(lm, meta_batch).mean(), theta)
        w = [LR * g for g in v]
        losses = per_example(lm, batch)
        eps = radius / float(torch.sqrt(sum((x * x).sum() for x in w)))
        with torch.no_grad():  # through .data: the graph of `losses` saved the parameters
            saved = [p.clone() for p in theta]
            for p, d in zip(theta, w):
                p.data.add_(d, alpha=eps)
            moved = per_example(lm, batch)
            for p, s in zip(theta, saved):
                p.data.copy_(s)
        slopes = (moved - losses.detach()) / eps
        hyper = torch.autograd.grad(-(weights_of(net, losses.detach()) * slopes).mean(), lam)
        with torch.no_grad():
            for p, g in zip(lam, hyper):
                p.sub_(META_LR * g)
        with torch.no_grad():
            weights = weights_of(net, losses.detach())
        grads = torch.autograd.grad((weights * losses).mean(), theta)
        with torch.no_grad():
            for p, g in zip(theta, grads):
                p.sub_(LR * g)
    return theta, lam


def test_engine_loop_is_the_written_out_algorithm():
    engine = program(steps=3)
    engine.run()
    theta, lam = manual_run(3)
    for got, ref in [(engine.levels["model"].params, theta), (engine.levels["meta"].params, lam)]:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_unroll_steps_upper_steps_inside_every_kth_lower_step():
    engine = program(steps=4, unroll_steps=2)
    calls = []
    original = engine.coordinator.hypergradient
    engine.coordinator.hypergradient = lambda *a, **k: calls.append(engine.levels["model"].steps) or original(*a, **k)
    engine.run()
    assert calls == [1, 3]  # the 2nd and 4th model steps share their forward; 1 and 3 steps taken before
    assert engine.levels["model"].steps == 4 and engine.levels["meta"].steps == 2


def test_step_level_of_the_leaf_takes_the_upper_step_inside_when_its_turn_has_come():
    """A driver stepping the leaf itself (``step_level``, the global step set by it) gets what ``run`` does:
    the written-out algorithm's parameters; before the upper level's turn the leaf steps alone."""
    engine = program(steps=0)
    engine.step_level("model")  # global step 0: not the upper level's turn
    assert engine.levels["model"].steps == 1 and engine.levels["meta"].steps == 0
    driven = program(steps=0)
    for _ in range(3):
        driven.global_step += 1
        driven.step_level("model")
    theta, lam = manual_run(3)
    for got, ref in [(driven.levels["model"].params, theta), (driven.levels["meta"].params, lam)]:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="level 'model' has no levels below it: it shares no forward"):
        driven.step_level("model", shared=object())


def test_reweighted_level_without_shared_forward_trains_on_the_weighted_mean():
    engine = program(shared=False)
    model = engine.levels["model"]
    batch = model.current_batch()
    loss = model.loss(batch)
    with torch.no_grad():
        losses = per_example(model.module, batch)
        expected = (weights_of(engine.levels["meta"].module, losses) * losses).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)


# ---- bad programs are refused before anything runs ------------------------------------------------
class PlainModel(Level):
    def training_step(self, batch):
        return per_example(self.module, batch).mean()


class OverridingModel(Model):
    def training_step(self, batch):
        return per_example(self.module, batch).mean()


def build_with(model_cls, **config):
    lm, net = tiny_gpt2(torch.float64), weight_net(torch.float64)
    train, meta = data()
    model = model_cls("model", lm, lambda p: torch.optim.SGD(p, lr=LR), train, config=LevelConfig(backend="torch"))
    upper = Meta(
        "meta",
        net,
        lambda p: torch.optim.SGD(p, lr=0.1),
        meta,
        config=LevelConfig(backend="torch", shared_forward=True, **config),
    )
    return Engine([model, upper], {"meta": ["model"]}, EngineConfig(max_steps=1, progress_bar=False))


@pytest.mark.parametrize(
    "model_cls, match",
    [(PlainModel, "not reweighted: define per_example_losses"), (OverridingModel, "defines its own training_step")],
)
def test_program_without_the_structure_is_refused(model_cls, match):
    with pytest.raises(ValueError, match=match):
        build_with(model_cls)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"method": "penalty"}, "mixed product is its last step"),
        ({"method": "exact"}, "mixed product is its last step"),
        ({"gradient_accumulation": 2}, "gradient_accumulation=2 cannot be used"),
        ({"shared_forward_radius": 0.0}, "shared_forward_radius must be > 0"),
        ({"shared_forward_difference": "forward"}, "shared_forward_difference='forward' is not known"),
    ],
)
def test_bad_shared_forward_config_is_refused(config, match):
    with pytest.raises(ValueError, match=match):
        LevelConfig(shared_forward=True, **config)


def test_two_levels_below_are_refused():
    lm, lm2, net = tiny_gpt2(torch.float64), tiny_gpt2(torch.float64, seed=3), weight_net(torch.float64)
    train, meta = data()
    a = Model("model", lm, lambda p: torch.optim.SGD(p, lr=LR), train, config=LevelConfig(backend="torch"))
    b = Model("other", lm2, lambda p: torch.optim.SGD(p, lr=LR), train, config=LevelConfig(backend="torch"))
    upper = Meta(
        "meta",
        net,
        lambda p: torch.optim.SGD(p, lr=0.1),
        meta,
        config=LevelConfig(backend="torch", shared_forward=True),
    )
    with pytest.raises(ValueError, match="exactly one level below it"):
        Engine([a, b, upper], {"meta": ["model", "other"]}, EngineConfig(max_steps=1, progress_bar=False))


def test_bad_per_example_losses_are_named():
    class Scalar(Model):
        def per_example_losses(self, batch):
            return per_example(self.module, batch).mean()

    engine = build_with(Scalar)
    with pytest.raises(ValueError, match="per_example_losses must return a floating-point tensor of shape"):
        engine.run()
