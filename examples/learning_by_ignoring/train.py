"""Learning by ignoring: a three-level program on scikit-learn's digits.

    reweight (A)  ->  pretrain (B)  ->  finetune (C)

- finetune (C, bottom): a model c trained on a small labelled *target* set
  with a proximal term mu/2 ||c - b||^2 pulling it to the pretrained weights b.
- pretrain (B, middle): a model b trained on a large *source* set, each example
  weighted by w_i = sigmoid(a_i): sum_i w_i l_i / n + weight decay.
- reweight (A, top): the per-example logits a; its objective is the fine-tuned
  model's loss on a target validation set.

Part of the source examples carry permuted labels (y -> (y + 1) mod 10): they
teach the wrong class mapping, so pretraining on all of them hurts the target
(negative transfer). The hypergradient of A chains through B and C and should
learn to ignore them; the learned weights are compared with the known
harmful / useful split.

Run from the repository root:

    python examples/learning_by_ignoring/train.py            # one seed
    python examples/learning_by_ignoring/train.py --seeds 3  # seeds 0,1,2 and a mean ± std table
    deepspeed --num_gpus 2 examples/learning_by_ignoring/train.py ...   # or torchrun --nproc_per_node 2

Under a launcher (N ranks) every level reads the whole global batch and trains on
its rank's contiguous rows of it; each data term is that rank's sum times N / n
(n: the global batch size), so that the library's average over ranks is the
mean over the whole batch, as in one process, even where N does not divide n
(the 1167 source examples). Every rank holds all the weight logits, so the
weighted loss's normalizer (n, or sum w over the global batch) is the global one.
Only rank 0 prints and writes --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from scalemlo import Engine, EngineConfig, Level, LevelConfig  # noqa: E402
from scalemlo.distributed import add_launcher_arguments, is_main_process, rank, world_size  # noqa: E402

HERE = Path(__file__).resolve().parent

# Every key the config may hold, with its default. Unknown keys are an error.
DEFAULTS: dict = {
    "data": {
        "target_per_class": 3,  # labelled target training examples per class
        "n_val": 100,  # target validation set (the top level's objective)
        "n_test": 500,  # target test set (reported, never trained on)
        "harmful_fraction": 0.5,  # share of source examples whose label is y -> (y + 1) mod 10
        "source_noise": 0.1,  # std of Gaussian pixel noise on source images (a mild domain shift)
    },
    "model": {"hidden": 0},  # 0: logistic regression; > 0: one hidden ReLU layer of this width
    # batch_size 0: full batch. normalize: divide the weighted loss by sum(w) (else by the batch size).
    "pretrain": {"lr": 0.02, "weight_decay": 1.0e-3, "batch_size": 0, "normalize": False},
    "finetune": {"lr": 0.02, "mu": 0.1},
    "reweight": {"optimizer": "adam", "lr": 0.05, "init_logit": 0.0},
    "schedule": {
        "max_steps": 4000,  # global iterations (finetune steps once per iteration)
        "warmup_steps": 1000,  # iterations before reweight first steps
        "pretrain_unroll": 2,  # finetune steps per pretrain step
        "reweight_unroll": 5,  # pretrain steps per reweight step
        "valid_every": 500,
    },
    # Hypergradient methods, by the name used in the report. Each entry is a set of
    # LevelConfig fields, applied to BOTH reweight and pretrain (the upper levels).
    "methods": {
        "cg": {"method": "cg", "cg_iterations": 5},
        "neumann": {"method": "neumann", "neumann_iterations": 20, "neumann_alpha": 1.0},
    },
    # Reference systems run besides the learned weights, all with reweight frozen:
    # target_only (mu = 0, no transfer), uniform (all weights equal), oracle (harmful weight ~0).
    "references": ["target_only", "uniform", "oracle"],
}
REFERENCES = ("target_only", "uniform", "oracle")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SMOKE = {"schedule": {"max_steps": 60, "warmup_steps": 20, "valid_every": 0}}
LEVEL_KEYS_OWNED_HERE = ("unroll_steps", "warmup_steps")


def merge_strict(base: dict, override: dict, where: str = "config") -> dict:
    """``base`` updated by ``override``; a key that ``base`` lacks is an error."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in base:
            raise ValueError(f"unknown key {where}.{key}; known keys: {sorted(base)}")
        if key == "methods":
            if not isinstance(value, dict) or not value:
                raise ValueError(f"{where}.methods must be a non-empty mapping name -> LevelConfig fields")
            out[key] = copy.deepcopy(value)
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key} must be a mapping, got {value!r}")
            out[key] = merge_strict(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    cfg = merge_strict(DEFAULTS, raw)
    for name, fields in cfg["methods"].items():
        if not isinstance(fields, dict) or "method" not in fields:
            raise ValueError(f"config.methods.{name} must be a mapping with at least 'method'")
        owned = [k for k in LEVEL_KEYS_OWNED_HERE if k in fields]
        if owned:
            raise ValueError(f"config.methods.{name}: {owned} are set from config.schedule, not per method")
        LevelConfig.from_dict(fields)  # unknown or bad LevelConfig keys fail here, before any run
    if cfg["reweight"]["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"config.reweight.optimizer must be one of {sorted(OPTIMIZERS)}")
    unknown = [r for r in cfg["references"] if r not in REFERENCES]
    if unknown:
        raise ValueError(f"config.references: unknown {unknown}; known: {list(REFERENCES)}")
    return cfg


# ---- data -------------------------------------------------------------------------------


def make_domains(cfg: dict, seed: int) -> dict:
    """Target train / val / test and a source set with known harmful examples, from load_digits."""
    d = cfg["data"]
    x_all, y_all = load_digits(return_X_y=True)
    x_all = (x_all / 16.0).astype(np.float32)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(y_all))
    per_class = d["target_per_class"]
    target_idx = np.concatenate([order[y_all[order] == k][:per_class] for k in range(10)])
    rest = order[~np.isin(order, target_idx)]
    val_idx, test_idx = rest[: d["n_val"]], rest[d["n_val"] : d["n_val"] + d["n_test"]]
    source_idx = rest[d["n_val"] + d["n_test"] :]
    if len(source_idx) < 10:
        raise ValueError("data: n_val + n_test leave almost no source examples")
    n_source = len(source_idx)
    harmful = np.zeros(n_source, dtype=bool)
    harmful[rng.permutation(n_source)[: int(round(d["harmful_fraction"] * n_source))]] = True
    x_source = x_all[source_idx] + d["source_noise"] * rng.randn(n_source, 64).astype(np.float32)
    y_source = np.where(harmful, (y_all[source_idx] + 1) % 10, y_all[source_idx])

    def t(a, dtype=torch.float32):
        return torch.as_tensor(a, dtype=dtype)

    return {
        "target": (t(x_all[target_idx]), t(y_all[target_idx], torch.long)),
        "val": (t(x_all[val_idx]), t(y_all[val_idx], torch.long)),
        "test": (t(x_all[test_idx]), t(y_all[test_idx], torch.long)),
        "source": (t(x_source), t(y_source, torch.long), torch.arange(n_source)),
        "harmful": torch.as_tensor(harmful),
    }


class SourceBatches:
    """The source set as (x, y, index) batches; full batch or reshuffled minibatches."""

    def __init__(self, source, batch_size: int, seed: int):
        self.x, self.y, self.idx = source
        self.batch_size = batch_size if batch_size > 0 else len(self.y)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        n = len(self.y)
        order = torch.arange(n) if self.batch_size >= n else torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            i = order[start : start + self.batch_size]
            yield self.x[i], self.y[i], self.idx[i]


# ---- this rank's part of a global batch ----------------------------------------------------


def share(n: int) -> slice:
    """This rank's contiguous rows of a global batch of n examples (all of them on one rank).

    The shares differ by at most one row when the number of ranks does not divide n.
    """
    r, size = rank(), world_size()
    return slice(r * n // size, (r + 1) * n // size)


def mean_cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over the global batch (x, y), as this rank's part of it.

    N ranks: the sum over this rank's rows times N / n, whose average over the ranks
    (the library's) is the mean over all n rows. One rank: the mean itself.
    """
    size = world_size()
    if size == 1:
        return F.cross_entropy(model(x), y)
    rows = share(len(y))
    return F.cross_entropy(model(x[rows]), y[rows], reduction="sum") * (size / len(y))


# ---- the three levels -------------------------------------------------------------------


def make_model(hidden: int) -> torch.nn.Module:
    if hidden <= 0:
        model = torch.nn.Linear(64, 10)
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        return model
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


class SourceLogits(torch.nn.Module):
    """One weight logit per source example; forward(idx) -> sigmoid weights."""

    def __init__(self, n: int, init: float):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.full((n,), float(init)))

    def forward(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.sigmoid(self.logits)
        return w if idx is None else w[idx]


class Finetune(Level):
    """C: target loss plus mu/2 ||c - b||^2 to the pretrained weights b."""

    def __init__(self, *args, mu: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.mu = mu

    def training_step(self, batch):
        x, y = batch
        loss = mean_cross_entropy(self.module, x, y)
        if self.mu:
            b = self.uppers["pretrain"].module.parameters()
            loss = loss + 0.5 * self.mu * sum(((c - bi) ** 2).sum() for c, bi in zip(self.module.parameters(), b))
        return loss


class Pretrain(Level):
    """B: source loss weighted by sigmoid(a_i) (divided by n, or by sum w if normalize), plus L2."""

    def __init__(self, *args, weight_decay: float, normalize: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_decay = weight_decay
        self.normalize = normalize

    def training_step(self, batch):
        x, y, idx = batch
        w = self.uppers["reweight"](idx)  # the weights of the whole global batch: the normalizer is global
        denominator = w.sum() if self.normalize else len(y)
        rows = share(len(y))  # this rank's examples; times N below, so that the ranks' average is the sum / n
        losses = F.cross_entropy(self.module(x[rows]), y[rows], reduction="none")
        loss = (w[rows] * losses).sum() * world_size() / denominator
        return loss + 0.5 * self.weight_decay * sum((p**2).sum() for p in self.module.parameters())


class Reweight(Level):
    """A: the fine-tuned model's loss on the target validation set."""

    def __init__(self, *args, harmful: torch.Tensor, val, test, **kwargs):
        super().__init__(*args, **kwargs)
        self.harmful = harmful
        self.val = val
        self.test = test  # only reported in the trace; nothing is selected on it

    def training_step(self, batch):
        x, y = batch
        return mean_cross_entropy(self.level("finetune"), x, y)

    def validation_step(self):
        c = self.level("finetune")
        return {
            "target_val_acc": accuracy(c, self.val),
            "target_test_acc": accuracy(c, self.test),
            **weight_stats(self.module(), self.harmful),
        }


def weight_stats(w: torch.Tensor, harmful: torch.Tensor) -> dict:
    w = w.detach()
    stats = {"w_harmful": float(w[harmful].mean()), "w_useful": float(w[~harmful].mean())}
    # AUC of "weight ranks useful above harmful"; 0.5 when the weights are all equal.
    stats["weight_auc"] = float(roc_auc_score((~harmful).numpy(), w.numpy())) if w.max() > w.min() else 0.5
    return stats


def accuracy(model: torch.nn.Module, data) -> float:
    x, y = data
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ---- one system ---------------------------------------------------------------------------


def run_system(cfg: dict, domains: dict, system: str, seed: int) -> dict:
    """Build and run the three-level program for one system; returns its metrics.

    system: a key of cfg["methods"] (learned weights), or a reference
    (target_only, uniform, oracle) in which reweight never steps.
    """
    sched = cfg["schedule"]
    learned = system in cfg["methods"]
    # References never step reweight; pretrain still has a level below it and so a (trivial) method.
    method_fields = cfg["methods"][system] if learned else {"method": "cg"}
    torch.manual_seed(seed)

    n_source = len(domains["source"][1])
    harmful = domains["harmful"]
    weigher = SourceLogits(n_source, cfg["reweight"]["init_logit"])
    if system == "oracle":
        with torch.no_grad():
            weigher.logits.copy_(torch.where(harmful, -10.0, 10.0))
    net_b, net_c = make_model(cfg["model"]["hidden"]), make_model(cfg["model"]["hidden"])

    # A reference keeps reweight frozen for the whole run (warmup_steps = max_steps).
    frozen_top = sched["max_steps"] if not learned else sched["warmup_steps"]
    reweight = Reweight(
        "reweight",
        weigher,
        lambda p: OPTIMIZERS[cfg["reweight"]["optimizer"]](p, lr=cfg["reweight"]["lr"]),
        data=[domains["val"]],
        config=LevelConfig(**method_fields, unroll_steps=sched["reweight_unroll"], warmup_steps=frozen_top),
        harmful=harmful,
        val=domains["val"],
        test=domains["test"],
    )
    pretrain = Pretrain(
        "pretrain",
        net_b,
        lambda p: torch.optim.Adam(p, lr=cfg["pretrain"]["lr"]),
        data=SourceBatches(domains["source"], cfg["pretrain"]["batch_size"], seed),
        config=LevelConfig(**method_fields, unroll_steps=sched["pretrain_unroll"]),
        weight_decay=cfg["pretrain"]["weight_decay"],
        normalize=cfg["pretrain"]["normalize"],
    )
    finetune = Finetune(
        "finetune",
        net_c,
        lambda p: torch.optim.Adam(p, lr=cfg["finetune"]["lr"]),
        data=[domains["target"]],
        mu=0.0 if system == "target_only" else cfg["finetune"]["mu"],
    )
    engine = Engine(
        [reweight, pretrain, finetune],
        {"reweight": ["pretrain"], "pretrain": ["finetune"]},
        EngineConfig(
            max_steps=sched["max_steps"],
            valid_every=sched["valid_every"],
            log_every=max(sched["max_steps"], 1),
            seed=seed,
            progress_bar=False,
        ),
    )
    start = time.perf_counter()
    history = engine.run()
    wall = time.perf_counter() - start
    weights = weigher().detach()
    with torch.no_grad():  # the top level's objective at the end
        val_loss = float(F.cross_entropy(net_c(domains["val"][0]), domains["val"][1]))
    out = {
        "test_acc": accuracy(net_c, domains["test"]),
        "val_acc": accuracy(net_c, domains["val"]),
        "val_loss": val_loss,
        "pretrained_test_acc": accuracy(net_b, domains["test"]),
        **weight_stats(weights, harmful),
        "reweight_steps": reweight.steps,
        "pretrain_steps": pretrain.steps,
        "finetune_steps": finetune.steps,
        "wall_s": wall,
        "trace": [
            {k: v for k, v in h.items() if k == "step" or k.startswith("valid/")}
            for h in history
            if any(k.startswith("valid/") for k in h)
        ],
        "weights": weights,
    }
    return out


def run_seed(cfg: dict, seed: int, systems: list[str], verbose: bool = True) -> dict:
    domains = make_domains(cfg, seed)
    results = {}
    for system in systems:
        results[system] = run_system(cfg, domains, system, seed)
        if verbose:
            r = results[system]
            print(
                f"seed {seed} {system:>12}: target test acc {r['test_acc']:.4f} (val {r['val_acc']:.4f}, "
                f"pretrained-only {r['pretrained_test_acc']:.4f})  w harmful {r['w_harmful']:.3f} "
                f"useful {r['w_useful']:.3f} AUC {r['weight_auc']:.3f}  steps A/B/C "
                f"{r['reweight_steps']}/{r['pretrain_steps']}/{r['finetune_steps']}  {r['wall_s']:.1f}s",
                flush=True,
            )
            for row in r["trace"] if system in cfg["methods"] else []:
                parts = " ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in row.items() if k != "step")
                print(f"    step {row['step']:>5}: {parts}", flush=True)
    return {"seed": seed, "n_source": len(domains["harmful"]), "systems": results}


SUMMARY_KEYS = (
    "test_acc",
    "val_acc",
    "val_loss",
    "pretrained_test_acc",
    "w_harmful",
    "w_useful",
    "weight_auc",
    "wall_s",
)


def summarize(runs: list[dict], systems: list[str]) -> dict:
    summary = {}
    for system in systems:
        summary[system] = {}
        for key in SUMMARY_KEYS:
            values = [run["systems"][system][key] for run in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[system][key] = {"mean": statistics.fmean(values), "std": std, "values": values}
    return summary


def mean_std(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def print_table(summary: dict, n: int) -> None:
    print(f"\nmean ± std over {n} seed(s)")
    head = f"{'system':>12} | {'target test acc':>17} | {'mean w harmful':>15} | {'mean w useful':>15} | "
    print(head + f"{'weight AUC':>13} | {'wall s':>10}")
    for system, s in summary.items():
        print(
            f"{system:>12} | {mean_std(s['test_acc'], 4):>17} | {mean_std(s['w_harmful']):>15} | "
            f"{mean_std(s['w_useful']):>15} | {mean_std(s['weight_auc']):>13} | {mean_std(s['wall_s'], 1):>10}"
        )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(HERE / "config.yaml"), help="YAML config (default: config.yaml beside)")
    p.add_argument("--seed", type=int, default=0, help="seed of a single run")
    p.add_argument("--seeds", type=int, default=0, help="run seeds 0..N-1 and print mean ± std")
    p.add_argument("--max-steps", type=int, default=None, help="override schedule.max_steps")
    p.add_argument("--smoke", action="store_true", help="tiny fast run (60 iterations)")
    p.add_argument("--systems", nargs="+", default=None, help="subset of the reference systems and method names")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the models are tiny)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument("--out", default=None, help="write the returned numbers as JSON here (rank 0 only)")
    add_launcher_arguments(p)  # the deepspeed launcher passes --local_rank
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg = load_config(args.config)
    if args.smoke:
        cfg = merge_strict(cfg, SMOKE)
    if args.max_steps is not None:
        cfg["schedule"]["max_steps"] = args.max_steps
        cfg["schedule"]["warmup_steps"] = min(cfg["schedule"]["warmup_steps"], args.max_steps // 4)
    systems = list(cfg["references"]) + list(cfg["methods"])
    if args.systems:
        unknown = [s for s in args.systems if s not in systems]
        if unknown:
            raise ValueError(f"--systems: unknown {unknown}; known: {systems}")
        systems = args.systems
    seeds = list(range(args.seeds)) if args.seeds > 0 else [args.seed]
    start = time.perf_counter()
    main_process = is_main_process()
    runs = [run_seed(cfg, seed, systems, verbose=not args.quiet and main_process) for seed in seeds]
    summary = summarize(runs, systems)
    total = time.perf_counter() - start
    result = {
        "config": cfg,
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
        "world_size": world_size(),
        "wall_s": total,
    }
    if main_process:
        print_table(summary, len(seeds))
        print(f"total wall time {total:.1f}s ({total / len(seeds):.1f}s per seed, {world_size()} rank(s))")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=lambda t: t.tolist()))
    return result


if __name__ == "__main__":
    result = main()
    if any(math.isnan(s["test_acc"]["mean"]) for s in result["summary"].values()):
        raise SystemExit("a system produced NaN accuracy")
