"""Few-shot sinusoid regression: iMAML (implicit gradients, CG) with scalemlo vs FOMAML and baselines.

Tasks are y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5],
with K support and K query points per task (synthetic, seeded torch.Generator).
The bilevel program:

- upper level "meta": the meta-parameters phi, an MLP 1 -> 40 -> 40 -> 1 (ReLU);
  objective: mean query MSE over the meta-batch of the adapted task parameters.
- lower level "tasks": the adapted parameters of T tasks at once, stacked
  (shape [T, ...]) and evaluated with batched matmuls; objective:
  sum_t support MSE_t(theta_t) + lam/2 ||theta_t - phi||^2 (iMAML's proximal term).

The meta level uses ``LevelConfig(method="cg", unroll_steps=K_inner)``: the
tasks level takes K_inner SGD steps per meta step, then the library's CG solves
(H + lam I) w = dF/dtheta and returns lam * w as phi's hypergradient (iMAML).
``TaskLevel.on_inner_loop_start`` draws a new meta-batch and resets theta to phi.

Compared on the same fixed meta-test tasks (adapt from the initialization with
K_inner plain SGD steps on the support MSE, report the query MSE):

- random_init: no meta-learning (the initial phi);
- pretrained: one MLP trained by Adam on the pooled data of all tasks;
- fomaml: first-order MAML in plain torch (meta-gradient = query gradient at the adapted parameters);
- imaml: iMAML through scalemlo (CG), the same meta-iterations and inner steps as fomaml.

Run from the repository root:

    python examples/imaml_sinusoid/train.py            # one seed
    python examples/imaml_sinusoid/train.py --seeds 3  # seeds 0,1,2 and a mean ± std table
    deepspeed --num_gpus 2 examples/imaml_sinusoid/train.py ...   # or torchrun --nproc_per_node 2

Under a launcher (N ranks) the unit of data is a task: every rank draws the same
meta-batch of T tasks and holds all T tasks' parameters (so the tasks level is
the same on every rank), but evaluates the support and query losses only on its
contiguous share of the tasks, times N (times N / T for the mean query loss), so
that the library's average over ranks gives the one-process sums and means; the
proximal term is the same on every rank. Shares may differ by one task when N
does not divide T. The plain-torch systems (random_init, pretrained, fomaml) and
the meta-test run on rank 0 only, which alone prints and writes --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported

import torch  # noqa: E402
import yaml  # noqa: E402

from scalemlo import Engine, EngineConfig, Level, LevelConfig  # noqa: E402
from scalemlo.distributed import add_launcher_arguments, is_main_process, rank, world_size  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "config.yaml"
SYSTEMS = ("random_init", "pretrained", "fomaml", "imaml")

# Every key the config may hold; anything else is an error. All are required.
SCHEMA: dict[str, set[str]] = {
    "data": {"k_support", "k_query", "test_tasks", "test_query", "test_seed"},
    "model": {"hidden"},
    "inner": {"lr", "steps"},  # SGD on the support set, used in training and at meta-test
    "meta": {"lr", "meta_batch", "iterations"},  # Adam on phi; same for fomaml, imaml and pretrained
    # inner_clip: the tasks level's gradient clipping (0 = off); level: a scalemlo.LevelConfig dict
    "imaml": {"lam", "inner_clip", "level"},
}


# ---- configuration --------------------------------------------------------------------------------
def load_config(path: str | Path) -> dict:
    path = Path(path)
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    unknown = sorted(set(cfg) - set(SCHEMA))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known keys: {sorted(SCHEMA)}")
    for section, keys in SCHEMA.items():
        values = cfg.get(section)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        unknown = sorted(set(values) - keys)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} in {section!r}; known keys: {sorted(keys)}")
        missing = sorted(keys - set(values))
        if missing:
            raise ValueError(f"{path}: section {section!r} is missing {missing}")
    level = dict(cfg["imaml"]["level"])
    if "unroll_steps" in level:
        raise ValueError(f"{path}: imaml.level.unroll_steps is inner.steps; do not set it twice")
    LevelConfig.from_dict({**level, "unroll_steps": 1})  # unknown / bad LevelConfig fields fail here
    return cfg


# ---- tasks ------------------------------------------------------------------------------------------
def sample_tasks(n_tasks: int, n_support: int, n_query: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n_tasks`` sinusoids with their support and query sets, shapes [T, N, 1]."""
    amp = torch.empty(n_tasks, 1, 1).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(n_tasks, 1, 1).uniform_(0.0, math.pi, generator=gen)
    xs = torch.empty(n_tasks, n_support, 1).uniform_(-5.0, 5.0, generator=gen)
    xq = torch.empty(n_tasks, n_query, 1).uniform_(-5.0, 5.0, generator=gen)
    return {"xs": xs, "ys": amp * torch.sin(xs - phase), "xq": xq, "yq": amp * torch.sin(xq - phase)}


class CurrentTasks:
    """An endless iterable yielding whatever task batch is current (swapped by the hook)."""

    def __init__(self):
        self.current: dict[str, torch.Tensor] | None = None

    def __iter__(self):
        while True:
            yield self.current


# ---- models -----------------------------------------------------------------------------------------
def make_mlp(hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(1, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 1),
    )


def batched_forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP with per-task parameters [T, out, in] / [T, out] on x [T, N, 1] -> [T, N, 1]."""
    w1, b1, w2, b2, w3, b3 = params
    h = torch.relu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    h = torch.relu(torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)))
    return torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2))


def per_task_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean(dim=(1, 2))


def share(n_tasks: int) -> slice:
    """This rank's contiguous share of the T tasks of a meta-batch (all of them on one rank)."""
    r, size = rank(), world_size()
    return slice(r * n_tasks // size, (r + 1) * n_tasks // size)


def stacked(phi: list[torch.Tensor], n_tasks: int) -> list[torch.Tensor]:
    return [p.detach().unsqueeze(0).expand(n_tasks, *p.shape).clone() for p in phi]


class TaskParams(torch.nn.Module):
    """Adapted parameters of T tasks, stacked like the meta MLP's parameters (same order)."""

    def __init__(self, mlp: torch.nn.Sequential, n_tasks: int):
        super().__init__()
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(p) for p in stacked(list(mlp.parameters()), n_tasks)])

    def forward(self, x: torch.Tensor, tasks: slice = slice(None)) -> torch.Tensor:
        """The tasks ``tasks`` (default: all) on x [len(tasks), N, 1]."""
        return batched_forward([w[tasks] for w in self.weights], x)


# ---- the two levels (iMAML) -----------------------------------------------------------------------------
class TaskLevel(Level):
    """Lower level: sum_t support MSE_t + lam/2 ||theta_t - phi||^2."""

    def __init__(self, *args, lam: float, tasks: CurrentTasks, sampler, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam, self.tasks, self.sampler = lam, tasks, sampler

    def training_step(self, batch):
        if world_size() == 1:
            support = per_task_mse(self.module(batch["xs"]), batch["ys"]).sum()
        else:  # this rank's tasks, times N: the ranks' average is the sum over all tasks
            mine = share(len(batch["xs"]))
            support = per_task_mse(self.module(batch["xs"][mine], mine), batch["ys"][mine]).sum() * world_size()
        phi = list(self.uppers["meta"].module.parameters())
        prox = sum(((theta - p.unsqueeze(0)) ** 2).sum() for theta, p in zip(self.module.weights, phi))
        return support + 0.5 * self.lam * prox

    def on_inner_loop_start(self):
        # Runs before the first step and after every meta step: a new meta-batch, theta reset to phi.
        self.tasks.current = self.sampler()
        with torch.no_grad():
            for theta, p in zip(self.module.weights, self.uppers["meta"].module.parameters()):
                theta.copy_(p.unsqueeze(0).expand_as(theta))
        self.optimizer.state.clear()


class MetaLevel(Level):
    """Upper level: mean over tasks of the query MSE of the adapted parameters."""

    def training_step(self, batch):
        if world_size() == 1:
            return per_task_mse(self.lowers["tasks"](batch["xq"]), batch["yq"]).mean()
        # this rank's tasks, times N / T: the ranks' average is the mean over all T tasks
        n_tasks, mine = len(batch["xq"]), share(len(batch["xq"]))
        query = per_task_mse(self.lowers["tasks"](batch["xq"][mine], mine), batch["yq"][mine])
        return query.sum() * (world_size() / n_tasks)


# ---- training of each system -----------------------------------------------------------------------------
def train_imaml(phi0: torch.nn.Sequential, cfg: dict, seed: int) -> tuple[list[torch.Tensor], int]:
    gen = torch.Generator().manual_seed(seed)
    d, inner, meta = cfg["data"], cfg["inner"], cfg["meta"]
    n_tasks = int(meta["meta_batch"])
    tasks = CurrentTasks()
    meta_module = copy.deepcopy(phi0)
    task_module = TaskParams(meta_module, n_tasks)
    lower = TaskLevel(
        "tasks",
        task_module,
        torch.optim.SGD(task_module.parameters(), lr=float(inner["lr"])),
        data=tasks,
        lam=float(cfg["imaml"]["lam"]),
        tasks=tasks,
        sampler=lambda: sample_tasks(n_tasks, d["k_support"], d["k_query"], gen),
        config=LevelConfig(gradient_clipping=float(cfg["imaml"]["inner_clip"])),
    )
    upper = MetaLevel(
        "meta",
        meta_module,
        torch.optim.Adam(meta_module.parameters(), lr=float(meta["lr"])),
        data=tasks,
        config=LevelConfig.from_dict({**cfg["imaml"]["level"], "unroll_steps": int(inner["steps"])}),
    )
    steps = int(meta["iterations"]) * int(inner["steps"])
    engine = Engine(
        [upper, lower], {"meta": ["tasks"]}, EngineConfig(max_steps=steps, log_every=steps, progress_bar=False)
    )
    engine.run()
    return [p.detach().clone() for p in meta_module.parameters()], upper.steps


def adapt(params: list[torch.Tensor], tasks: dict, steps: int, lr: float) -> list[torch.Tensor]:
    """``steps`` SGD steps on sum_t support MSE_t of stacked parameters (the tasks are independent)."""
    theta = [p.detach().requires_grad_(True) for p in params]
    for _ in range(steps):
        loss = per_task_mse(batched_forward(theta, tasks["xs"]), tasks["ys"]).sum()
        grads = torch.autograd.grad(loss, theta)
        theta = [(t - lr * g).detach().requires_grad_(True) for t, g in zip(theta, grads)]
    return theta


def train_fomaml(phi0: torch.nn.Sequential, cfg: dict, seed: int) -> list[torch.Tensor]:
    """First-order MAML: phi <- Adam(sum_t dL_query_t/dtheta_t at the adapted theta_t)."""
    gen = torch.Generator().manual_seed(seed)
    d, inner, meta = cfg["data"], cfg["inner"], cfg["meta"]
    phi = [p.detach().clone().requires_grad_(True) for p in phi0.parameters()]
    opt = torch.optim.Adam(phi, lr=float(meta["lr"]))
    n_tasks = int(meta["meta_batch"])
    for _ in range(int(meta["iterations"])):
        tasks = sample_tasks(n_tasks, d["k_support"], d["k_query"], gen)
        theta = adapt(stacked(phi, n_tasks), tasks, int(inner["steps"]), float(inner["lr"]))
        query = per_task_mse(batched_forward(theta, tasks["xq"]), tasks["yq"]).mean()
        grads = torch.autograd.grad(query, theta)
        for p, g in zip(phi, grads):
            p.grad = g.sum(0)  # the mean over tasks is already in the query loss
        opt.step()
    return [p.detach() for p in phi]


def train_pretrained(phi0: torch.nn.Sequential, cfg: dict, seed: int) -> list[torch.Tensor]:
    """One MLP fitted by Adam to the pooled support + query points of the same task stream."""
    gen = torch.Generator().manual_seed(seed)
    d, meta = cfg["data"], cfg["meta"]
    net = copy.deepcopy(phi0)
    opt = torch.optim.Adam(net.parameters(), lr=float(meta["lr"]))
    for _ in range(int(meta["iterations"])):
        t = sample_tasks(int(meta["meta_batch"]), d["k_support"], d["k_query"], gen)
        x = torch.cat([t["xs"], t["xq"]], 1).reshape(-1, 1)
        y = torch.cat([t["ys"], t["yq"]], 1).reshape(-1, 1)
        loss = ((net(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def meta_test(phi: list[torch.Tensor], tasks: dict, steps: int, lr: float) -> dict[str, float]:
    """Query MSE on the meta-test tasks before and after ``steps`` SGD steps from phi."""
    n = tasks["xs"].shape[0]
    start = stacked(phi, n)
    with torch.no_grad():
        before = per_task_mse(batched_forward(start, tasks["xq"]), tasks["yq"]).mean()
    theta = adapt(start, tasks, steps, lr)
    with torch.no_grad():
        after = per_task_mse(batched_forward(theta, tasks["xq"]), tasks["yq"]).mean()
    return {"mse_0": float(before), f"mse_{steps}": float(after)}


# ---- one seed, several seeds -----------------------------------------------------------------------------
def run_seed(cfg: dict, seed: int, systems: list[str]) -> dict[str, dict]:
    d, inner = cfg["data"], cfg["inner"]
    test_tasks = sample_tasks(
        int(d["test_tasks"]),
        int(d["k_support"]),
        int(d["test_query"]),
        torch.Generator().manual_seed(int(d["test_seed"])),
    )
    torch.manual_seed(seed)
    phi0 = make_mlp(int(cfg["model"]["hidden"]))
    out: dict[str, dict] = {}
    main_process = is_main_process()
    for system in systems:
        if not main_process and system != "imaml":
            continue  # plain torch, one process: rank 0's
        start = time.perf_counter()
        extra: dict[str, Any] = {}
        if system == "random_init":
            phi = [p.detach().clone() for p in phi0.parameters()]
        elif system == "pretrained":
            phi = train_pretrained(phi0, cfg, seed)
        elif system == "fomaml":
            phi = train_fomaml(phi0, cfg, seed)
        else:
            phi, extra["meta_steps"] = train_imaml(phi0, cfg, seed)
        wall = time.perf_counter() - start
        if not main_process:
            continue  # the meta-test is rank 0's too
        result = {**meta_test(phi, test_tasks, int(inner["steps"]), float(inner["lr"])), "wall_s": wall, **extra}
        result["phi_norm"] = float(torch.sqrt(sum((p**2).sum() for p in phi)))
        out[system] = result
        steps = int(inner["steps"])
        print(
            f"seed {seed} {system:12s} meta-test MSE: 0 steps {result['mse_0']:.4f} | "
            f"{steps} steps {result[f'mse_{steps}']:.4f} | train {wall:.1f}s",
            flush=True,
        )
    return out


def summarize(runs: list[dict], systems: list[str], steps: int) -> dict:
    summary = {}
    for system in systems:
        summary[system] = {}
        for key in ("mse_0", f"mse_{steps}", "wall_s"):
            values = [r[system][key] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[system][key] = {"mean": statistics.fmean(values), "std": std, "values": values}
    return summary


def print_table(summary: dict, steps: int, n: int) -> None:
    print(f"\nmeta-test query MSE, mean ± std over {n} seed(s)")
    print(f"| system | MSE before adaptation | MSE after {steps} SGD steps | train wall s |")
    print("|---|---|---|---|")
    for system, stats in summary.items():
        cells = [f"{stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}" for k in ("mse_0", f"mse_{steps}")]
        wall = stats["wall_s"]
        print(f"| {system} | {cells[0]} | {cells[1]} | {wall['mean']:.1f} ± {wall['std']:.1f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="one run with this seed (default 0)")
    p.add_argument("--seeds", type=int, default=0, help="run seeds 0..N-1 and print mean ± std")
    p.add_argument("--iterations", type=int, default=None, help="override meta.iterations")
    p.add_argument("--lam", type=float, default=None, help="override imaml.lam")
    p.add_argument("--inner-clip", type=float, default=None, help="override imaml.inner_clip")
    p.add_argument("--smoke", action="store_true", help="a tiny fast run (10 meta-iterations, 20 test tasks)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS, help="a subset of the systems")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default=None, help="write the returned numbers as JSON here (rank 0 only)")
    add_launcher_arguments(p)  # the deepspeed launcher passes --local_rank
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config)
    if args.smoke:
        cfg["meta"]["iterations"] = 10
        cfg["data"]["test_tasks"] = 20
    if args.iterations is not None:
        cfg["meta"]["iterations"] = args.iterations
    if args.lam is not None:
        cfg["imaml"]["lam"] = args.lam
    if args.inner_clip is not None:
        cfg["imaml"]["inner_clip"] = args.inner_clip
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny ops: intra-op threads only spin on a busy machine
    try:
        start = time.perf_counter()
        seeds = list(range(args.seeds)) if args.seeds > 0 else [args.seed]
        steps = int(cfg["inner"]["steps"])
        runs = [run_seed(cfg, seed, args.systems) for seed in seeds]
        if not is_main_process():
            return {"config": cfg, "seeds": seeds, "world_size": world_size()}
        summary = summarize(runs, args.systems, steps)
        print_table(summary, steps, len(seeds))
        total = time.perf_counter() - start
        print(f"total wall time {total:.1f}s ({total / len(seeds):.1f}s per seed, {world_size()} rank(s))")
        result = {
            "config": cfg,
            "seeds": seeds,
            "runs": runs,
            "summary": summary,
            "world_size": world_size(),
            "wall_s": total,
        }
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return result
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
