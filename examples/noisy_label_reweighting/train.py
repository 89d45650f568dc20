"""Meta-Weight-Net data reweighting on scikit-learn's digits with 40 % symmetric label noise.

Two levels:

- classifier (lower): an MLP 64 -> 128 -> 10 trained on noisy labels with the
  weighted loss sum_i w_i loss_i / N, where w_i = sigmoid(z_i - median_batch z),
  z_i = MetaWeightNet(held(loss_i)) (``weight_net.link: centered``; ``Level.held``: the
  input is a constant of the step in every hypergradient evaluation too); with
  ``weight_net.normalize: mean`` the weights are divided by their batch mean
  (gradient through the mean, as in Meta-Weight-Net's code).
- reweight (upper): the weight net, an MLP 1 -> 100 -> 1 whose output layer
  starts at zero (every weight equal), trained on the classifier's
  cross-entropy on a small clean meta set (10 examples per class held out of
  the training pool).

Compared with the same classifier, optimizer and number of steps trained
(1) on the noisy set with the plain mean loss ("uniform") and (3) on the
clean meta set alone ("meta_only"). Every system is a scalemlo program whose
levels each run in their own DeepSpeed ZeRO-0 fp32 engine. Under a launcher
each rank trains on its contiguous share of every global batch and of the
meta set (``scalemlo.distributed.rank_share``); only rank 0 prints and writes
``--out``.

Run from the repository root:

    python examples/noisy_label_reweighting/train.py             # seed 0
    python examples/noisy_label_reweighting/train.py --seeds 10  # seeds 0-9 and a mean ± std table
    deepspeed --num_gpus 2 examples/noisy_label_reweighting/train.py --smoke   # or torchrun --nproc_per_node 2
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
from scalemlo.distributed import add_launcher_arguments, is_main_process, rank_share, world_size  # noqa: E402

HERE = Path(__file__).resolve().parent

# Every key the config may hold, with its default. Unknown keys are an error.
DEFAULTS: dict = {
    "data": {
        "split_seed": 0,  # train/test split; everything else follows the run seed
        "test_fraction": 0.3,
        "meta_per_class": 10,  # clean meta examples per class, held out of the training pool
        "noise": 0.4,  # share of training labels replaced by one of the other 9 classes
    },
    "model": {"hidden": 128},
    "classifier": {"lr": 1.0e-3, "weight_decay": 0.0, "batch_size": 100},
    "weight_net": {
        "hidden": 100,
        "lr": 1.0e-2,
        "beta1": 0.9,  # Adam's first-moment decay
        "weight_decay": 0.0,
        "normalize": "mean",
        # centered: w = sigmoid(z - median of z over the batch); sigmoid: w = sigmoid(z);
        # exp: w = exp(z) (needs normalize: mean, i.e. a softmax over the batch)
        "link": "centered",
        "init": "uniform",  # uniform: output layer zero, every weight equal at start; random: torch's default
        "input": "held",  # held: Level.held(loss), constant in every hypergradient evaluation; detached: loss.detach()
    },
    "schedule": {
        "max_steps": 3000,  # classifier steps, the same for every system
        "unroll_steps": 1,  # classifier steps per weight-net step
        "warmup_steps": 300,  # iterations before the weight net first steps
        "eval_every": 100,  # test accuracy and meta-set loss (for early stopping) every N steps; 0: never
        "print_every": 500,  # print a progress line every N steps (a multiple of eval_every)
    },
    # Learned-weighting systems, by the name used in the report: LevelConfig fields of the
    # reweight level (method, fd_radius, ...). unroll_steps and warmup_steps come from schedule.
    "methods": {"sama": {"method": "sama"}, "finite_difference": {"method": "finite_difference"}},
    "references": ["uniform", "meta_only"],
}
REFERENCES = ("uniform", "meta_only")
NORMALIZE = ("none", "mean")
LINKS = ("sigmoid", "exp", "centered")
INITS = ("random", "uniform")
INPUTS = ("held", "detached")
SCHEDULE_KEYS = ("unroll_steps", "warmup_steps")
SMOKE = {"schedule": {"max_steps": 60, "warmup_steps": 20, "eval_every": 20, "print_every": 20}}


# ---- configuration ----------------------------------------------------------------


def merge_strict(base: dict, override: dict, where: str = "config", replace_methods: bool = True) -> dict:
    """``base`` updated by ``override``; a key ``base`` does not have is an error.

    ``methods`` is the one free-form mapping (its names are the user's); its
    entries are checked by ``LevelConfig.from_dict`` instead. A config file's
    ``methods`` replaces the default set (``replace_methods``); an override
    (``--set methods.sama.fd_radius=0.1``) updates or adds single entries.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(f"{where}: unknown key {key!r}; known keys: {sorted(base)}")
        if key == "methods":
            if not isinstance(value, dict) or not value:
                raise ValueError(f"{where}.methods must be a non-empty mapping name -> LevelConfig fields")
            if replace_methods:
                out[key] = copy.deepcopy(value)
            else:
                for name, fields in value.items():
                    if not isinstance(fields, dict):
                        raise ValueError(f"{where}.methods.{name} must be a mapping of LevelConfig fields")
                    out[key][name] = {**out[key].get(name, {}), **copy.deepcopy(fields)}
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key} must be a mapping, got {value!r}")
            out[key] = merge_strict(base[key], value, f"{where}.{key}")
        else:
            number = (int, float)
            if isinstance(base[key], number) and not isinstance(base[key], bool):
                if isinstance(value, bool) or not isinstance(value, number):
                    raise ValueError(f"{where}.{key} must be a number, got {value!r} (write 1.0e-3, not 1e-3, in YAML)")
            out[key] = value
    return out


def check_config(cfg: dict) -> None:
    """Reject bad values before anything is trained."""
    if cfg["weight_net"]["normalize"] not in NORMALIZE:
        raise ValueError(f"weight_net.normalize must be one of {NORMALIZE}, got {cfg['weight_net']['normalize']!r}")
    if cfg["weight_net"]["link"] not in LINKS:
        raise ValueError(f"weight_net.link must be one of {LINKS}, got {cfg['weight_net']['link']!r}")
    if cfg["weight_net"]["init"] not in INITS:
        raise ValueError(f"weight_net.init must be one of {INITS}, got {cfg['weight_net']['init']!r}")
    if cfg["weight_net"]["input"] not in INPUTS:
        raise ValueError(f"weight_net.input must be one of {INPUTS}, got {cfg['weight_net']['input']!r}")
    if cfg["weight_net"]["link"] == "exp" and cfg["weight_net"]["normalize"] != "mean":
        raise ValueError("weight_net.link: exp needs weight_net.normalize: mean (exp(z) alone is unbounded)")
    for ref in cfg["references"]:
        if ref not in REFERENCES:
            raise ValueError(f"references: unknown system {ref!r}; known: {list(REFERENCES)}")
    for name, fields in cfg["methods"].items():
        if name in REFERENCES:
            raise ValueError(f"methods: the name {name!r} is taken by a reference system")
        if not isinstance(fields, dict):
            raise ValueError(f"methods.{name} must be a mapping of LevelConfig fields, got {fields!r}")
        for key in SCHEDULE_KEYS:
            if key in fields:
                raise ValueError(f"methods.{name}.{key}: set it under schedule, it is shared by every method")
        LevelConfig.from_dict(fields)  # unknown or bad fields fail here
    sched = cfg["schedule"]
    if sched["eval_every"] and sched["print_every"] % sched["eval_every"]:
        raise ValueError("schedule.print_every must be a multiple of schedule.eval_every")
    if not 0 <= cfg["data"]["noise"] < 1:
        raise ValueError(f"data.noise must be in [0, 1), got {cfg['data']['noise']}")


def load_config(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    cfg = merge_strict(DEFAULTS, raw, str(path))
    check_config(cfg)
    return cfg


def parse_set(items: list[str]) -> dict:
    """``a.b=value`` strings (value parsed as YAML) -> a nested dict."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        path, value = item.split("=", 1)
        node = out
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[keys[-1]] = parsed
    return out


# ---- data -------------------------------------------------------------------------


def make_data(cfg: dict, seed: int) -> dict:
    """Fixed train/test split; per-seed meta set and label noise."""
    d = cfg["data"]
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.RandomState(d["split_seed"]).permutation(len(y))
    n_test = int(round(d["test_fraction"] * len(y)))
    test, pool = order[:n_test], order[n_test:]

    rng = np.random.RandomState(10_000 + seed)
    meta = np.concatenate([rng.choice(pool[y[pool] == c], d["meta_per_class"], replace=False) for c in range(10)])
    train = np.setdiff1d(pool, meta)
    train = train[rng.permutation(len(train))]
    y_true = y[train]
    noisy = np.zeros(len(train), dtype=bool)
    noisy[rng.choice(len(train), int(round(d["noise"] * len(train))), replace=False)] = True
    y_noisy = y_true.copy()
    # symmetric noise: a uniformly drawn *other* class
    y_noisy[noisy] = (y_true[noisy] + rng.randint(1, 10, size=int(noisy.sum()))) % 10

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    return {
        "x_train": t(x[train]),
        "y_train": t(y_noisy),
        "y_train_true": t(y_true),
        "noisy": t(noisy),
        "x_meta": t(x[meta]),
        "y_meta": t(y[meta]),
        "x_test": t(x[test]),
        "y_test": t(y[test]),
    }


class Batches:
    """Shuffled mini-batches of (x, y), reshuffled every pass, from its own generator.

    Every rank draws the same global batches (same generator seed) and keeps its
    contiguous share of each (``rank_share``): N ranks together see exactly the
    batches one process would.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size = x, y, min(batch_size, len(y))
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.generator)
        for i in range(0, len(perm) - self.batch_size + 1, self.batch_size):  # full batches only
            idx = perm[i : i + self.batch_size]
            yield rank_share((self.x[idx], self.y[idx]), "training batch")


# ---- models and levels ------------------------------------------------------------


def make_classifier(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def make_weight_net(hidden: int, link: str = "sigmoid", init: str = "random") -> torch.nn.Module:
    """Meta-Weight-Net: per-example loss -> weight in (0, 1) (sigmoid link) or log-weight z (exp link).

    With the exp link the output layer has no bias: under the softmax a shift of
    every z is invisible, and Adam would turn its float-noise gradient into steps.
    """
    layers = [torch.nn.Linear(1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1, bias=link == "sigmoid")]
    if init == "uniform":
        torch.nn.init.zeros_(layers[-1].weight)
        if layers[-1].bias is not None:
            torch.nn.init.zeros_(layers[-1].bias)
    if link == "sigmoid":
        layers.append(torch.nn.Sigmoid())
    return torch.nn.Sequential(*layers)


def example_weights(out: torch.Tensor, link: str, normalize: str) -> torch.Tensor:
    """The weights training uses, from the weight net's outputs ``out`` for one batch."""
    if link == "exp":  # exp(z) / mean(exp(z)), computed stably
        return torch.softmax(out, 0) * len(out)
    if link == "centered":  # sigmoid(z - median z): half the batch at most 1/2, half at least 1/2
        out = torch.sigmoid(out - out.median())
    return out / out.mean() if normalize == "mean" else out


class Classifier(Level):
    """Lower level: (weighted) cross-entropy on the training batches, a reweighted level.

    Its objective is Level's default for that structure, mean_i w_i l_i with the weight net reading
    the losses through ``Level.held`` (a constant of the step, also when a hypergradient re-evaluates
    this loss at moved parameters; README: "Why sama inverted"), which an upper level with
    ``shared_forward`` can also take its step inside of.
    """

    def __init__(self, *args, normalize: str, test: tuple, meta: tuple, link: str = "sigmoid", **kwargs):
        super().__init__(*args, **kwargs)
        self.normalize, self.link = normalize, link
        self.test, self.meta = test, meta

    def per_example_losses(self, batch):
        x, y = batch
        self.examples_seen = len(y)  # this rank's share of the global batch
        return F.cross_entropy(self.module(x), y, reduction="none")

    def example_weights(self, batch, losses):
        if "reweight" not in self.uppers:  # the reference systems: uniform weights
            return torch.ones_like(losses)
        out = self.uppers["reweight"](losses.unsqueeze(-1)).squeeze(-1)
        return example_weights(out, self.link, self.normalize)

    def validation_step(self):
        x, y = self.meta
        logits = self.module(x)
        return {
            "test_acc": accuracy(self.module, *self.test),
            "meta_acc": float((logits.argmax(-1) == y).float().mean()),
            "meta_loss": float(F.cross_entropy(logits, y)),
        }


class DetachedClassifier(Classifier):
    """``weight_net.input: detached``: the weight net reads ``loss.detach()``, recomputed at the moved
    parameters of a difference (the biased estimator of "Why sama inverted" in this example's README)."""

    def training_step(self, batch):
        losses = self.per_example_losses(batch)
        if "reweight" not in self.uppers:
            return losses.mean()
        out = self.uppers["reweight"](losses.detach().unsqueeze(-1)).squeeze(-1)
        return (example_weights(out, self.link, self.normalize) * losses).sum() / len(losses)


class Reweight(Level):
    """Upper level: the classifier's cross-entropy on the clean meta set."""

    def training_step(self, batch):
        x, y = batch
        self.examples_seen = len(y)  # this rank's share of the meta set
        return F.cross_entropy(self.lowers["classifier"](x), y)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def weight_stats(classifier, weight_net, data: dict, normalize: str, link: str = "sigmoid") -> dict:
    """The weights the final weight net gives the training examples, clean vs noisy labels.

    ``w_clean`` / ``w_noisy`` are the weights as training uses them: with
    ``normalize: mean`` divided by their mean over the whole training set (so
    the average example has weight 1), else the raw sigmoid outputs. The
    unnormalized weights are reported as ``raw_w_clean`` / ``raw_w_noisy``: the
    sigmoid outputs, or with the exp link exp(z - max z) (the weight relative to
    the largest one).
    """
    with torch.no_grad():
        logits = classifier(data["x_train"])
        losses = F.cross_entropy(logits, data["y_train"], reduction="none")
        out = weight_net(losses.unsqueeze(-1)).squeeze(-1)
    w = example_weights(out, link, normalize)
    raw = {"exp": (out - out.max()).exp(), "centered": torch.sigmoid(out - out.median())}.get(link, out)
    noisy = data["noisy"]
    return {
        "w_clean": float(w[~noisy].mean()),
        "w_noisy": float(w[noisy].mean()),
        "raw_w_clean": float(raw[~noisy].mean()),
        "raw_w_noisy": float(raw[noisy].mean()),
        # how well the weight separates the two: 1 = every clean example outweighs every noisy one
        # (computed on the net's output: a saturated sigmoid or an underflowed exp would make ties)
        "w_auc": float(roc_auc_score((~noisy).numpy(), out.numpy())) if out.std() > 0 else 0.5,
    }


# ---- one system -------------------------------------------------------------------


def run_system(cfg: dict, data: dict, system: str, seed: int, log=print) -> dict:
    """Train one system from the seed's initial classifier; returns its metrics."""
    sched, c, wn = cfg["schedule"], cfg["classifier"], cfg["weight_net"]
    torch.manual_seed(seed)
    net = make_classifier(cfg["model"]["hidden"])  # same initial classifier for every system of a seed
    weigher = make_weight_net(wn["hidden"], wn["link"], wn["init"])
    if system == "meta_only":
        train = Batches(data["x_meta"], data["y_meta"], c["batch_size"], seed)
    else:
        train = Batches(data["x_train"], data["y_train"], c["batch_size"], seed)
    classifier = (Classifier if wn["input"] == "held" else DetachedClassifier)(
        "classifier",
        net,
        lambda params: torch.optim.Adam(params, lr=c["lr"], weight_decay=c["weight_decay"]),
        data=train,
        normalize=wn["normalize"],
        link=wn["link"],
        test=(data["x_test"], data["y_test"]),
        meta=(data["x_meta"], data["y_meta"]),
    )
    levels, edges = [classifier], {}
    if system not in REFERENCES:
        reweight = Reweight(
            "reweight",
            weigher,
            lambda params: torch.optim.Adam(
                params, lr=wn["lr"], betas=(wn["beta1"], 0.999), weight_decay=wn["weight_decay"]
            ),
            data=[rank_share((data["x_meta"], data["y_meta"]), "meta set")],  # the whole meta set each step
            config=LevelConfig.from_dict(
                {
                    **cfg["methods"][system],
                    "unroll_steps": sched["unroll_steps"],
                    "warmup_steps": sched["warmup_steps"],
                }
            ),
        )
        levels, edges = [reweight, classifier], {"reweight": ["classifier"]}

    curve = []  # (step, test accuracy, meta-set accuracy, meta-set loss)

    def record(engine, metrics):
        if "valid/classifier/test_acc" not in metrics:
            return
        step = engine.global_step
        curve.append((step, *(metrics[f"valid/classifier/{k}"] for k in ("test_acc", "meta_acc", "meta_loss"))))
        if step % sched["print_every"] == 0 or step == sched["max_steps"]:
            _, test_acc, meta_acc, meta_loss = curve[-1]
            line = f"    {system:>18} step {step:>5}: test acc {test_acc:.4f}"
            line += f", meta acc {meta_acc:.2f} (loss {meta_loss:.3f})"
            if system not in REFERENCES:
                ws = weight_stats(net, weigher, data, wn["normalize"], wn["link"])
                line += f", w clean {ws['w_clean']:.3f} / noisy {ws['w_noisy']:.3f} (AUC {ws['w_auc']:.3f})"
            log(line)

    start = time.perf_counter()
    engine = Engine(
        levels,
        edges,
        EngineConfig(
            max_steps=sched["max_steps"],
            valid_every=sched["eval_every"],
            log_every=max(sched["max_steps"], 1),
            progress_bar=False,
        ),
        callbacks=[record],
    )
    engine.run()
    wall = time.perf_counter() - start

    out = {
        "test_acc": accuracy(net, data["x_test"], data["y_test"]),
        "wall_s": wall,
        "examples_per_rank": classifier.examples_seen,  # training examples per step on this rank
        # the upper level's objective: the final classifier's cross-entropy on the clean meta set
        "meta_loss": float(F.cross_entropy(net(data["x_meta"]), data["y_meta"]).detach()),
        # share of the noisy-labelled training examples the classifier predicts as their wrong label
        "noisy_memorized": float(
            (net(data["x_train"]).argmax(-1)[data["noisy"]] == data["y_train"][data["noisy"]]).float().mean()
        ),
        # early stopping on the clean meta set: the test accuracy at the evaluation with the best
        # meta-set accuracy, ties to the lower meta-set loss (not defined for meta_only, whose
        # training set the meta set is)
        "es_test_acc": max(curve, key=lambda r: (r[2], -r[3]))[1] if curve and system != "meta_only" else math.nan,
        # the best test accuracy seen at any evaluation: an oracle, reported for context only
        "peak_test_acc": max([r[1] for r in curve], default=float("nan")),
    }
    if system not in REFERENCES:
        out["reweight_steps"] = reweight.steps
        out["meta_examples_per_rank"] = reweight.examples_seen
        out.update(weight_stats(net, weigher, data, wn["normalize"], wn["link"]))
    return out


def warm_up_deepspeed() -> None:
    """Pay DeepSpeed's one-time costs (import, process group, op build) before any run is timed."""
    net = torch.nn.Linear(1, 1)
    probe = Classifier(
        "probe", net, torch.optim.Adam(net.parameters()), data=[None], normalize="none", test=(), meta=()
    )
    Engine([probe], {}, EngineConfig(max_steps=0, progress_bar=False))


def run_seed(cfg: dict, seed: int, systems: list[str], verbose: bool = True) -> dict:
    data = make_data(cfg, seed)
    log = print if verbose else (lambda *a, **k: None)
    log(
        f"seed {seed}: {len(data['y_train'])} training examples ({int(data['noisy'].sum())} noisy), "
        f"{len(data['y_meta'])} clean meta, {len(data['y_test'])} test"
    )
    results = {}
    for system in systems:
        r = run_system(cfg, data, system, seed, log)
        results[system] = r
        extra = f", w clean {r['w_clean']:.3f} / noisy {r['w_noisy']:.3f}" if "w_clean" in r else ""
        log(f"  {system:>18}: test acc {r['test_acc']:.4f}{extra}, {r['wall_s']:.1f} s")
    return results


def summarize(runs: list[dict], systems: list[str]) -> dict:
    """mean and std (population std over the seeds; 0 for one seed) of every metric."""
    out = {}
    for s in systems:
        out[s] = {}
        for key in runs[0][s]:
            values = [r[s][key] for r in runs]
            if any(math.isnan(v) for v in values):
                out[s][key] = (math.nan, math.nan)
            else:
                out[s][key] = (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)
    return out


def print_table(summary: dict, n: int) -> None:
    columns = [  # (metric, header, digits)
        ("test_acc", "test acc (final)", 4),
        ("es_test_acc", "test acc (meta ES)", 4),
        ("noisy_memorized", "noisy memorized", 3),
        ("w_clean", "w clean", 3),
        ("w_noisy", "w noisy", 3),
        ("w_auc", "weight AUC", 3),
        ("wall_s", "wall s", 1),
    ]
    print(f"\nmean ± std over {n} seed(s)")
    print(" | ".join([f"{'system':>18}"] + [f"{h:>18}" for _, h, _ in columns]))

    def f(metrics, key, digits):
        if key not in metrics or math.isnan(metrics[key][0]):
            return "-"
        m, s = metrics[key]
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    for system, metrics in summary.items():
        print(" | ".join([f"{system:>18}"] + [f"{f(metrics, k, d):>18}" for k, _, d in columns]))


# ---- entry point --------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(HERE / "config.yaml"), help="YAML config (default: config.yaml beside)")
    p.add_argument("--seed", type=int, default=0, help="seed of a single run")
    p.add_argument("--seeds", type=int, default=0, help="run seeds 0..N-1 and print mean ± std")
    p.add_argument("--max-steps", type=int, default=None, help="override schedule.max_steps")
    p.add_argument("--smoke", action="store_true", help="tiny fast run (60 iterations, weight net from 20)")
    p.add_argument("--systems", nargs="+", default=None, help="subset of the reference systems and method names")
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. weight_net.lr=1e-3",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the models are tiny)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument("--out", default=None, help="write the returned results as JSON here (rank 0 only)")
    add_launcher_arguments(p)  # the deepspeed launcher passes --local_rank=K
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the comparison; returns {"config", "systems", "runs": [per seed], "summary"}."""
    args = parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = _main(args)
    finally:
        torch.set_num_threads(threads)
    if args.out and is_main_process():
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def _main(args) -> dict:
    cfg = load_config(args.config)
    if args.smoke:
        cfg = merge_strict(cfg, SMOKE, "smoke")
    cfg = merge_strict(cfg, parse_set(args.set), "--set", replace_methods=False)
    if args.max_steps is not None:
        cfg = merge_strict(cfg, {"schedule": {"max_steps": args.max_steps}}, "--max-steps")
    check_config(cfg)
    systems = list(cfg["references"]) + list(cfg["methods"])
    if args.systems:
        unknown = [s for s in args.systems if s not in systems]
        if unknown:
            raise ValueError(f"--systems: unknown {unknown}; known: {systems}")
        systems = [s for s in systems if s in args.systems]
    seeds = list(range(args.seeds)) if args.seeds else [args.seed]
    warm_up_deepspeed()
    main_process = is_main_process()  # only rank 0 prints; every rank computes the same numbers
    runs = [run_seed(cfg, seed, systems, verbose=main_process and not args.quiet) for seed in seeds]
    summary = summarize(runs, systems)
    if main_process:
        print_table(summary, len(seeds))
    return {
        "config": cfg,
        "systems": systems,
        "seeds": seeds,
        "world_size": world_size(),
        "runs": runs,
        "summary": summary,
    }


if __name__ == "__main__":
    main()
