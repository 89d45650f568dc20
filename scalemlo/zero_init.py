"""Build a ZeRO-3 level's model partitioned from the start, so no rank ever holds it whole.

    with scalemlo.zero_init(level_config):          # or a DeepSpeed config dict / JSON path
        model = AutoModelForCausalLM.from_config(config)   # or any torch module
    Level("lm", model, ..., config=level_config)

Under a ZeRO-3 config this is ``deepspeed.zero.Init``: each parameter is
partitioned over the ranks as it is created (each rank allocates its own
1/N), and the level's engine takes the partitioned module as it is. Under any
other stage it does nothing: the module is built whole, as usual.

Two things it takes care of:

- ``torch._dynamo`` is imported first. With torch 2.13 and DeepSpeed 0.19,
  importing it *inside* ``zero.Init`` fails with ``TypeError: Signature
  mismatch ... tensor_pynew`` (dynamo checks the signature of
  ``torch.Tensor.__new__``, which ``zero.Init`` replaces), and importing a
  Hugging Face model class for the first time imports dynamo.
- Hugging Face sees a ZeRO-3 config while inside (``HfDeepSpeedConfig``, the
  one a Trainer registers is restored after), so ``from_pretrained`` loads the
  checkpoint into the partitions as under the Trainer; under a bare
  ``zero.Init`` it would load into empty tensors and fail.
- ``"auto"`` values (the Hugging Face convention) cannot be resolved before
  the model exists; ``zero.Init`` needs none of them, so they are left out of
  the config it sees (the engine resolves them later from the built model).

Initial weights: modules initialize each partition under ``zero.Init`` (and
Hugging Face models gather to initialize), so the draw differs from the same
seed built whole. To start from given weights, use ``from_pretrained`` inside
the context, or load them under
``deepspeed.zero.GatheredParameters(params, modifier_rank=0)`` on rank 0.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from scalemlo.config import LevelConfig
from scalemlo.distributed import ensure_distributed, import_deepspeed


def _config_dict(config: LevelConfig | Mapping | str | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, LevelConfig):
        return config.resolved_deepspeed_config()
    if isinstance(config, str):
        with open(config) as fh:
            return json.load(fh)
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config)))
    raise ValueError(
        f"zero_init takes a LevelConfig, a DeepSpeed config dict or a JSON path, got {type(config).__name__}"
    )


def _without_auto(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_auto(v) for k, v in value.items() if v != "auto"}
    return value


@contextlib.contextmanager
def zero_init(config: LevelConfig | Mapping | str | None) -> Iterator[bool]:
    """Modules built inside are partitioned over the ranks when ``config`` is ZeRO-3 (yields True then).

    Starts the process group if none exists (as a level would).

    Args:
        config: the level's ``LevelConfig`` (its ``deepspeed_config``), a
            DeepSpeed config dict, or a path to a JSON one.

    Yields:
        Whether the modules built inside are partitioned (ZeRO-3).

    Raises:
        ValueError: a ZeRO stage other than 0, 1, 2 or 3.
    """
    cfg = _config_dict(config)
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_init: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage != 3:
        yield False
        return
    import torch._dynamo  # noqa: F401  (see the module docstring: it cannot be imported inside zero.Init)

    deepspeed = import_deepspeed()
    ensure_distributed()
    init_config = {"zero_optimization": _without_auto(zero), "train_micro_batch_size_per_gpu": 1}
    for key in ("bf16", "fp16"):
        if key in cfg:
            init_config[key] = _without_auto(cfg[key])
    with _hf_zero3(init_config), deepspeed.zero.Init(config_dict_or_path=init_config):
        yield True


@contextlib.contextmanager
def _hf_zero3(init_config: dict) -> Iterator[None]:
    """While inside, Hugging Face sees a ZeRO-3 DeepSpeed config (as under its Trainer), so
    ``from_pretrained`` loads the checkpoint into the partitions (gathering each on rank 0)
    instead of into empty tensors. The config registered before (a Trainer's) is restored after."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # no transformers: plain modules only
        yield
        return
    previous = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = hf_deepspeed.HfDeepSpeedConfig(init_config)  # registers itself (a weak reference)
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous
        del config
