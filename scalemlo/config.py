"""Typed, validated configuration for levels and the engine.

Every field is checked when the dataclass is built, so a bad value fails with a
``ValueError`` that names the field and the allowed values before any compute.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any

from scalemlo.logging import SINKS
from scalemlo.methods import METHODS, get_method, shared_forward_methods

BACKENDS = ("deepspeed", "torch")
SECOND_ORDER = ("autograd", "finite_difference")
NONFINITE = ("raise", "skip")
SHARED_DIFFERENCES = ("one_sided", "central")


def _method_names() -> tuple[str, ...]:
    return tuple(sorted(METHODS))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; allowed values: {', '.join(allowed)}")


@dataclass(frozen=True)
class LevelConfig:
    """How one level trains and how its hypergradient is computed.

    The hypergradient fields describe the gradient this level *receives* from
    the levels below it (they are read from the upper level, unlike Betty,
    which reads them from the lower one). A leaf level ignores them.

    Attributes:
        method: hypergradient method, a name in ``scalemlo.METHODS`` (the built-in ones and any
            registered; docs/methods.md tables what each needs and allows).
        unroll_steps: steps each level directly below takes per step of this one.
        fd_radius: radius r of the central difference; ε = r / ||w||.
        neumann_iterations: K in α Σ_{k=0..K} (I - αH)^k v.
        neumann_alpha: α of the Neumann series (needs α < 2 / λ_max(H)).
        cg_iterations: conjugate-gradient iterations on H w = v.
        cg_alpha: scale of the operator CG runs on (αH) w = αv; the solution
            does not depend on it, only the numerics.
        penalty_alpha: penalty weight α; the bias of the penalty method is O(1/α).
        penalty_steps: auxiliary-copy update steps per hypergradient.
        penalty_lr: learning rate of the auxiliary copy (None: the lower level's lr).
        second_order: how neumann/cg form Hessian- and mixed-vector products:
            "autograd" (double backward: exact, the default for a program's own
            modules) or "finite_difference" (differences of first-order
            gradients: no double backward, so any module and ZeRO-3; the
            default of ``ReweightingArguments``, whose model is any Hugging Face
            model, often with attention kernels that have no double backward).
        exact_max_params: the exact method refuses levels larger than this.
        shared_forward: take this level's steps inside the step of the level
            below it and share that level's forward (the 7-unit reweighting
            estimator, see `scalemlo.hypergrad.shared_forward`): the level
            below must be *reweighted* (define ``per_example_losses`` and
            ``example_weights``) and be the only level below this one; for a
            method declared able to (``Method.shared_forward``,
            ``scalemlo.methods.shared_forward_methods()``).
        shared_forward_radius: the radius r of the shared forward's one-sided
            difference (ε = r / ||w||); its truncation error is linear in r and
            its rounding error grows as r shrinks. None: 1e-3 for float32 and
            lower precisions, 1e-5 for float64 (the parameters' dtype).
        shared_forward_difference: "one_sided" (one moved forward: 7 units per
            step; an error linear in the radius, nearly the same factor for
            every example) or "central" (forwards at θ ± εw, radius
            ``fd_radius``: 8 units, an error quadratic in the radius).
        gradient_accumulation: batches averaged per step of this level.
        gradient_clipping: max global gradient norm (0 disables).
        warmup_steps: global iterations during which this level does not step.
        backend: "deepspeed" (default, every level in its own DeepSpeed engine)
            or "torch" (plain optimizer; needed for float64, which DeepSpeed
            0.19 refuses to reduce).
        deepspeed_config: a DeepSpeed config dict or a path to a JSON file;
            None means ZeRO-0 fp32.
        fp16_loss_scaling: the loss scaling of a torch-backend level with fp16
            parameters, with the keys of DeepSpeed's ``"fp16"`` section
            (``loss_scale``: 0 for dynamic, ``initial_scale_power``,
            ``loss_scale_window``, ``hysteresis``, ``min_loss_scale``); None:
            DeepSpeed's defaults. A DeepSpeed level reads its ``deepspeed_config``.
    """

    method: str = "finite_difference"
    unroll_steps: int = 1
    fd_radius: float = 1e-2
    neumann_iterations: int = 10
    neumann_alpha: float = 1e-2
    cg_iterations: int = 10
    cg_alpha: float = 1.0
    penalty_alpha: float = 100.0
    penalty_steps: int = 1
    penalty_lr: float | None = None
    second_order: str = "autograd"
    exact_max_params: int = 4096
    shared_forward: bool = False
    shared_forward_radius: float | None = None
    shared_forward_difference: str = "one_sided"
    gradient_accumulation: int = 1
    gradient_clipping: float = 0.0
    warmup_steps: int = 0
    backend: str = "deepspeed"
    deepspeed_config: dict | str | None = None
    fp16_loss_scaling: dict | None = None

    def __post_init__(self) -> None:
        _check_choice("LevelConfig.method", self.method, _method_names())
        _check_int("LevelConfig.unroll_steps", self.unroll_steps, 1)
        _check_positive("LevelConfig.fd_radius", self.fd_radius)
        _check_int("LevelConfig.neumann_iterations", self.neumann_iterations, 0)
        _check_positive("LevelConfig.neumann_alpha", self.neumann_alpha)
        _check_int("LevelConfig.cg_iterations", self.cg_iterations, 1)
        _check_positive("LevelConfig.cg_alpha", self.cg_alpha)
        _check_positive("LevelConfig.penalty_alpha", self.penalty_alpha)
        _check_int("LevelConfig.penalty_steps", self.penalty_steps, 1)
        if self.penalty_lr is not None:
            _check_positive("LevelConfig.penalty_lr", self.penalty_lr)
        _check_choice("LevelConfig.second_order", self.second_order, SECOND_ORDER)
        _check_int("LevelConfig.exact_max_params", self.exact_max_params, 1)
        if not isinstance(self.shared_forward, bool):
            raise ValueError(f"LevelConfig.shared_forward must be True or False, got {self.shared_forward!r}")
        _check_choice("LevelConfig.shared_forward_difference", self.shared_forward_difference, SHARED_DIFFERENCES)
        if self.shared_forward_radius is not None:
            _check_positive("LevelConfig.shared_forward_radius", self.shared_forward_radius)
        if self.shared_forward and not get_method(self.method).shared_forward:
            raise ValueError(
                f"LevelConfig.shared_forward=True needs a method whose mixed product is its last step "
                f"({', '.join(shared_forward_methods())}), not {self.method!r}; set shared_forward=False for it"
            )
        if self.shared_forward and self.gradient_accumulation > 1:
            raise ValueError(
                "LevelConfig.shared_forward=True takes one hypergradient per step of the level below, so "
                f"gradient_accumulation={self.gradient_accumulation} cannot be used with it; raise this level's "
                "batch size instead, or set shared_forward=False"
            )
        _check_int("LevelConfig.gradient_accumulation", self.gradient_accumulation, 1)
        _check_positive("LevelConfig.gradient_clipping", self.gradient_clipping, allow_zero=True)
        _check_int("LevelConfig.warmup_steps", self.warmup_steps, 0)
        _check_choice("LevelConfig.backend", self.backend, BACKENDS)
        if self.deepspeed_config is not None and not isinstance(self.deepspeed_config, (dict, str)):
            raise ValueError(
                "LevelConfig.deepspeed_config must be a dict, a path to a JSON file or None, "
                f"got {type(self.deepspeed_config).__name__}"
            )
        if isinstance(self.deepspeed_config, str) and not os.path.isfile(self.deepspeed_config):
            raise ValueError(f"LevelConfig.deepspeed_config: no such file {self.deepspeed_config!r}")
        if self.deepspeed_config is not None and self.backend != "deepspeed":
            raise ValueError("LevelConfig.deepspeed_config is set but backend is 'torch'; drop one of them")
        if self.fp16_loss_scaling is not None:
            if self.backend != "torch":
                raise ValueError(
                    "LevelConfig.fp16_loss_scaling is for backend='torch'; a DeepSpeed level sets its loss scaling "
                    'in the "fp16" section of its deepspeed_config'
                )
            from scalemlo.loss_scale import DynamicLossScale

            if not isinstance(self.fp16_loss_scaling, dict):
                raise ValueError(
                    f"LevelConfig.fp16_loss_scaling must be a dict or None, got {self.fp16_loss_scaling!r}"
                )
            DynamicLossScale(self.fp16_loss_scaling, "LevelConfig.fp16_loss_scaling")  # checks the keys and values

    def resolved_deepspeed_config(self) -> dict:
        """The DeepSpeed config this level's engine is built from (a fresh dict)."""
        if self.deepspeed_config is None:
            cfg: dict = {"zero_optimization": {"stage": 0}}
        elif isinstance(self.deepspeed_config, str):
            with open(self.deepspeed_config) as fh:
                cfg = json.load(fh)
        else:
            cfg = json.loads(json.dumps(self.deepspeed_config))
        return cfg

    @classmethod
    def from_dict(cls, values: dict) -> LevelConfig:
        """Build from a plain dict; unknown keys are an error, not silently ignored."""
        return cls(**_known_keys(cls, values))


@dataclass(frozen=True)
class EngineConfig:
    """How the whole program runs.

    Attributes:
        max_steps: global iterations; each one steps every leaf level once.
        valid_every: run the validation hook every N global iterations (0: never).
        log_every: log metrics every N global iterations (0: never).
        seed: seeds torch's generator when the engine is built (None: leave it).
        progress_bar: show a progress bar in ``run()``.
        checkpoint_dir: where ``save_checkpoint()`` writes ``checkpoint-<step>``
            directories and a ``latest`` file (None: no default location).
        save_every: save a checkpoint every N global iterations and at the end
            of ``run()`` (0: only when ``save_checkpoint()`` is called).
        keep_last: keep only the newest K complete checkpoints in
            ``checkpoint_dir`` (0: keep all).
        nonfinite: what a non-finite lower-level loss or gradient does:
            "raise" (stop with FloatingPointError before anything is written)
            or "skip" (drop that batch, draw the next one, count it in the
            metrics as ``<level>/skipped_batches``); the same on every rank.
        report_to: where logged metrics go besides the ``logging`` module:
            any of "jsonl" (``<logging_dir>/metrics.jsonl``), "tensorboard",
            "wandb"; written on rank 0.
        logging_dir: the directory of those files (needed when report_to is set).
    """

    max_steps: int = 100
    valid_every: int = 0
    log_every: int = 10
    seed: int | None = None
    progress_bar: bool = True
    checkpoint_dir: str | None = None
    save_every: int = 0
    keep_last: int = 0
    nonfinite: str = "raise"
    report_to: tuple[str, ...] = ()
    logging_dir: str | None = None

    def __post_init__(self) -> None:
        _check_int("EngineConfig.max_steps", self.max_steps, 0)
        _check_int("EngineConfig.valid_every", self.valid_every, 0)
        _check_int("EngineConfig.log_every", self.log_every, 0)
        if self.seed is not None:
            _check_int("EngineConfig.seed", self.seed, 0)
        if self.checkpoint_dir is not None and (
            not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir)
        ):
            raise ValueError(f"EngineConfig.checkpoint_dir must be a directory path, got {self.checkpoint_dir!r}")
        _check_int("EngineConfig.save_every", self.save_every, 0)
        _check_int("EngineConfig.keep_last", self.keep_last, 0)
        if (self.save_every or self.keep_last) and self.checkpoint_dir is None:
            raise ValueError("EngineConfig.save_every / keep_last need EngineConfig.checkpoint_dir: set where to save")
        _check_choice("EngineConfig.nonfinite", self.nonfinite, NONFINITE)
        if isinstance(self.report_to, str):
            object.__setattr__(self, "report_to", (self.report_to,))
        object.__setattr__(self, "report_to", tuple(self.report_to))
        for sink in self.report_to:
            _check_choice("EngineConfig.report_to", sink, SINKS)
        if self.report_to and self.logging_dir is None:
            raise ValueError(
                f"EngineConfig.report_to={list(self.report_to)} needs EngineConfig.logging_dir: set where to write"
            )

    @classmethod
    def from_dict(cls, values: dict) -> EngineConfig:
        """Build from a plain dict; unknown keys are an error, not silently ignored."""
        return cls(**_known_keys(cls, values))


def _known_keys(cls: type, values: dict) -> dict:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return dict(values)
