"""What one Trainer leaves behind in the process, forgotten before the next one builds its accelerator.

``transformers`` and ``accelerate`` keep process-wide state: accelerate's ``AcceleratorState``/``PartialState``
(a shared dict), the environment variable ``ACCELERATE_USE_DEEPSPEED`` that an ``Accelerator`` built with a
DeepSpeed plugin sets and never removes, and transformers' weak reference to the last DeepSpeed config
(``is_deepspeed_zero3_enabled``). Left alone, a Trainer built after a ``--deepspeed`` one in the same
process (a baseline beside the learned run, tests) runs under DeepSpeed's default ZeRO-2 without being asked,
or fails with "You cannot pass in a deepspeed_plugin when creating a second Accelerator".

And a one-process run is not a distributed one: the process group scalemlo starts without a launcher
(`scalemlo.distributed.ensure_distributed`, for DeepSpeed) sets ``LOCAL_RANK=0``, from which accelerate
concludes the run is distributed (``MULTI_CPU``/``MULTI_GPU``) and the Trainer wraps the model in
``DistributedDataParallel`` over one process (with a ``find_unused_parameters`` warning).
`one_process_view` hides it while accelerate decides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from scalemlo.distributed import launched

# accelerate's launcher sets this beside ACCELERATE_USE_DEEPSPEED; an Accelerator built in this process does not
ACCELERATE_LAUNCH_DEEPSPEED_MARK = "ACCELERATE_CONFIG_DS_FIELDS"


def reset_trainer_state() -> None:
    """Forget the process-wide state a Trainer leaves behind (accelerate's state, the HF DeepSpeed config).

    ``ReweightingTrainer`` calls it (through `isolate`) before it builds its accelerator, so users need
    not; it stays for scripts that build plain ``transformers.Trainer`` objects after one. The process group
    stays.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # the process group itself stays
    GradientState._reset_state()
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover - older transformers
        pass


def leftover_deepspeed_flag() -> bool:
    """True when ``ACCELERATE_USE_DEEPSPEED`` was set by an earlier Accelerator of this process, not by
    ``accelerate launch`` (which sets ``ACCELERATE_CONFIG_DS_FIELDS`` beside it)."""
    flag = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return flag and ACCELERATE_LAUNCH_DEEPSPEED_MARK not in os.environ


def forget_leftover_deepspeed_flag(deepspeed: Any) -> None:
    """Without ``--deepspeed``, drop a leftover ``ACCELERATE_USE_DEEPSPEED`` (see `leftover_deepspeed_flag`):
    ``TrainingArguments`` and accelerate would otherwise build a default (ZeRO-2) DeepSpeed plugin from it."""
    if not deepspeed and leftover_deepspeed_flag():
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def isolate(args: Any) -> None:
    """Before a Trainer builds its accelerator: forget an earlier Trainer's state, keep this one's own.

    Args:
        args: the Trainer's ``TrainingArguments`` (their DeepSpeed config, if any, becomes transformers'
            current one again: ``is_deepspeed_zero3_enabled`` answers for this run).
    """
    forget_leftover_deepspeed_flag(args.deepspeed)
    reset_trainer_state()
    # The arguments' own process state again (accelerate's PartialState from their use_cpu/ddp_backend and the
    # launcher's ranks), which the reset forgot: the Accelerator the Trainer builds next reuses it. Built by the
    # Accelerator alone it would miss use_cpu, and a CPU run under a launcher would be one process on every
    # rank: each rank its own process zero (all of them saving), the training data not split between them.
    args.__dict__.pop("_setup_devices", None)  # a cached_property of TrainingArguments
    _ = args.device
    config = getattr(args, "hf_deepspeed_config", None)
    if args.deepspeed and config is not None:
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        set_hf_deepspeed_config(config)


def is_one_process_run(deepspeed: Any) -> bool:
    """True for a run without a launcher and without ``--deepspeed`` in a process group of one (or none)."""
    import torch.distributed as dist

    if deepspeed or launched():
        return False
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


@contextmanager
def one_process_view(deepspeed: Any) -> Iterator[None]:
    """Hide ``LOCAL_RANK`` from accelerate while it decides the distributed type of a one-process run
    (`is_one_process_run`), so the model is not wrapped in DDP; restored on exit (DeepSpeed's engines,
    the weighting model's included, read it)."""
    one_process = is_one_process_run(deepspeed)
    hidden = os.environ.pop("LOCAL_RANK", None) if one_process else None
    # transformers then warns that the group is initialized but the run is not distributed: that is the point
    quiet = _DropMessage("torch.distributed process group is initialized, but parallel_mode")
    logger = logging.getLogger("transformers.training_args")
    if one_process:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
        if hidden is not None:
            os.environ["LOCAL_RANK"] = hidden


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)
