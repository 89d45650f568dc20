"""Dynamic loss scaling for fp16 levels that DeepSpeed does not step (the torch backend).

A DeepSpeed fp16 level keeps DeepSpeed's own scaler; this one has its
semantics and its configuration keys (DeepSpeed's ``"fp16"`` section), so the
policy around it (an overflow anywhere in a step skips it on every rank and
lowers the scale; nothing non-finite is written) runs, and is tested, on a
CPU, where DeepSpeed's fp16 cannot run:

- the loss (or a hypergradient handed to the level) is multiplied by
  ``scale`` before its backward, so small fp16 gradients do not flush to zero;
- at the step the gradients are checked on every rank: an overflow (inf or
  NaN on any rank) skips the step everywhere and halves the scale once
  ``hysteresis`` overflows have been seen; after ``loss_scale_window``
  steps without one the scale doubles again;
- an overflow at ``min_loss_scale`` is an error, as in DeepSpeed: the level
  has diverged and no scale will help.

``loss_scale`` > 0 in the config fixes the scale (static scaling: an
overflow still skips the step).
"""

from __future__ import annotations

import math

FP16_KEYS = (
    "enabled",
    "auto_cast",
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "consecutive_hysteresis",
    "min_loss_scale",
)


class DynamicLossScale:
    """DeepSpeed's ``DynamicLossScaler`` (``deepspeed.runtime.fp16.loss_scaler``), step for step.

    Args:
        fp16: the loss-scaling settings, with the keys of DeepSpeed's ``"fp16"`` section (``loss_scale``: 0
            for dynamic, ``initial_scale_power``, ``loss_scale_window``, ``hysteresis``, ``min_loss_scale``,
            ...); None: DeepSpeed's defaults.
        name: the level's name (for messages).

    Raises:
        ValueError: an unknown key or an invalid value.
    """

    def __init__(self, fp16: dict | None = None, name: str = "level"):
        cfg = dict(fp16 or {})
        unknown = sorted(set(cfg) - set(FP16_KEYS))
        if unknown:
            raise ValueError(
                f"level {name!r}: unknown fp16 loss-scaling keys {unknown}; known keys (DeepSpeed's fp16 "
                f"section): {list(FP16_KEYS)}"
            )
        static = float(cfg.get("loss_scale", 0))
        power = cfg.get("initial_scale_power", 16)
        for key, value, minimum in (
            ("initial_scale_power", power, 0),
            ("loss_scale_window", cfg.get("loss_scale_window", 1000), 1),
            ("hysteresis", cfg.get("hysteresis", 2), 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"level {name!r}: fp16 {key} must be an integer >= {minimum}, got {value!r}")
        if static < 0 or not math.isfinite(static):
            raise ValueError(f"level {name!r}: fp16 loss_scale must be 0 (dynamic) or a positive number, got {static}")
        self.name = name
        self.dynamic = static == 0
        self.scale = static if static > 0 else float(2**power)
        self.window = int(cfg.get("loss_scale_window", 1000))
        self.min_scale = float(cfg.get("min_loss_scale", 1))
        self.delayed_shift = int(cfg.get("hysteresis", 2))
        self.consecutive_hysteresis = bool(cfg.get("consecutive_hysteresis", False))
        self.hysteresis = self.delayed_shift
        self.iteration = 0
        self.last_overflow = -1
        self.overflows = 0

    def update(self, overflow: bool) -> None:
        """After a step: lower, keep or raise the scale, as DeepSpeed does.

        Args:
            overflow: whether the step was skipped for an overflow.

        Raises:
            FloatingPointError: an overflow at the minimum loss scale (the level has diverged).
        """
        if overflow:
            self.overflows += 1
            if self.dynamic:
                if self.delayed_shift == 1 or self.hysteresis == 1:
                    if self.scale == self.min_scale:
                        raise FloatingPointError(
                            f"level {self.name!r}: fp16 gradients overflow at the minimum loss scale "
                            f"{self.min_scale:g}: the level has diverged (lower its lr or clip its gradients)"
                        )
                    self.scale = max(self.scale / 2, self.min_scale)
                else:
                    self.hysteresis -= 1
            self.last_overflow = self.iteration
        elif self.dynamic:
            if self.consecutive_hysteresis:
                self.hysteresis = self.delayed_shift
            stable = self.iteration - self.last_overflow - 1
            if stable > 0 and stable % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis = self.delayed_shift
                self.scale *= 2
        self.iteration += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "hysteresis", "iteration", "last_overflow", "overflows")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
