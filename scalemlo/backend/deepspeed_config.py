"""A level's DeepSpeed config: "auto" values filled, keys DeepSpeed does not know and inconsistent batch
sizes refused, before any engine is built."""

from __future__ import annotations

import difflib
import functools

import torch

from scalemlo.distributed import (
    import_deepspeed,
    world_size,
)


def zero_stage_of(cfg: dict, name: str) -> int:
    """The ZeRO stage of a DeepSpeed config dict, checked.

    Args:
        cfg: the DeepSpeed config dict.
        name: the level's name (for messages).

    Raises:
        ValueError: a stage other than 0, 1, 2 or 3.
    """
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"level {name!r}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return int(stage)


ZERO_AUTO_KEYS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
)


def _fill_zero_auto(zero: dict, module: torch.nn.Module | None, name: str) -> None:
    """Fill ZeRO bucket sizes given as "auto" from the model's hidden size, as Hugging Face does.

    reduce_bucket_size = allgather_bucket_size = h^2, stage3_prefetch_bucket_size = 0.9 h^2,
    stage3_param_persistence_threshold = 10 h. Without a hidden size (a model
    with no ``config.hidden_size``) "auto" is an error naming the keys.
    """
    wanted = [k for k in ZERO_AUTO_KEYS if zero.get(k) == "auto"]
    if not wanted:
        return
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(
            f'level {name!r}: zero_optimization {wanted} are "auto", which needs the model\'s '
            "config.hidden_size (a Hugging Face model); give numbers instead"
        )
    values = {
        "reduce_bucket_size": hidden * hidden,
        "allgather_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key in wanted:
        zero[key] = values[key]


def _check_batch_sizes(cfg: dict, name: str) -> None:
    """train_batch_size = micro batch x gradient accumulation x ranks, as DeepSpeed requires (checked now).

    scalemlo feeds each level its batches itself, so these numbers are
    DeepSpeed's bookkeeping only; "auto" (or leaving them out) is fine.
    """
    gas, ranks = cfg["gradient_accumulation_steps"], world_size()
    total, micro = cfg.get("train_batch_size", "auto"), cfg.get("train_micro_batch_size_per_gpu", "auto")
    if total == "auto":
        cfg.pop("train_batch_size", None)
    if micro == "auto":
        if total != "auto" and total % (gas * ranks):
            raise ValueError(
                f"level {name!r}: deepspeed_config train_batch_size={total} is not a multiple of "
                f'gradient_accumulation_steps={gas} x {ranks} rank(s); fix it or set it to "auto"'
            )
        cfg["train_micro_batch_size_per_gpu"] = 1 if total == "auto" else total // (gas * ranks)
    elif total != "auto" and total != micro * gas * ranks:
        raise ValueError(
            f"level {name!r}: deepspeed_config train_batch_size={total} conflicts with "
            f"train_micro_batch_size_per_gpu={micro} x gradient_accumulation_steps={gas} x {ranks} rank(s) = "
            f'{micro * gas * ranks}; make them agree, or set train_batch_size to "auto"'
        )


class _RecordedKeys(dict):
    """A config dict that notes every key looked up in it (``get``, ``[]``, ``in``, ``in d.keys()``);
    ``copy.copy`` keeps the class and shares the notes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.looked_up: set = set()

    def get(self, key, *default):
        self.looked_up.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.looked_up.add(key)
        return super().__contains__(key)

    def keys(self):
        return _RecordedKeysView(self)


class _RecordedKeysView:
    """``d.keys()`` of a `_RecordedKeys`: ``key in d.keys()`` is noted as ``key in d``."""

    def __init__(self, recorded: _RecordedKeys) -> None:
        self.recorded = recorded

    def __contains__(self, key) -> bool:
        return key in self.recorded

    def __iter__(self):
        return iter(dict.keys(self.recorded))

    def __len__(self) -> int:
        return len(self.recorded)


@functools.lru_cache(maxsize=1)
def known_deepspeed_keys() -> frozenset[str]:
    """The top-level keys the installed DeepSpeed's own config model reads.

    DeepSpeed ignores top-level keys it does not know, so a typo ("zero_optimisation") silently changes
    nothing; this set lets scalemlo refuse it. It is every key ``deepspeed.runtime.config.DeepSpeedConfig``
    looks up while it parses a minimal config (each lookup noted), so it follows the installed version.
    Keys inside a section ("zero_optimization", "bf16", ...) are checked by DeepSpeed's section models
    themselves, which refuse unknown keys.
    """
    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _RecordedKeys(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    try:
        DeepSpeedConfig(probe)
    except Exception:  # noqa: BLE001 - the lookups are made while parsing, before the checks that could refuse
        pass
    keys = frozenset(k for k in probe.looked_up if isinstance(k, str))
    if "zero_optimization" not in keys:
        raise RuntimeError("could not read the installed DeepSpeed's config keys (DeepSpeedConfig changed)")
    return keys


def deepspeed_config_for(config, name: str, module: torch.nn.Module | None = None) -> dict:
    """The level's DeepSpeed config with our settings filled in.

    DeepSpeed 0.19 clips gradients at norm 1.0 when the config says nothing,
    which would silently change every level's update: the clipping always
    comes from ``LevelConfig.gradient_clipping`` unless the config sets it.

    Args:
        config: the level's `scalemlo.config.LevelConfig`.
        name: the level's name (for messages).
        module: the level's module, if at hand: float64 parameters are refused, and its
            ``config.hidden_size`` fills the ZeRO bucket sizes given as ``"auto"``.

    Returns:
        The config dict.

    Raises:
        ValueError: keys DeepSpeed does not know, float64 parameters, gradient accumulation or clipping that
            disagree with the ``LevelConfig``, or settings scalemlo does not support.
    """
    cfg = config.resolved_deepspeed_config()
    unknown = [key for key in cfg if key not in known_deepspeed_keys()]
    if unknown:
        hints = {k: difflib.get_close_matches(k, known_deepspeed_keys(), n=1) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
        raise ValueError(
            f"level {name!r}: deepspeed_config has keys DeepSpeed does not know: {unknown} "
            f"(DeepSpeed would ignore them silently){'; ' + hint if hint else ''}"
        )
    if module is not None and any(p.dtype == torch.float64 for p in module.parameters()):
        raise ValueError(
            f"level {name!r}: DeepSpeed 0.19 cannot reduce float64 gradients; "
            "use LevelConfig(backend='torch') for float64 levels"
        )
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas == "auto":
        cfg["gradient_accumulation_steps"] = config.gradient_accumulation
    elif gas != config.gradient_accumulation:
        raise ValueError(
            f"level {name!r}: deepspeed_config has gradient_accumulation_steps={gas} but "
            f"LevelConfig.gradient_accumulation={config.gradient_accumulation}; make them agree"
        )
    clip = cfg.get("gradient_clipping", "auto")
    if clip == "auto":
        cfg["gradient_clipping"] = config.gradient_clipping
    elif config.gradient_clipping not in (0, clip):
        raise ValueError(
            f"level {name!r}: deepspeed_config has gradient_clipping={clip} but "
            f"LevelConfig.gradient_clipping={config.gradient_clipping}; make them agree"
        )
    _check_batch_sizes(cfg, name)
    cfg.setdefault("steps_per_print", 10**9)
    stage = zero_stage_of(cfg, name)
    _fill_zero_auto(cfg.get("zero_optimization", {}), module, name)
    if stage > 0:
        # DeepSpeed asks for this flag for any optimizer outside its short list
        # (torch's SGD among them); ZeRO works with any torch optimizer.
        cfg.setdefault("zero_allow_untested_optimizer", True)
    fp16, bf16 = cfg.get("fp16", {}).get("enabled"), cfg.get("bf16", {}).get("enabled")
    if fp16 is True and bf16 is True:
        raise ValueError(f'level {name!r}: deepspeed_config enables both "fp16" and "bf16"; enable one of them')
    if fp16 is True and cfg["fp16"].get("auto_cast"):
        raise ValueError(
            f'level {name!r}: "fp16": {{"auto_cast": true}} (autocast inside the engine\'s forward) is not '
            "supported: levels run their modules directly; drop auto_cast (the module's parameters become fp16)"
        )
    return cfg
