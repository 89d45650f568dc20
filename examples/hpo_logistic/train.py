"""Learn a per-feature weight decay for logistic regression with scalemlo.

    python examples/hpo_logistic/train.py [--config PATH] [--max-steps N] [--seed S] [--method M] [--out JSON]
    deepspeed --num_gpus 2 examples/hpo_logistic/train.py ...      # or: torchrun --nproc_per_node 2 ...

A bilevel program on scikit-learn's breast-cancer data (569 examples, 30
features), split into a small train split, a validation split and a test split:

- lower level "model": logistic regression ``nn.Linear(30, 1)`` trained on
  mean BCE-with-logits over the train split + 0.5 * sum(exp(log_decay) * w**2);
- upper level "hyper": ``log_decay`` (one entry per feature), trained on the
  mean BCE over the validation split through the hypergradient (method chosen
  in the config, cg by default).

It prints the validation and test numbers of logistic regression fitted to
convergence with the initial decay (BEFORE) and with the learned decay (AFTER),
and returns them from ``main()``. Each level runs in its own DeepSpeed engine
(ZeRO-0, fp32); no launcher or GPU is needed. Under a launcher (N ranks) each
rank trains on its contiguous 1/N share of the train split and of the
validation split (``scalemlo.distributed.rank_share``); both losses are means
over examples, so N ranks compute the one-process program up to float rounding.
Only rank 0 prints and writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: no GPU, no warning

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import scalemlo  # noqa: E402
from scalemlo import Engine, EngineConfig, Level, LevelConfig  # noqa: E402
from scalemlo.distributed import add_launcher_arguments, is_main_process, rank_share, world_size  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "config.yaml"

# Every key the config may hold; anything else is an error.
SCHEMA: dict[str, Any] = {
    "seed": None,
    "data": {"train_size", "val_size"},
    "model": {"optimizer", "lr", "momentum"},
    "hyper": {"init_decay", "optimizer", "lr", "level"},  # level: a scalemlo.LevelConfig dict
    "engine": None,  # a scalemlo.EngineConfig dict (checked by EngineConfig.from_dict)
}
REQUIRED = {
    "data": {"train_size", "val_size"},
    "model": {"optimizer", "lr"},
    "hyper": {"init_decay", "optimizer", "lr", "level"},
}
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


# ---- configuration ------------------------------------------------------------------------------
def load_config(path: str | Path) -> dict:
    """Read a YAML (.yaml/.yml) or JSON config and check its keys."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or pass a JSON config") from None
        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the config must be a mapping, got {type(cfg).__name__}")
    check_config(cfg, str(path))
    return cfg


def check_config(cfg: dict, where: str) -> None:
    unknown = sorted(set(cfg) - set(SCHEMA))
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}; known keys: {sorted(SCHEMA)}")
    for section, keys in SCHEMA.items():
        if keys is None:
            continue
        value = cfg.get(section)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: section {section!r} must be a mapping")
        unknown = sorted(set(value) - keys)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} in {section!r}; known keys: {sorted(keys)}")
        missing = sorted(REQUIRED[section] - set(value))
        if missing:
            raise ValueError(f"{where}: section {section!r} is missing {missing}")
    for section in ("model", "hyper"):
        name = cfg[section]["optimizer"]
        if name not in OPTIMIZERS:
            raise ValueError(f"{where}: {section}.optimizer={name!r}; allowed values: {', '.join(OPTIMIZERS)}")
    if "seed" in cfg.get("engine", {}):
        raise ValueError(f"{where}: set the top-level 'seed', not engine.seed")


def in_section(where: str, section: str, build, values: dict):
    """``build(values)``, naming the config file and section in a ValueError."""
    try:
        return build(values)
    except ValueError as err:
        raise ValueError(f"{where}: section {section!r}: {err}") from None


# ---- data ---------------------------------------------------------------------------------------
def load_splits(train_size: int, val_size: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Breast-cancer data split train / val / test (the rest), standardized with train statistics."""
    from sklearn.datasets import load_breast_cancer

    x_all, y_all = load_breast_cancer(return_X_y=True)
    x_all = torch.tensor(x_all, dtype=torch.float64)
    y_all = torch.tensor(y_all, dtype=torch.float64)
    if train_size < 2 or val_size < 1 or train_size + val_size >= len(x_all):
        raise ValueError(
            f"train_size={train_size}, val_size={val_size}: need train_size >= 2, val_size >= 1 "
            "and a non-empty test split"
        )
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
    parts = {
        "train": order[:train_size],
        "val": order[train_size : train_size + val_size],
        "test": order[train_size + val_size :],
    }
    mean = x_all[parts["train"]].mean(0)
    std = x_all[parts["train"]].std(0).clamp_min(1e-12)
    return {name: ((x_all[idx] - mean) / std, y_all[idx]) for name, idx in parts.items()}


def as_float32(split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return split[0].float(), split[1].float()


# ---- the two levels -----------------------------------------------------------------------------
class LogDecay(torch.nn.Module):
    """The upper level's parameters: log of the weight decay of each feature."""

    def __init__(self, features: int, init_decay: float):
        super().__init__()
        self.log_decay = torch.nn.Parameter(torch.full((features,), math.log(init_decay)))

    def forward(self) -> torch.Tensor:
        return self.log_decay


class Model(Level):
    """Lower level: mean BCE on the train split + 0.5 * sum(exp(log_decay) * w**2) (the bias is not decayed)."""

    def __init__(self, *args, val: tuple[torch.Tensor, torch.Tensor], **kwargs):
        super().__init__(*args, **kwargs)
        self.val = val

    def training_step(self, batch):
        x, y = batch
        logits = self.module(x).squeeze(-1)
        decay = self.uppers["hyper"]().exp()
        return F.binary_cross_entropy_with_logits(logits, y) + 0.5 * (decay * self.module.weight.squeeze(0) ** 2).sum()

    def validation_step(self):
        x, y = self.val
        logits = self.module(x).squeeze(-1)
        return {"val_loss": F.binary_cross_entropy_with_logits(logits, y), "val_acc": accuracy(logits, y)}


class Hyper(Level):
    """Upper level: mean BCE of the lower level's model on the validation split."""

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.lowers["model"](x).squeeze(-1), y)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(((logits > 0).to(y.dtype) == y).to(torch.float64).mean())


# ---- reference fit and evaluation (plain torch, float64) -----------------------------------------
def fit_to_convergence(x: torch.Tensor, y: torch.Tensor, log_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of the regularized logistic regression, by L-BFGS in float64 from zero."""
    decay = log_decay.detach().to(torch.float64).exp()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=5000,
        tolerance_grad=1e-10,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * (decay * w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def evaluate(w: torch.Tensor, b: torch.Tensor, splits: dict) -> dict[str, float]:
    out = {}
    for name in ("train", "val", "test"):
        x, y = splits[name]
        logits = x.to(w.dtype) @ w + b
        out[f"{name}_loss"] = float(F.binary_cross_entropy_with_logits(logits, y.to(w.dtype)))
        out[f"{name}_acc"] = accuracy(logits, y)
    return out


def describe(numbers: dict[str, float]) -> str:
    return (
        f"train loss {numbers['train_loss']:.4f} | val loss {numbers['val_loss']:.4f} | "
        f"test loss {numbers['test_loss']:.4f}  test acc {100 * numbers['test_acc']:.1f}%"
    )


# ---- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML or JSON config (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None, help="override engine.max_steps (global iterations)")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed (data split and init)")
    parser.add_argument("--method", default=None, choices=sorted(scalemlo.METHODS), help="override hyper.level.method")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads during the run (default 1)")
    parser.add_argument("--out", default=None, help="write the returned numbers as JSON here (rank 0 only)")
    add_launcher_arguments(parser)  # the deepspeed launcher passes --local_rank
    return parser.parse_args(argv)


def say(*args, **kwargs) -> None:
    """print on rank 0 only (every rank computes the same numbers)."""
    if is_main_process():
        print(*args, **kwargs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # A 31-parameter model gains nothing from intra-op threads, and on a busy machine their
    # spinning makes each tiny op ~100x slower; restored on the way out (main() may be imported).
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
    seed = int(args.seed if args.seed is not None else cfg.get("seed", 0))
    engine_values = dict(cfg.get("engine", {}))
    if args.max_steps is not None:
        engine_values["max_steps"] = args.max_steps
    engine_values.setdefault("progress_bar", False)
    engine_config = in_section(args.config, "engine", EngineConfig.from_dict, {**engine_values, "seed": seed})
    level_values = dict(cfg["hyper"]["level"])
    if args.method is not None:
        level_values["method"] = args.method
    # The upper level's LevelConfig decides how its hypergradient is computed.
    hyper_config = in_section(args.config, "hyper.level", LevelConfig.from_dict, level_values)
    init_decay = float(cfg["hyper"]["init_decay"])
    if not init_decay > 0:
        raise ValueError(f"hyper.init_decay must be > 0, got {init_decay}")

    splits = load_splits(int(cfg["data"]["train_size"]), int(cfg["data"]["val_size"]), seed)
    x_train, y_train = splits["train"]
    features = x_train.shape[1]
    say(
        f"breast cancer: {features} features; train {len(x_train)} / val {len(splits['val'][0])} / "
        f"test {len(splits['test'][0])} examples (seed {seed})"
    )

    # BEFORE: logistic regression fitted to convergence with the initial decay.
    torch.manual_seed(seed)
    hyper_module = LogDecay(features, init_decay)
    w0, b0 = fit_to_convergence(x_train, y_train, hyper_module.log_decay)
    before = evaluate(w0, b0, splits)
    say(f"BEFORE  decay = {init_decay:g} on every feature, model fitted to convergence")
    say(f"        {describe(before)}")

    # The bilevel program; the lower level starts from that fit, i.e. at its optimum.
    linear = torch.nn.Linear(features, 1)
    with torch.no_grad():
        linear.weight.copy_(w0.float().unsqueeze(0))
        linear.bias.copy_(b0.float().reshape(1))
    model_cfg = cfg["model"]
    model_opt_kwargs = {"lr": float(model_cfg["lr"])}
    if "momentum" in model_cfg:
        if model_cfg["optimizer"] != "sgd":
            raise ValueError("model.momentum is only used by model.optimizer=sgd")
        model_opt_kwargs["momentum"] = float(model_cfg["momentum"])
    # Each rank trains on its share of the train split and of the validation split: the
    # levels' losses are means over examples, and the library averages over ranks, so N
    # ranks compute the one-process program (up to float rounding). The regularizer is
    # the same on every rank, and stays itself under the average.
    model = Model(
        "model",
        linear,
        OPTIMIZERS[model_cfg["optimizer"]](linear.parameters(), **model_opt_kwargs),
        data=[rank_share(as_float32(splits["train"]), "train split")],
        val=as_float32(splits["val"]),
    )
    hyper = Hyper(
        "hyper",
        hyper_module,
        OPTIMIZERS[cfg["hyper"]["optimizer"]](hyper_module.parameters(), lr=float(cfg["hyper"]["lr"])),
        data=[rank_share(as_float32(splits["val"]), "validation split")],
        config=hyper_config,
    )

    def report(engine: Engine, metrics: dict) -> None:
        if "valid/model/val_loss" in metrics:
            say(
                f"  step {engine.global_step:5d}: hyper steps {hyper.steps:4d} | model val loss "
                f"{metrics['valid/model/val_loss']:.4f}  val acc {100 * metrics['valid/model/val_acc']:.1f}%"
            )

    engine = Engine([hyper, model], {"hyper": ["model"]}, engine_config, callbacks=[report])
    say(
        f"meta-learning: method={hyper_config.method}, {engine_config.max_steps} model steps, "
        f"one hyper step every {engine.period['hyper']} (unroll_steps); {world_size()} rank(s)"
    )
    engine.run()

    # AFTER: the engine's model as it stands, and a fresh fit to convergence with the learned decay.
    learned = hyper_module.log_decay.detach().clone()
    with torch.no_grad():
        continued = evaluate(linear.weight.squeeze(0).double(), linear.bias.squeeze(0).double(), splits)
    w1, b1 = fit_to_convergence(x_train, y_train, learned)
    after = evaluate(w1, b1, splits)
    decay = learned.exp()
    say(
        f"AFTER   learned decay: min {decay.min():.3g}  median {decay.median():.3g}  max {decay.max():.3g} "
        f"(started at {init_decay:g})"
    )
    say(f"        engine's model:    {describe(continued)}")
    say(f"        refit to converge: {describe(after)}")
    wall = time.perf_counter() - start
    say(
        f"val_loss before={before['val_loss']:.4f} after={after['val_loss']:.4f} | "
        f"test_acc before={before['test_acc']:.4f} after={after['test_acc']:.4f} | {wall:.1f}s after imports"
    )
    return {
        "before": before,
        "after": after,
        "after_engine_model": continued,
        "learned_log_decay": learned.tolist(),
        "hyper_steps": hyper.steps,
        "world_size": world_size(),
        "seconds": wall,
    }


if __name__ == "__main__":
    main()
