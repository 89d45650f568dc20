"""Small multilevel problems whose hypergradients have closed forms, and multi-rank launches for tests.

Used by the test suite and by ``benchmarks/``. The closed forms are written
with dense linear algebra in float64 and share no code with the hypergradient
methods.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch

from scalemlo.config import EngineConfig, LevelConfig
from scalemlo.engine import Engine
from scalemlo.level import Level


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (give each launch its own master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(*script_and_args, ranks: int = 2, port: int | None = None) -> list[str]:
    """The command that starts ``script args...`` on ``ranks`` local ranks under the deepspeed launcher."""
    port = free_port() if port is None else port
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        *map(str, script_and_args),
    ]


def end_launched_rank() -> None:
    """End a launched test rank whose work is done and written (call it after a final barrier).

    The rank leaves without the interpreter's finalisation: gloo's and DeepSpeed's worker threads can
    otherwise outlive it and abort the rank at exit ("terminate called without an active exception", exit
    code -6) after its work is done, failing a launch that succeeded; ``scalemlo.distributed`` destroys the
    process group at exit against this, which leaves it rare but not absent on a 2-rank CPU launch.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def allow_deepspeed_fp16_on_cpu() -> bool:
    """Let DeepSpeed build fp16 engines on this CPU (for tests); returns whether it already could.

    DeepSpeed's CPU accelerator reports fp16 support only on CPUs with native fp16 arithmetic
    (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``: AVX512-FP16 / AMX-FP16), and ``deepspeed.initialize``
    refuses an ``"fp16"`` config elsewhere. Its fp16 optimizers (ZeRO 0-3) and loss scaler are torch code
    that runs on any CPU (fp16 matmuls are emulated, slowly), so the tests let it build them: the engine
    DeepSpeed steps on a GPU, its overflow checks and its scale, minus the CUDA kernels. Process-wide.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    native = bool(accelerator.is_fp16_supported())
    if accelerator.device_name() == "cpu" and not native:
        accelerator.is_fp16_supported = lambda: True
    return native


class VectorModule(torch.nn.Module):
    """A module that is just one parameter vector ``p`` (shape ``(size,)``)."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.p = torch.nn.Parameter(values.clone())

    def forward(self) -> torch.Tensor:
        return self.p


# ---- ridge regression with per-feature L2 hyperparameters ------------------------


@dataclass
class RidgeData:
    """Train and validation splits of a linear regression task (float64)."""

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @classmethod
    def make(cls, features: int = 6, n: int = 40, n_val: int = 30, seed: int = 0) -> RidgeData:
        g = torch.Generator().manual_seed(seed)
        truth = torch.randn(features, generator=g, dtype=torch.float64)
        x = torch.randn(n, features, generator=g, dtype=torch.float64)
        x_val = torch.randn(n_val, features, generator=g, dtype=torch.float64)
        y = x @ truth + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        y_val = x_val @ truth + 0.5 * torch.randn(n_val, generator=g, dtype=torch.float64)
        return cls(x, y, x_val, y_val)

    def hessian(self, log_lambda: torch.Tensor) -> torch.Tensor:
        """d^2 f / d theta^2 = X^T X / n + diag(exp(lambda))."""
        return self.x.T @ self.x / len(self.x) + torch.diag(log_lambda.exp())

    def solution(self, log_lambda: torch.Tensor) -> torch.Tensor:
        """theta*(lambda) = H^{-1} X^T y / n."""
        return torch.linalg.solve(self.hessian(log_lambda), self.x.T @ self.y / len(self.x))

    def val_grad(self, theta: torch.Tensor) -> torch.Tensor:
        """dF/dtheta of F = 0.5 mean((X_val theta - y_val)^2)."""
        return self.x_val.T @ (self.x_val @ theta - self.y_val) / len(self.x_val)

    def hypergradient(self, log_lambda: torch.Tensor) -> torch.Tensor:
        """dF/dlambda at theta*(lambda) by the implicit function theorem."""
        theta = self.solution(log_lambda)
        w = torch.linalg.solve(self.hessian(log_lambda), self.val_grad(theta))
        return -(log_lambda.exp() * theta) * w


class RidgeModel(Level):
    """Lower level: 0.5 mean((X theta - y)^2) + 0.5 sum(exp(lambda) theta^2)."""

    def training_step(self, batch):
        x, y = batch
        theta = self.module()
        log_lambda = self.uppers["hyper"]()
        return 0.5 * ((x @ theta - y) ** 2).mean() + 0.5 * (log_lambda.exp() * theta**2).sum()


class RidgeHyper(Level):
    """Upper level: validation loss 0.5 mean((X_val theta - y_val)^2)."""

    def training_step(self, batch):
        x, y = batch
        theta = self.lowers["model"]()
        return 0.5 * ((x @ theta - y) ** 2).mean()


def ridge_engine(
    data: RidgeData,
    log_lambda: torch.Tensor,
    theta: torch.Tensor,
    hyper_config: LevelConfig,
    model_optimizer: str = "sgd",
    model_lr: float = 0.1,
    backend: str = "torch",
    dtype: torch.dtype = torch.float64,
    hyper_lr: float = 0.1,
    max_steps: int = 0,
    model_config: LevelConfig | None = None,
) -> Engine:
    """An engine over the ridge problem with the given state (full-batch data).

    ``model_config`` is the lower level's LevelConfig (default: ``backend`` with its defaults).
    """
    model_module = VectorModule(theta.to(dtype))
    hyper_module = VectorModule(log_lambda.to(dtype))
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[model_optimizer]
    model = RidgeModel(
        "model",
        model_module,
        opt_cls(model_module.parameters(), lr=model_lr),
        data=[(data.x.to(dtype), data.y.to(dtype))],
        config=model_config or LevelConfig(backend=backend),
    )
    hyper = RidgeHyper(
        "hyper",
        hyper_module,
        torch.optim.SGD(hyper_module.parameters(), lr=hyper_lr),
        data=[(data.x_val.to(dtype), data.y_val.to(dtype))],
        config=hyper_config,
    )
    return Engine([hyper, model], {"hyper": ["model"]}, EngineConfig(max_steps=max_steps, progress_bar=False))


# ---- per-example reweighting of softmax regression (not quadratic) ---------------


@dataclass
class ReweightedSoftmax:
    """Softmax regression whose training examples carry learned weights (float64).

        f(theta, lam) = mean_i 2 sigmoid(lam_i) CE_i(theta) + 0.5 c |theta|^2
        F(theta)      = scale * mean_j CE_val_j(theta)

    Neither f nor its derivative in lam is quadratic in theta, so a central
    difference has truncation error that depends on how far it steps (the
    ridge oracles, quadratic in theta, hide a wrong step size). theta*(lam) is
    found by Newton's method; the hypergradient closed form is
    dF/dlam_i = -(2 sigmoid'(lam_i) / n) grad CE_i(theta*) . H^{-1} grad F(theta*).
    """

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: int
    c: float = 0.1
    scale: float = 1.0

    @classmethod
    def make(cls, features: int = 4, classes: int = 3, n: int = 24, n_val: int = 30, seed: int = 0, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        truth = torch.randn(features, classes, generator=g, dtype=torch.float64) * 2

        def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(count, features, generator=g, dtype=torch.float64)
            y = torch.multinomial(torch.softmax(x @ truth, dim=1), 1, generator=g).squeeze(1)
            return x, y

        (x, y), (x_val, y_val) = split(n), split(n_val)
        y[: n // 4] = (y[: n // 4] + 1) % classes  # a quarter of the training labels are wrong
        return cls(x, y, x_val, y_val, classes, scale=scale)

    def per_example(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = x @ theta.view(x.shape[1], self.classes)
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    def lower(self, theta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        weights = 2 * torch.sigmoid(lam)
        return (weights * self.per_example(theta, self.x, self.y)).mean() + 0.5 * self.c * (theta**2).sum()

    def upper(self, theta: torch.Tensor) -> torch.Tensor:
        return self.scale * self.per_example(theta, self.x_val, self.y_val).mean()

    def solution(self, lam: torch.Tensor) -> torch.Tensor:
        """theta*(lam) by Newton's method (to the float64 floor)."""
        theta = torch.zeros(self.x.shape[1] * self.classes, dtype=torch.float64)
        for _ in range(50):
            grad = torch.autograd.functional.jacobian(lambda t: self.lower(t, lam), theta)
            if float(grad.norm()) < 1e-14:
                break
            theta = theta - torch.linalg.solve(
                torch.autograd.functional.hessian(lambda t: self.lower(t, lam), theta), grad
            )
        return theta

    def _pieces(self, lam: torch.Tensor, theta: torch.Tensor):
        hessian = torch.autograd.functional.hessian(lambda t: self.lower(t, lam), theta)
        v = torch.autograd.functional.jacobian(self.upper, theta)
        per_example_grads = torch.autograd.functional.jacobian(lambda t: self.per_example(t, self.x, self.y), theta)
        d_weight = 2 * torch.sigmoid(lam) * (1 - torch.sigmoid(lam)) / len(self.y)
        return hessian, v, per_example_grads, d_weight

    def hypergradient(self, lam: torch.Tensor) -> torch.Tensor:
        """dF/dlam at theta*(lam), implicit function theorem."""
        hessian, v, grads, d_weight = self._pieces(lam, self.solution(lam))
        return -d_weight * (grads @ torch.linalg.solve(hessian, v))

    def unrolled_hypergradient(self, lam: torch.Tensor, lr: torch.Tensor | float) -> torch.Tensor:
        """d/dlam F(theta - lr grad_theta f(theta, lam)) at theta = theta*(lam) (one SGD step; lr per element)."""
        _, v, grads, d_weight = self._pieces(lam, self.solution(lam))
        return -d_weight * (grads @ (lr * v))


class SoftmaxModel(Level):
    """Lower level of `ReweightedSoftmax`; batches are (x, y, example index)."""

    def __init__(self, *args, problem: ReweightedSoftmax, **kwargs):
        super().__init__(*args, **kwargs)
        self.problem = problem

    def training_step(self, batch):
        x, y, index = batch
        theta = self.module()
        weights = 2 * torch.sigmoid(self.uppers["weights"]()[index])
        ce = self.problem.per_example(theta, x, y)
        return (weights * ce).mean() + 0.5 * self.problem.c * (theta**2).sum()


class ExampleWeights(Level):
    """Upper level of `ReweightedSoftmax`: one weight logit per training example."""

    def __init__(self, *args, problem: ReweightedSoftmax, **kwargs):
        super().__init__(*args, **kwargs)
        self.problem = problem

    def training_step(self, batch):
        return self.problem.upper(self.lowers["model"]())


def reweighted_softmax_engine(
    problem: ReweightedSoftmax,
    lam: torch.Tensor,
    theta: torch.Tensor,
    weights_config: LevelConfig,
    model_optimizer: torch.optim.Optimizer | None = None,
    micro_batches: int = 1,
    model_config: LevelConfig | None = None,
    dtype: torch.dtype = torch.float64,
) -> Engine:
    """An engine over `ReweightedSoftmax` at (lam, theta).

    The training set is cut into ``micro_batches`` equal batches; with
    ``model_config.gradient_accumulation`` equal to it, one step sees the whole
    set. ``model_optimizer`` is a factory params -> optimizer (default SGD, lr 0.1).
    """
    model_module, weights_module = VectorModule(theta.to(dtype)), VectorModule(lam.to(dtype))
    index = torch.arange(len(problem.y)).chunk(micro_batches)
    batches = [(problem.x[i].to(dtype), problem.y[i], i) for i in index]
    model = SoftmaxModel(
        "model",
        model_module,
        model_optimizer or (lambda params: torch.optim.SGD(params, lr=0.1)),
        data=batches,
        config=model_config or LevelConfig(backend=weights_config.backend),
        problem=problem,
    )
    weights = ExampleWeights(
        "weights",
        weights_module,
        torch.optim.SGD(weights_module.parameters(), lr=0.1),
        [None],
        config=weights_config,
        problem=problem,
    )
    return Engine([weights, model], {"weights": ["model"]}, EngineConfig(max_steps=0, progress_bar=False))


# ---- a three-level chain of quadratics -------------------------------------------


@dataclass
class ChainProblem:
    """A -> B -> C with quadratic objectives (float64):

        f_C(c; b)    = 0.5 c^T A_C c - c^T (P b + q)
        f_B(b; a, c) = 0.5 b^T A_B b - b^T R a + s^T c
        f_A(a; b, c) = 0.5 |c - t_c|^2 + 0.5 |b - t_b|^2 + 0.5 gamma |a|^2

    B's objective reads c linearly and c*(b) is affine, so the partial Hessians
    the library uses are the true ones and the implicit-function closed form
    below is exact.
    """

    a_c: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    a_b: torch.Tensor
    r: torch.Tensor
    s: torch.Tensor
    t_c: torch.Tensor
    t_b: torch.Tensor
    gamma: float

    @classmethod
    def make(cls, dim_a: int = 3, dim_b: int = 4, dim_c: int = 5, seed: int = 0) -> ChainProblem:
        g = torch.Generator().manual_seed(seed)

        def spd(n: int) -> torch.Tensor:
            m = torch.randn(n, n, generator=g, dtype=torch.float64)
            return m @ m.T / n + torch.eye(n, dtype=torch.float64)

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        return cls(
            spd(dim_c),
            rnd(dim_c, dim_b),
            rnd(dim_c),
            spd(dim_b),
            rnd(dim_b, dim_a),
            rnd(dim_c),
            rnd(dim_c),
            rnd(dim_b),
            0.1,
        )

    def c_star(self, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.a_c, self.p @ b + self.q)

    def b_star(self, a: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.a_b, self.r @ a - self.p.T @ torch.linalg.solve(self.a_c, self.s))

    def hypergradient_a(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """dF_A/da by the implicit function theorem (at any b, c)."""
        v_b = (b - self.t_b) + self.p.T @ torch.linalg.solve(self.a_c, c - self.t_c)
        return self.gamma * a + self.r.T @ torch.linalg.solve(self.a_b, v_b)

    def hypergradient_b(self, c: torch.Tensor) -> torch.Tensor:
        """dF_B/db's part through C: the s^T c term, (dc/db)^T s (plus the direct part, added by the caller)."""
        return self.p.T @ torch.linalg.solve(self.a_c, self.s)


class ChainC(Level):
    def training_step(self, batch):
        prob: ChainProblem = batch
        c, b = self.module(), self.uppers["B"]()
        return 0.5 * c @ prob.a_c @ c - c @ (prob.p @ b + prob.q)


class ChainB(Level):
    def training_step(self, batch):
        prob: ChainProblem = batch
        b, a, c = self.module(), self.uppers["A"](), self.lowers["C"]()
        return 0.5 * b @ prob.a_b @ b - b @ (prob.r @ a) + prob.s @ c


class ChainA(Level):
    def training_step(self, batch):
        prob: ChainProblem = batch
        a, b, c = self.module(), self.level("B")(), self.level("C")()
        return 0.5 * ((c - prob.t_c) ** 2).sum() + 0.5 * ((b - prob.t_b) ** 2).sum() + 0.5 * prob.gamma * (a**2).sum()


def chain_engine(
    prob: ChainProblem,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    config: LevelConfig,
    lr: tuple[float, float, float] = (0.1, 0.1, 0.1),
    max_steps: int = 0,
    optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
) -> Engine:
    """Engine over the chain (SGD on every level by default); ``config`` is used by A and B."""
    levels = []
    for cls, name, value, step in ((ChainA, "A", a, lr[0]), (ChainB, "B", b, lr[1]), (ChainC, "C", c, lr[2])):
        module = VectorModule(value)
        levels.append(cls(name, module, optimizer(module.parameters(), lr=step), data=[prob], config=config))
    return Engine(levels, {"A": ["B"], "B": ["C"]}, EngineConfig(max_steps=max_steps, progress_bar=False))
