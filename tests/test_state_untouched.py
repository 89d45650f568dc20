"""A hypergradient steps nothing: parameters, buffers, gradients and optimizer
states of every level are bit-identical afterwards (Betty leaves them perturbed
in one version). Checked for every method, under DeepSpeed and plain torch, on a
Meta-Weight-Net-style program with BatchNorm and dropout."""

import pytest
import torch

from scalemlo import Engine, EngineConfig, Level, LevelConfig
from scalemlo.hypergrad import METHODS


class Classifier(Level):
    detach_weight_input = True  # Meta-Weight-Net feeds the loss value, detached

    def training_step(self, batch):
        x, y = batch
        losses = torch.nn.functional.cross_entropy(self.module(x), y, reduction="none")
        features = losses.detach() if self.detach_weight_input else losses
        weights = self.uppers["reweight"](features.unsqueeze(-1)).squeeze(-1)
        return (weights * losses).mean()


class Reweighter(Level):
    def training_step(self, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.lowers["classifier"](x), y)


def make_engine(method: str, backend: str, dtype=torch.float32, seed=0, **config):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
    ).to(dtype)
    weigher = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Sigmoid())
    weigher = weigher.to(dtype)
    g = torch.Generator().manual_seed(seed)
    train = [(torch.randn(16, 5, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    meta = [(torch.randn(16, 5, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    lower = Classifier(
        "classifier", net, torch.optim.Adam(net.parameters(), lr=1e-2), train, config=LevelConfig(backend=backend)
    )
    upper = Reweighter(
        "reweight",
        weigher,
        torch.optim.AdamW(weigher.parameters(), lr=1e-2),
        meta,
        config=LevelConfig(method=method, backend=backend, cg_iterations=3, neumann_iterations=3, **config),
    )
    return Engine([upper, lower], {"reweight": ["classifier"]}, EngineConfig(max_steps=3, progress_bar=False))


def snapshot(engine):
    out = {}
    for name, lv in engine.levels.items():
        for key, t in lv.module.state_dict(keep_vars=True).items():
            out[f"{name}.{key}"] = t.detach().clone()
            if isinstance(t, torch.nn.Parameter):
                out[f"{name}.{key}.grad"] = None if t.grad is None else t.grad.clone()
        for i, p in enumerate(lv.params):
            for k, v in lv.optimizer.state.get(p, {}).items():
                out[f"{name}.opt{i}.{k}"] = v.clone() if torch.is_tensor(v) else v
    return out


def assert_bit_identical(before, after):
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if a is None or b is None:
            assert a is None and b is None, key
        elif torch.is_tensor(a):
            assert torch.equal(a, b), f"{key} changed"
        else:
            assert a == b, key


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_hypergradient_leaves_every_level_bit_identical(method, backend):
    engine = make_engine(method, backend, exact_max_params=1000)
    engine.run()  # optimizer states, a BatchNorm history and a last gradient exist
    before = snapshot(engine)
    rng = torch.get_rng_state()
    grads = engine.hypergradient("reweight")
    assert_bit_identical(before, snapshot(engine))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0, "the hypergradient must not vanish"


def test_perturbed_evaluations_see_the_same_dropout_mask(monkeypatch):
    """Finite-difference and autograd mixed products agree only if every
    evaluation of the lower loss uses the same dropout mask and batch. (The
    weight net's input is not detached here: a detach hides a dependence from
    autograd that a difference sees.)"""
    monkeypatch.setattr(Classifier, "detach_weight_input", False)
    engine = make_engine("finite_difference", "torch", dtype=torch.float64, fd_radius=1e-4)
    engine.run()
    fd = engine.hypergradient("reweight")
    # the same w = lr * v through an autograd mixed product
    from scalemlo import vectors
    from scalemlo.hypergrad.coordinator import Coordinator
    from scalemlo.hypergrad.problem import ResponseProblem

    lower, upper = engine.levels["classifier"], engine.levels["reweight"]
    _, adjoint = Coordinator._direct_gradients(
        upper, [upper, lower], list(engine.levels.values()), None, torch.get_rng_state()
    )
    problem = ResponseProblem(
        lower, [upper], adjoint["classifier"], upper.config, {}, list(engine.levels.values()), torch.get_rng_state()
    )
    mixed = problem.mixed_autograd(vectors.scale(adjoint["classifier"], lower.lr))["reweight"]
    reference = [d - m for d, m in zip(adjoint["reweight"], mixed)]
    num = sum(float((a - b).norm() ** 2) for a, b in zip(fd, reference)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in reference) ** 0.5
    assert num / den < 1e-5
