"""Every ZeRO stage combination on several ranks, against one-process float64 references and closed forms.

Launched once by ``tests/test_distributed_zero.py`` (``deepspeed --num_gpus 2``);
every case runs inside that one launch. Two programs:

- **reweighting**: a tiny GPT-2 (lower level, gradient accumulation 2) under a
  Meta-Weight-Net (upper level, reading the losses through ``Level.held``,
  whose objective also holds a small L2 term on
  its own parameters, so the owner's loss reaches the owner: the case where a
  ZeRO-3 lower level's backward must not fire a ZeRO-1/2 upper engine's hooks).
  For each (method, upper stage, lower stage) the script trains a few MLO
  steps, takes one more hypergradient and records, on rank 0, the relative
  error of the final parameters and of the rank-averaged hypergradient
  against the same program in float64 on one process whose batches are the
  ranks' batches concatenated, and whether a hypergradient left the ZeRO-3
  partitions and fp32 master copies bit-identical.
- **ridge**: ridge regression with per-feature L2 hyperparameters, its training
  set split over the ranks (each rank holds one half), against the implicit-
  function closed form on the whole set (exact, cg, neumann).
- **trainer_resume**: a ReweightingTrainer with its model at ZeRO-3, stopped at
  a random step and resumed, against its uninterrupted run, bit for bit, for
  every method and shared forward on/off and every scheme (``trainer_resume.py``);
  last, as the Trainers leave accelerate's process-wide state behind.

Every case is run under a try: a failing case is recorded with its error and
the next one runs (each rank takes the same branches, so a failure does not
desynchronize the collectives). The records are rewritten after every case,
so a launch that dies still leaves what it checked. Writes a JSON list to
``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import trainer_resume  # beside this file (on the path when run as a script or imported by the test)

from scalemlo import Engine, EngineConfig, Level, LevelConfig
from scalemlo.testing import RidgeData, allow_deepspeed_fp16_on_cpu, end_launched_rank, ridge_engine

VOCAB, SEQ, BATCH, STEPS, ACCUMULATION = 64, 8, 4, 2, 2
WEIGHT_DECAY = 1e-4  # the upper objective reads its own parameters (small: the mixed term dominates)


def tiny_gpt2(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).to(dtype)


def weight_net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Sigmoid())
    return net.to(dtype)


def per_example_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    if logits.dtype in (torch.bfloat16, torch.float16):  # the loss in float32, as Hugging Face computes it
        logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


class Model(Level):
    def training_step(self, ids):
        losses = per_example_loss(self, ids)
        # held: the weight net's input stays constant in every hypergradient evaluation (Level.held);
        # with gradient accumulation 2, per micro-batch, on every ZeRO stage and rank count
        weights = self.uppers["weights"](self.held(losses)[:, None]).squeeze(1)
        return (weights.to(losses.dtype) * losses).mean()


class SharedModel(Level):
    """The same objective declared reweighted, for LevelConfig.shared_forward: the weights' step is
    taken inside the model's step, on its forward (the model's graph kept across the upper step)."""

    def per_example_losses(self, ids):
        return per_example_loss(self, ids)

    def example_weights(self, ids, losses):
        return self.uppers["weights"](losses[:, None]).squeeze(1).to(losses.dtype)


class Weights(Level):
    decay = WEIGHT_DECAY

    def training_step(self, ids):
        meta = per_example_loss(self.lowers["model"], ids).mean()
        if not self.decay:
            return meta
        return meta + self.decay * sum((p**2).sum() for p in self.module.parameters())


def batches(kind: str, ranks: list[int], count: int) -> list[torch.Tensor]:
    """Batch i of each rank in ``ranks``, concatenated (one rank: that rank's own batches).

    Sequences count up by one (mod VOCAB) from a random start; in training
    batches half the sequences are random tokens instead (noise the weight
    net can learn to down-weight), so the hypergradient is far from zero.
    """
    out = []
    for i in range(count):
        parts = []
        for r in ranks:
            g = torch.Generator().manual_seed(1000 * r + 10 * i + (kind == "meta"))
            start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
            ids = (start + torch.arange(SEQ)) % VOCAB
            if kind == "train":
                ids[::2] = torch.randint(0, VOCAB, (BATCH // 2, SEQ), generator=g)
            parts.append(ids)
        out.append(torch.cat(parts))
    return out


def ds_config(stage: int, bf16: bool = False, fp16: bool = False) -> dict:
    cfg = {"zero_optimization": {"stage": stage}, **({"bf16": {"enabled": True}} if bf16 else {})}
    if fp16:  # DeepSpeed's own fp16 engine (scalemlo.testing.allow_deepspeed_fp16_on_cpu); a scale that fits
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def build(
    stages: tuple[int, int] | None,
    ranks: list[int],
    method: str,
    zero_init: bool = False,
    bf16: bool = False,
    fp16: bool = False,
    lr: float = 1e-2,
    decay: float = WEIGHT_DECAY,
    **upper_kwargs,
) -> Engine:
    """stages (upper, lower), or None: the float64 torch-backend reference on one process.

    ``zero_init``: the lower level's model is built under ``scalemlo.zero_init`` (partitioned from
    the start at ZeRO-3), then given tiny_gpt2's initial weights on rank 0 (as from_pretrained does).
    """
    dtype = torch.float64 if stages is None else torch.float32
    if stages is None:
        lower_cfg = LevelConfig(backend="torch", gradient_accumulation=ACCUMULATION)
        upper_cfg = LevelConfig(backend="torch", method=method, **upper_kwargs)
    else:
        upper_stage, lower_stage = stages
        lower_cfg = LevelConfig(gradient_accumulation=ACCUMULATION, deepspeed_config=ds_config(lower_stage, bf16, fp16))
        upper_ds = ds_config(upper_stage)
        if upper_stage == 3:  # the tiny weight net partitioned for real (by default ZeRO-3 keeps it whole)
            upper_ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        upper_cfg = LevelConfig(method=method, deepspeed_config=upper_ds, **upper_kwargs)
    lm, net = tiny_gpt2(dtype), weight_net(dtype)
    if zero_init:
        import deepspeed

        import scalemlo

        whole = lm.state_dict()
        with scalemlo.zero_init(lower_cfg) as partitioned:
            lm = tiny_gpt2(dtype)
        assert partitioned and all(p.numel() == 0 for p in lm.parameters()), "not partitioned at construction"
        with deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                lm.load_state_dict(whole)
    kind = SharedModel if upper_kwargs.get("shared_forward") else Model
    if bf16 or fp16:  # the float32 run it is compared with starts from the same (representable) weights
        with torch.no_grad():
            for p in lm.parameters():
                p.copy_(p.to(torch.bfloat16 if bf16 else torch.float16).to(p.dtype))
    model = kind("model", lm, torch.optim.Adam(lm.parameters(), lr=lr), batches("train", ranks, 8), config=lower_cfg)
    weights = Weights(
        "weights", net, torch.optim.SGD(net.parameters(), lr=1.0), batches("meta", ranks, 8), config=upper_cfg
    )
    weights.decay = decay
    config = EngineConfig(max_steps=STEPS * ACCUMULATION, log_every=1, progress_bar=False)
    return Engine([model, weights], {"weights": ["model"]}, config)


def full_params(level: Level) -> list[torch.Tensor]:
    if level.backend.partitioned:
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p).double() for p in level.params]
    return [p.detach().double().clone() for p in level.params]


def whole_vector(level: Level, vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """A ZeRO-3 level's vector (this rank's partitions) gathered into whole tensors; others as they are."""
    if not level.backend.partitioned:
        return vector
    import torch.distributed as dist

    out = []
    for p, shard in zip(level.params, vector):
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, shard.contiguous())
        out.append(torch.cat(parts)[: p.ds_numel].view(p.ds_shape))
    return out


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def rank_average(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def run(stages, ranks, method, **kw) -> dict:
    """Train, then one more hypergradient; returns flat parameters and the hypergradient (averaged over ranks).

    ``stages`` is (upper stage, lower stage), a single int (the lower stage, upper at ZeRO-0), or None
    (the float64 reference).
    """
    if isinstance(stages, int):
        stages = (0, stages)
    engine = build(stages, ranks, method, **kw)  # kw may hold zero_init, bf16, fp16, lr
    stepped_on = []  # what the coordinator handed to the upper optimizer, this rank's (a ZeRO-3 upper's: whole)
    hypergradient = engine.coordinator.hypergradient
    weights = engine.levels["weights"]

    def recorded(*args, **kwargs):
        grads = hypergradient(*args, **kwargs)
        stepped_on.append(whole_vector(weights, grads))
        return grads

    engine.coordinator.hypergradient = recorded
    history = engine.run()
    engine.coordinator.hypergradient = hypergradient
    last = flat(stepped_on[-1])
    model = engine.levels["model"]
    zero3 = stages is not None and stages[1] == 3
    untouched = None
    if zero3:
        from deepspeed.utils import safe_get_local_fp32_param

        shards = [t.clone() for t in model.backend.local_shards]
        masters = [safe_get_local_fp32_param(p).clone() for p in model.params]
    hg = flat(whole_vector(weights, engine.hypergradient("weights")))
    if zero3:
        untouched = all(torch.equal(a, b) for a, b in zip(shards, model.backend.local_shards)) and all(
            torch.equal(a, safe_get_local_fp32_param(p)) for a, p in zip(masters, model.params)
        )
    return {
        "logged_norm": history[-1]["weights/hypergrad_norm"],
        "last_local_rel_diff": rel(last, rank_average(last)) if stages is not None else 0.0,
        "last_global_norm": float(rank_average(last).norm()) if stages is not None else float(last.norm()),
        "model": flat(full_params(model)),
        "weights": flat(full_params(engine.levels["weights"])),
        "hypergradient": hg,
        "untouched": untouched,
        "stepped_on": [rank_average(flat(g)) for g in stepped_on],
    }


def full_params_initial() -> list[torch.Tensor]:
    return [p.detach().double() for p in tiny_gpt2(torch.float32).parameters()]


# (method, upper kwargs, lower stages it allows); every upper stage 0-2 runs each.
FD2 = {"second_order": "finite_difference"}
REWEIGHTING_CASES = [
    ("finite_difference", {}, [0, 1, 2, 3]),
    ("penalty", {"penalty_steps": 2}, [0, 1, 2, 3]),
    # radius 0.1: at 1e-2 the float32 noise of a difference of gradients decides CG's exit on
    # non-positive curvature (this GPT-2's Hessian is indefinite), 2.5e-2 from float64 at every stage
    ("cg", {**FD2, "cg_iterations": 3, "fd_radius": 0.1}, [0, 1, 2, 3]),
    ("cg", {"second_order": "autograd", "cg_iterations": 3}, [0, 1, 2]),
    ("neumann", {**FD2, "neumann_iterations": 3, "neumann_alpha": 0.1}, [0, 1, 2, 3]),
    ("neumann", {"second_order": "autograd", "neumann_iterations": 3, "neumann_alpha": 0.1}, [0, 1, 2]),
    ("sama", {}, [0]),
    # the shared-forward estimator (one radius for float32 and the float64 reference: its truncation
    # error is linear in the radius); the model's graph is kept across the weights' step
    ("finite_difference", {"shared_forward": True, "shared_forward_radius": 1e-3}, [0, 1, 2, 3]),
    # sama's Adam-preconditioned w is spiky: float32 rounding of the one-sided difference is ~1/r
    # (weights 2.2e-3 from float64 at r = 1e-3, 4.3e-4 at 1e-2, 1.7e-2 at 1e-4)
    ("sama", {"shared_forward": True, "shared_forward_radius": 1e-2}, [0]),
]
UPPER_STAGES = [0, 1, 2]
# A ZeRO-3 upper level (partitioned, with a level below it): the methods whose products
# reach the upper through gradients only (no double backward into it, no shared forward).
# decay 0: the weight-decay term reads the parameters outside the module's forward, which a ZeRO-3
# level cannot (they are released there), as for any ZeRO-3 model; the float64 reference drops it too.
NO_DECAY = {"decay": 0.0}
UPPER3_CASES = [
    ("finite_difference", NO_DECAY, [0, 3]),
    ("penalty", {"penalty_steps": 2, **NO_DECAY}, [0, 3]),
    ("cg", {**FD2, "cg_iterations": 3, "fd_radius": 0.1, **NO_DECAY}, [0, 3]),
    ("neumann", {**FD2, "neumann_iterations": 3, "neumann_alpha": 0.1, **NO_DECAY}, [0, 3]),
    ("sama", NO_DECAY, [0]),
]

# bf16 lower level (scalemlo.precision) against the float32 run of the same program on the same ranks,
# Adam lr 1e-3: (method, upper kwargs, lower stages); upper at ZeRO-0 and ZeRO-2.
BF16_CASES = [
    ("finite_difference", {}, [0, 3]),
    ("sama", {}, [0]),
    ("cg", {**FD2, "cg_iterations": 3}, [3]),
    ("finite_difference", {"shared_forward": True}, [3]),
]
BF16_UPPER_STAGES = [0, 2]
# The same with DeepSpeed's fp16 engine for the lower level (its loss scaling and overflow checks on 2 ranks).
FP16_CASES = BF16_CASES
FP16_UPPER_STAGES = [0]

# ridge: (method, kwargs, lower stages); the upper level (log lambda) runs at each upper stage too.
RIDGE_CASES = [
    ("exact", {}, [0, 1, 2]),
    ("cg", {"cg_iterations": 12}, [0, 1, 2]),
    ("cg", {"cg_iterations": 12, **FD2, "fd_radius": 1e-3}, [3]),
    ("neumann", {"neumann_iterations": 300, "neumann_alpha": 0.3}, [1]),
]


def reweighting_record(rank: int, world: int, method: str, kw: dict, reference, stages) -> dict:
    """``reference(method, kw)``: the float64 one-process run of the same program."""
    reference = reference(method, kw)
    got = run(stages, [rank], method, **kw)
    return {
        "model_rel_err": rel(got["model"], reference["model"]),
        "model_moved": rel(got["model"], flat(full_params_initial())),
        "weights_rel_err": rel(got["weights"], reference["weights"]),
        "hypergradient_rel_err": rel(got["hypergradient"], reference["hypergradient"]),
        "hypergradient_cosine": cosine(got["hypergradient"], reference["hypergradient"]),
        "hypergradient_norm": float(got["hypergradient"].norm()),
        "reference_norm": float(reference["hypergradient"].norm()),
        "zero3_untouched": got["untouched"],
        # the logged hypergrad_norm is the norm of what the upper level steps on (the rank average)
        "logged_norm_rel_err": abs(got["logged_norm"] - got["last_global_norm"]) / got["last_global_norm"],
        "local_rel_diff": got["last_local_rel_diff"],
    }


def zero_init_record(rank: int, method: str, stages) -> dict:
    """The same program with the ZeRO-3 lower level built whole and built under scalemlo.zero_init."""
    whole = run(stages, [rank], method)
    partitioned = run(stages, [rank], method, zero_init=True)
    return {
        "model_rel_diff": rel(partitioned["model"], whole["model"]),
        "weights_rel_diff": rel(partitioned["weights"], whole["weights"]),
        "hypergradient_rel_diff": rel(partitioned["hypergradient"], whole["hypergradient"]),
        "model_moved": rel(whole["model"], flat(full_params_initial())),
    }


def bf16_record(rank: int, method: str, kw: dict, stages, precision: str = "bf16") -> dict:
    """Cosine of every rank-averaged hypergradient of the bf16 (or fp16) run against the float32 run's."""
    low = run(stages, [rank], method, **{precision: True}, lr=1e-3, **kw)
    high = run(stages, [rank], method, lr=1e-3, **kw)
    pairs = list(zip(low["stepped_on"] + [low["hypergradient"]], high["stepped_on"] + [high["hypergradient"]]))
    if method == "sama":
        # After Adam's first step sama's w is lr eps / (|g| + eps)^2 v: dominated by the few entries whose
        # gradient is nearest zero, where a bf16 and a float32 gradient differ most (cosine 0.25 at that one
        # hypergradient, measured; >= 0.9999 from the second on). A property of sama there, not of precision.
        pairs = pairs[1:]
    return {
        "cosines": [cosine(rank_average(a), rank_average(b)) for a, b in pairs],
        "model_rel_diff": rel(low["model"], high["model"]),
        "model_moved": rel(high["model"], flat(full_params_initial())),
    }


def ridge_record(rank: int, world: int, method: str, kw: dict, stages) -> dict:
    """Each rank holds 1/world of the ridge training set; the closed form uses all of it."""
    data = RidgeData.make(n=40)
    share = len(data.y) // world
    mine = RidgeData(
        data.x[rank * share : (rank + 1) * share], data.y[rank * share : (rank + 1) * share], data.x_val, data.y_val
    )
    log_lambda = torch.linspace(-1.0, 0.5, 6, dtype=torch.float64)
    theta = data.solution(log_lambda)
    upper_stage, lower_stage = stages
    config = LevelConfig(method=method, deepspeed_config=ds_config(upper_stage), **kw)
    engine = ridge_engine(
        mine,
        log_lambda,
        theta,
        config,
        backend="deepspeed",
        dtype=torch.float32,
        model_config=LevelConfig(deepspeed_config=ds_config(lower_stage)),
    )
    got = engine.hypergradient("hyper")[0].double()  # the rank average
    reference = data.hypergradient(log_lambda)
    return {
        "hypergradient_rel_err": rel(got, reference),
        "hypergradient_cosine": cosine(got, reference),
        "hypergradient_norm": float(got.norm()),
        "reference_norm": float(reference.norm()),
    }


GROUP_STAGES = [0, 3]  # lower-level stages of the process-group case (upper at ZeRO-2)


def groups_record(lower_stage: int) -> dict:
    """Every reduction scalemlo makes of a level's vectors during training and hypergradients runs over
    that level's data-parallel group (the engine's), not the default (world) group; an engine whose
    data-parallel group does not hold every rank is refused with an error naming the fix."""
    import torch.distributed as dist

    import scalemlo.backend.base as backend_module
    import scalemlo.backend.deepspeed as deepspeed_backend_module
    import scalemlo.distributed as distributed_module
    import scalemlo.engine as engine_module

    engine = build(
        (2, lower_stage), list(range(dist.get_world_size())), "cg", second_order="finite_difference", cg_iterations=2
    )
    expected = {name: level.backend.process_group for name, level in engine.levels.items()}
    groups: list = []
    real_scalar, real_mean = distributed_module.reduced_scalar_, backend_module.mean_over_ranks_

    def scalar(value, op="sum", group=None):
        groups.append(group)
        return real_scalar(value, op, group)

    def mean(tensors, group=None):
        groups.append(group)
        return real_mean(tensors, group)

    patched = (
        (distributed_module, "reduced_scalar_", scalar),
        (backend_module, "mean_over_ranks_", mean),
        (engine_module, "mean_over_ranks_", mean),
    )
    for module, attribute, replacement in patched:
        setattr(module, attribute, replacement)
    try:
        engine.run()
        engine.hypergradient("weights")
    finally:
        distributed_module.reduced_scalar_ = real_scalar
        backend_module.mean_over_ranks_ = engine_module.mean_over_ranks_ = real_mean
    own = [g for g in groups if any(g is e for e in expected.values())]

    class OneRankGroupEngine:  # a DeepSpeed engine built with an mpu: data-parallel group of one rank
        seq_data_parallel_group = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]

    try:
        deepspeed_backend_module._data_parallel_group(OneRankGroupEngine(), "model")
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    return {
        "group_sizes": {name: dist.get_world_size(g) for name, g in expected.items()},
        "group_is_default": [g is None for g in expected.values()],
        "reductions": len(groups),
        "reductions_over_the_levels_groups": len(own),
        "refused": refused,
    }


def selection_record(rank: int, world: int) -> dict:
    """The balanced selection schedule on every rank (each its own pool of a step) against one process
    that chooses from all the ranks' pools: the same choices, and the same ages on every rank."""
    import torch.distributed as dist

    from scalemlo.hf.selection import Selector

    class OneProcess(Selector):
        def _store(self, ids, ages):  # no gather: this one sees every rank's pool itself
            self.ages[ids] = ages

    n, pool, size, steps = 48, 8, 2, 12
    weights = torch.linspace(0.05, 1.0, n)
    here, alone = Selector("balanced", n), OneProcess("balanced", n)
    same_choices = True
    for step in range(steps):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step))
        pools = [perm[(step * world + r) * pool % n :][:pool] for r in range(world)]
        for r, ids in enumerate(pools):
            mine = alone.choose(weights[ids], ids, size, torch.Generator().manual_seed(100 * step + r))
            if r == rank:
                chosen = here.choose(weights[ids], ids, size, torch.Generator().manual_seed(100 * step + r))
                same_choices &= torch.equal(chosen, mine)
    gathered = [torch.empty_like(here.ages) for _ in range(world)]
    dist.all_gather(gathered, here.ages)
    return {
        "same_choices": bool(same_choices),
        "ages_as_one_process": bool(torch.equal(here.ages, alone.ages)),
        "ages_same_on_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
        "ages_sum": int(here.ages.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = parser.parse_args()
    import deepspeed

    torch.set_num_threads(1)  # tiny models, one core per rank: more threads only contend
    allow_deepspeed_fp16_on_cpu()  # the fp16 cases build DeepSpeed's fp16 engines
    # A rank that waits in a collective its peer never joins fails after this long, with a traceback.
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=180))
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    records: list[dict] = []

    def case(program: str, method: str, kw: dict, stages, measure) -> None:
        name = f"{program}/{method}/{json.dumps(kw, sort_keys=True)}/upper{stages[0]}/lower{stages[1]}"
        if args.only and args.only not in name:
            return
        record = {
            "program": program,
            "method": method,
            "settings": kw,
            "upper_stage": stages[0],
            "stage": stages[1],
            "world_size": world,
            "name": name,
        }
        try:
            record.update(measure())
        except Exception as exc:  # recorded, so the test names the case; the next case still runs
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-3000:]
        records.append(record)
        if rank == 0:
            print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as fh:
                json.dump(records, fh, indent=1)
            os.replace(args.out + ".tmp", args.out)

    references: dict[str, dict] = {}  # one float64 run per method and settings, shared by its stages

    def reference(method: str, kw: dict) -> dict:
        key = method + json.dumps(kw, sort_keys=True)
        if key not in references:
            references[key] = run(None, list(range(world)), method, **kw)
        return references[key]

    for method, kw, lower_stages in REWEIGHTING_CASES:
        for upper_stage in UPPER_STAGES:
            for lower_stage in lower_stages:
                stages = (upper_stage, lower_stage)
                measure = functools.partial(reweighting_record, rank, world, method, kw, reference, stages)
                case("reweighting", method, kw, stages, measure)
    for method, kw, lower_stages in UPPER3_CASES:
        for lower_stage in lower_stages:
            stages = (3, lower_stage)
            measure = functools.partial(reweighting_record, rank, world, method, kw, reference, stages)
            case("reweighting", method, kw, stages, measure)
    for upper_stage in UPPER_STAGES:  # a ZeRO-3 lower level built partitioned: the same program exactly
        stages = (upper_stage, 3)
        case(
            "zero_init",
            "finite_difference",
            {},
            stages,
            functools.partial(zero_init_record, rank, "finite_difference", stages),
        )
    for method, kw, lower_stages in BF16_CASES:
        for upper_stage in BF16_UPPER_STAGES:
            for lower_stage in lower_stages:
                stages = (upper_stage, lower_stage)
                case("bf16", method, kw, stages, functools.partial(bf16_record, rank, method, kw, stages))
    for method, kw, lower_stages in FP16_CASES:
        for upper_stage in FP16_UPPER_STAGES:
            for lower_stage in lower_stages:
                stages = (upper_stage, lower_stage)
                case("fp16", method, kw, stages, functools.partial(bf16_record, rank, method, kw, stages, "fp16"))
    for lower_stage in GROUP_STAGES:
        stages = (2, lower_stage)
        case("groups", "cg", {}, stages, functools.partial(groups_record, lower_stage))
    case("selection", "balanced", {}, (0, 0), functools.partial(selection_record, rank, world))
    for method, kw, lower_stages in RIDGE_CASES:
        for upper_stage in UPPER_STAGES:
            for lower_stage in lower_stages:
                stages = (upper_stage, lower_stage)
                case("ridge", method, kw, stages, functools.partial(ridge_record, rank, world, method, kw, stages))
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "trainer_resume")  # shared by the ranks
    for method, shared, scheme in trainer_resume.CASES:
        name = trainer_resume.case_name(method, shared, scheme)
        measure = functools.partial(trainer_resume.resume_record, Path(work) / name, method, shared, scheme)
        case("trainer_resume", method, {"reweighting": scheme, "shared_forward": shared}, (0, 3), measure)
    dist.barrier()  # every rank done before any leaves


if __name__ == "__main__":
    main()
    end_launched_rank()
