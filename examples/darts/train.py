"""DARTS (differentiable architecture search) on scikit-learn digits with scalemlo.

    python examples/darts/train.py [--config PATH] [--seed S | --seeds N] [--smoke] [--max-steps N] [--out JSON]
    deepspeed --num_gpus 2 examples/darts/train.py ...      # or: torchrun --nproc_per_node 2 ...

A bilevel program on scikit-learn's 8x8 digits (1797 images, 10 classes, shipped
with scikit-learn: no download), split once with a fixed seed (``data.split_seed``)
into train / validation / test:

- lower level "weights": a small CNN, a 3x3 stem conv then ``network.layers``
  mixed layers and a linear classifier on the flattened 8x8 maps. Mixed layer l
  computes sum_k softmax(alpha_l)_k * op_k(x) over the candidate ops (conv 3x3,
  conv 5x5, dilated conv 3x3, max-pool 3x3, avg-pool 3x3, skip, zero); it reads
  alpha through ``self.uppers["arch"]``. Trained on the train split's
  cross-entropy with SGD + momentum (as DARTS).
- upper level "arch": alpha, one logit vector per mixed layer, trained with Adam
  on the validation split's cross-entropy through the hypergradient of method
  ``finite_difference`` with ``unroll_steps: 1``: one unrolled SGD step and a
  central difference of the train loss' gradient in alpha, i.e. DARTS'
  second-order approximation.

After the search the derived architecture (argmax op per layer, 'zero' excluded)
is retrained from scratch and its test accuracy compared with a random
architecture (one random non-zero op per layer) and with the uniform mixture
(every op, alpha fixed at 0), all retrained the same way. Each level runs in its
own DeepSpeed engine (ZeRO-0, fp32); no launcher or GPU needed.

Under a launcher (N ranks) every rank draws the same global minibatches and
trains on its contiguous 1/N share of each (``scalemlo.distributed.rank_share``);
both losses are means over examples and the network has no batch statistics,
so the search is the one-process search up to float rounding. The retraining
is plain torch and runs on rank 0 only, which alone prints and writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: no GPU, no warning

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scalemlo import Engine, EngineConfig, Level, LevelConfig  # noqa: E402
from scalemlo.distributed import add_launcher_arguments, is_main_process, rank_share, world_size  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "config.yaml"

# Every key the config may hold (all required); anything else is an error.
SCHEMA: dict[str, set[str] | None] = {
    "data": {"split_seed", "train_size", "val_size", "batch_size"},
    "network": {"channels", "layers", "ops"},
    "weights": {"lr", "momentum", "weight_decay"},
    "arch": {"lr", "weight_decay", "init_std", "level"},  # level: a scalemlo.LevelConfig dict
    "engine": None,  # a scalemlo.EngineConfig dict (checked by EngineConfig.from_dict)
    "retrain": {"steps", "lr", "weight_decay", "random_archs"},
    "report_every": None,
}
SMOKE = {"max_steps": 12, "retrain_steps": 10, "report_every": 6}


# ---- configuration ------------------------------------------------------------------------------
def load_config(path: str | Path) -> dict:
    """Read a YAML (.yaml/.yml) or JSON config and check its keys."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(SCHEMA))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known keys: {sorted(SCHEMA)}")
    missing = sorted(set(SCHEMA) - set(cfg))
    if missing:
        raise ValueError(f"{path}: missing config keys {missing}")
    for section, keys in SCHEMA.items():
        if keys is None:
            continue
        value = cfg[section]
        if not isinstance(value, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        if set(value) != keys:
            raise ValueError(
                f"{path}: section {section!r}: unknown keys {sorted(set(value) - keys)}, "
                f"missing keys {sorted(keys - set(value))}"
            )
    bad_ops = sorted(set(cfg["network"]["ops"]) - set(OPS))
    if bad_ops or len(set(cfg["network"]["ops"])) != len(cfg["network"]["ops"]):
        raise ValueError(f"{path}: network.ops must be distinct names from {sorted(OPS)}, got {cfg['network']['ops']}")
    if "seed" in cfg["engine"]:
        raise ValueError(f"{path}: the engine seed is --seed, not engine.seed")
    return cfg


# ---- data ---------------------------------------------------------------------------------------
def load_splits(split_seed: int, train_size: int, val_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits as (N, 1, 8, 8) floats in [0, 1], split train / val / test (the rest) by ``split_seed``."""
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x_all = torch.tensor(x_all, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y_all = torch.tensor(y_all, dtype=torch.long)
    if train_size + val_size >= len(x_all):
        raise ValueError(f"train_size + val_size must leave a test split ({len(x_all)} images)")
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(split_seed))
    idx = {
        "train": order[:train_size],
        "val": order[train_size : train_size + val_size],
        "test": order[train_size + val_size :],
    }
    return {name: (x_all[i], y_all[i]) for name, i in idx.items()}


class Batches:
    """Shuffled minibatches of a split; a fresh permutation (from its own generator) every pass.

    ``shard``: yield this rank's contiguous share of each global minibatch (every rank
    draws the same permutation), so that the ranks together see the one-process batch.
    """

    def __init__(self, split: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int, shard: bool = False):
        self.x, self.y = split
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.shard = shard

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.gen)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):  # full batches only
            i = order[start : start + self.batch_size]
            yield rank_share((self.x[i], self.y[i]), "minibatch") if self.shard else (self.x[i], self.y[i])


# ---- search space -------------------------------------------------------------------------------
class Zero(torch.nn.Module):
    def forward(self, x):
        return x.mul(0.0)


def relu_conv(c: int, k: int, dilation: int = 1) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.ReLU(), torch.nn.Conv2d(c, c, k, padding=dilation * (k - 1) // 2, dilation=dilation)
    )


OPS = {
    "conv_3x3": lambda c: relu_conv(c, 3),
    "conv_5x5": lambda c: relu_conv(c, 5),
    "dil_conv_3x3": lambda c: relu_conv(c, 3, dilation=2),
    "max_pool_3x3": lambda c: torch.nn.MaxPool2d(3, stride=1, padding=1),
    "avg_pool_3x3": lambda c: torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    "skip": lambda c: torch.nn.Identity(),
    "zero": lambda c: Zero(),
}


class Network(torch.nn.Module):
    """Stem conv, then one cell per layer, then a linear classifier on the flattened maps.

    ``layer_ops[l]`` lists the candidate ops of layer l: several ops make it a
    mixed layer weighted by ``softmax(alpha[l])``; one op makes it a plain layer
    (the derived or random network).
    """

    def __init__(self, channels: int, layer_ops: list[list[str]]):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList(OPS[name](channels) for name in ops) for ops in layer_ops)
        self.head = torch.nn.Linear(channels * 64, 10)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(x)
        for i, ops in enumerate(self.layers):
            if len(ops) == 1:
                x = ops[0](x)
            else:
                w = F.softmax(alpha[i], dim=-1)
                x = sum(w[k] * op(x) for k, op in enumerate(ops))
        return self.head(F.relu(x).flatten(1))


class Alpha(torch.nn.Module):
    """The upper level's parameters: architecture logits, one row per mixed layer."""

    def __init__(self, layers: int, n_ops: int, init_std: float):
        super().__init__()
        self.alpha = torch.nn.Parameter(init_std * torch.randn(layers, n_ops))

    def forward(self) -> torch.Tensor:
        return self.alpha


# ---- the two levels -----------------------------------------------------------------------------
class Weights(Level):
    """Lower level: cross-entropy of the mixed network on a train minibatch; alpha read from "arch"."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, self.uppers["arch"]())

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.logits(x), y)


class Arch(Level):
    """Upper level: cross-entropy of the mixed network on a validation minibatch."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.lowers["weights"].logits(x), y)


# ---- search, derive, retrain --------------------------------------------------------------------
def format_softmax(alpha: torch.Tensor, ops: list[str]) -> list[str]:
    probs = F.softmax(alpha.detach(), dim=-1)
    return ["  ".join(f"{name} {p:.3f}" for name, p in zip(ops, row.tolist(), strict=True)) for row in probs]


def derive(alpha: torch.Tensor, ops: list[str]) -> list[str]:
    """The argmax op of each layer, 'zero' excluded (as DARTS derives its cells)."""
    keep = [k for k, name in enumerate(ops) if name != "zero"]
    return [ops[keep[int(row[keep].argmax())]] for row in alpha.detach()]


def build_search(cfg: dict, splits: dict, seed: int, max_steps: int) -> tuple[Engine, Weights, Arch]:
    """The bilevel program of the search: the engine and its two levels (nothing run yet)."""
    ops, layers, channels = cfg["network"]["ops"], int(cfg["network"]["layers"]), int(cfg["network"]["channels"])
    torch.manual_seed(seed)
    net = Network(channels, [ops] * layers)
    arch_module = Alpha(layers, len(ops), float(cfg["arch"]["init_std"]))
    bs = int(cfg["data"]["batch_size"])
    w_cfg, a_cfg = cfg["weights"], cfg["arch"]
    weights = Weights(
        "weights",
        net,
        torch.optim.SGD(
            net.parameters(),
            lr=float(w_cfg["lr"]),
            momentum=float(w_cfg["momentum"]),
            weight_decay=float(w_cfg["weight_decay"]),
        ),
        data=Batches(splits["train"], bs, seed, shard=True),
    )
    arch = Arch(
        "arch",
        arch_module,
        torch.optim.Adam(
            arch_module.parameters(),
            lr=float(a_cfg["lr"]),
            betas=(0.5, 0.999),
            weight_decay=float(a_cfg["weight_decay"]),
        ),
        data=Batches(splits["val"], bs, seed + 1000, shard=True),
        config=LevelConfig.from_dict(a_cfg["level"]),  # the upper level's config: how its hypergradient is made
    )
    engine_values = {**cfg["engine"], "max_steps": max_steps, "seed": seed}
    engine_values.setdefault("progress_bar", False)
    engine = Engine([weights, arch], {"arch": ["weights"]}, EngineConfig.from_dict(engine_values))
    return engine, weights, arch


def search(cfg: dict, splits: dict, seed: int, max_steps: int, report_every: int, verbose: bool) -> dict:
    ops = cfg["network"]["ops"]
    engine, weights, arch = build_search(cfg, splits, seed, max_steps)
    arch_module = arch.module
    snapshots = []

    def snapshot():
        snapshots.append({"step": engine.global_step, "softmax": F.softmax(arch_module.alpha.detach(), -1).tolist()})
        if verbose:
            with torch.no_grad():
                x, y = splits["val"]
                val_acc = float((weights.logits(x).argmax(-1) == y).float().mean())
            print(
                f"  step {engine.global_step:4d} (arch steps {arch.steps:4d}): mixed net val acc {100 * val_acc:.1f}%"
            )
            for i, line in enumerate(format_softmax(arch_module.alpha, ops)):
                print(f"    layer {i}: {line}")

    start = time.perf_counter()
    snapshot()
    for _ in range(max_steps):
        engine.step()
        if engine.global_step % report_every == 0 or engine.global_step == max_steps:
            snapshot()
    seconds = time.perf_counter() - start
    with torch.no_grad():  # the upper objective on the whole validation split, at the end of the search
        x, y = splits["val"]
        val_loss = float(F.cross_entropy(weights.logits(x), y))
    return {
        "val_loss": val_loss,
        "alpha": arch_module.alpha.detach().clone(),
        "snapshots": snapshots,
        "arch_steps": arch.steps,
        "seconds": seconds,
    }


def retrain(cfg: dict, splits: dict, layer_ops: list[list[str]], seed: int, steps: int) -> dict:
    """Train a network from scratch on the train split (plain torch, Adam), then test accuracy.

    A mixed network (uniform mixture) is trained with alpha fixed at 0.
    """
    torch.manual_seed(seed)
    net = Network(int(cfg["network"]["channels"]), layer_ops)
    alpha = torch.zeros(len(layer_ops), max(len(o) for o in layer_ops))
    r = cfg["retrain"]
    opt = torch.optim.Adam(net.parameters(), lr=float(r["lr"]), weight_decay=float(r["weight_decay"]))
    data = Batches(splits["train"], int(cfg["data"]["batch_size"]), seed + 2000)
    start, done = time.perf_counter(), 0
    while done < steps:
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(net(x, alpha), y).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    with torch.no_grad():
        acc = {name: float((net(x, alpha).argmax(-1) == y).float().mean()) for name, (x, y) in splits.items()}
    return {
        "test_acc": acc["test"],
        "val_acc": acc["val"],
        "params": sum(p.numel() for p in net.parameters()),
        "seconds": time.perf_counter() - start,
    }


def run_seed(cfg: dict, splits: dict, seed: int, max_steps: int, retrain_steps: int, report_every: int, verbose: bool):
    ops, layers = cfg["network"]["ops"], int(cfg["network"]["layers"])
    if verbose:
        print(f"\n=== seed {seed}: search ({max_steps} steps, {world_size()} rank(s)) ===")
    found = search(cfg, splits, seed, max_steps, report_every, verbose)
    derived = derive(found["alpha"], ops)
    searched = {
        "seed": seed,
        "derived": derived,
        "alpha": found["alpha"].tolist(),
        "final_softmax": F.softmax(found["alpha"], -1).tolist(),
        "search_val_loss": found["val_loss"],
        "snapshots": found["snapshots"],
        "arch_steps": found["arch_steps"],
        "search_seconds": found["seconds"],
    }
    if not is_main_process():
        return {**searched, "systems": None}  # the retraining (plain torch) is rank 0's
    nonzero = [o for o in ops if o != "zero"]
    gen = torch.Generator().manual_seed(10_000 + seed)
    random_archs = [
        [nonzero[int(torch.randint(len(nonzero), (1,), generator=gen))] for _ in range(layers)]
        for _ in range(int(cfg["retrain"]["random_archs"]))
    ]
    systems = {"darts": [[o] for o in derived], "uniform_mixture": [ops] * layers}
    systems.update({f"random_{i}": [[o] for o in arch] for i, arch in enumerate(random_archs)})
    results = {}
    for name, layer_ops in systems.items():
        results[name] = retrain(cfg, splits, layer_ops, seed, retrain_steps)
        if verbose:
            arch_desc = "all ops, alpha = 0" if name == "uniform_mixture" else " -> ".join(o[0] for o in layer_ops)
            print(
                f"  retrain {name:>15}: {arch_desc:<45} test acc {100 * results[name]['test_acc']:.1f}%  "
                f"val acc {100 * results[name]['val_acc']:.1f}%  ({results[name]['params']} params, "
                f"{results[name]['seconds']:.1f}s)"
            )
    # "random": the mean over this seed's random architectures (one draw alone is a noisy baseline)
    randoms = [results.pop(f"random_{i}") for i in range(len(random_archs))]
    results["random"] = {
        key: statistics.fmean(r[key] for r in randoms) for key in ("test_acc", "val_acc", "params", "seconds")
    }
    results["random"]["each_test_acc"] = [r["test_acc"] for r in randoms]
    results["darts"]["search_seconds"] = found["seconds"]
    if verbose:
        print(f"  derived architecture: {' -> '.join(derived)}  (search {found['seconds']:.1f}s)")
    return {**searched, "random_archs": random_archs, "systems": results}


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


# ---- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML or JSON config (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="init / minibatch / random-architecture seed (default 0)")
    p.add_argument("--seeds", type=int, default=0, help="run seeds 0..N-1 and print mean ± std")
    p.add_argument("--max-steps", type=int, default=None, help="override engine.max_steps (search iterations)")
    p.add_argument("--retrain-steps", type=int, default=None, help="override retrain.steps")
    p.add_argument("--smoke", action="store_true", help=f"tiny fast run: {SMOKE}")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during the run (default 1)")
    p.add_argument("--out", default=None, help="write the returned numbers as JSON here (rank 0 only)")
    add_launcher_arguments(p)  # the deepspeed launcher passes --local_rank
    return p.parse_args(argv)


def say(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Tiny convolutions gain nothing from intra-op threads on a busy 2-core machine; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    if args.out and is_main_process():
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    cfg = load_config(args.config)
    max_steps = int(cfg["engine"].get("max_steps", 100))
    retrain_steps, report_every = int(cfg["retrain"]["steps"]), int(cfg["report_every"])
    if args.smoke:
        max_steps, retrain_steps, report_every = SMOKE["max_steps"], SMOKE["retrain_steps"], SMOKE["report_every"]
    if args.max_steps is not None:
        max_steps = args.max_steps
    if args.retrain_steps is not None:
        retrain_steps = args.retrain_steps
    d = cfg["data"]
    splits = load_splits(int(d["split_seed"]), int(d["train_size"]), int(d["val_size"]))
    say(
        f"digits 8x8: train {len(splits['train'][0])} / val {len(splits['val'][0])} / test {len(splits['test'][0])} "
        f"(split seed {d['split_seed']}); ops: {', '.join(cfg['network']['ops'])}; "
        f"{cfg['network']['layers']} mixed layers x {cfg['network']['channels']} channels; "
        f"arch method {cfg['arch']['level'].get('method', 'finite_difference')}, "
        f"unroll_steps {cfg['arch']['level'].get('unroll_steps', 1)}"
    )
    seeds = list(range(args.seeds)) if args.seeds > 0 else [args.seed]
    runs = []
    for seed in seeds:
        seed_start = time.perf_counter()
        r = run_seed(cfg, splits, seed, max_steps, retrain_steps, report_every, not args.quiet and is_main_process())
        r["seconds"] = time.perf_counter() - seed_start
        runs.append(r)
    if not is_main_process():
        return {"ops": cfg["network"]["ops"], "seeds": seeds, "runs": runs, "world_size": world_size()}
    systems = list(runs[0]["systems"])
    summary = {s: {"test_acc": mean_std([r["systems"][s]["test_acc"] for r in runs])} for s in systems}
    summary["search_seconds"] = mean_std([r["search_seconds"] for r in runs])
    summary["seed_seconds"] = mean_std([r["seconds"] for r in runs])

    print(f"\nmean ± std over seed(s) {seeds}: test accuracy after retraining from scratch ({retrain_steps} steps)")
    for s in systems:
        t = summary[s]["test_acc"]
        per_seed = ", ".join(f"{100 * v:.1f}" for v in t["values"])
        print(f"  {s:>15}: {100 * t['mean']:.2f} ± {100 * t['std']:.2f} %   (per seed: {per_seed})")
    for r in runs:
        print(f"  seed {r['seed']}: derived {' -> '.join(r['derived'])}")
    each = [a for r in runs for a in r["systems"]["random"]["each_test_acc"]]
    summary["random_each"] = {"test_acc": mean_std(each)}
    print(
        f"  every random architecture ({len(each)}): {100 * statistics.fmean(each):.2f} ± "
        f"{100 * (statistics.stdev(each) if len(each) > 1 else 0.0):.2f} %, min {100 * min(each):.1f} %"
    )
    ss, sd = summary["search_seconds"], summary["seed_seconds"]
    print(
        f"  search {ss['mean']:.1f} ± {ss['std']:.1f}s per seed; search + retrains {sd['mean']:.1f} ± {sd['std']:.1f}s"
    )
    total = time.perf_counter() - start
    print(f"total wall time {total:.1f}s after imports")
    return {
        "ops": cfg["network"]["ops"],
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
        "world_size": world_size(),
        "wall_s": total,
    }


if __name__ == "__main__":
    main()
