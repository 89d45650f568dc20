"""The private names of transformers, accelerate and DeepSpeed that scalemlo uses, in one place.

scalemlo drives other libraries' training loops from inside, and a few of the hooks it needs are not public
API. Each is listed here with where it is used and why, so that an upgrade that removes one fails at
construction with an error naming it (`require`), and the test suite checks the installed versions
(``tests/test_upstream.py``). ``docs/status.md`` prints this table.

Names on a class are checked on the class. Names that only exist on an object DeepSpeed builds for some
configurations (``fp32_groups`` of its bf16/fp16 ZeRO-0 optimizer, ``grad_partitions_flat_buffer`` of
ZeRO-3) are read with a fallback where they are used and covered by the ZeRO and precision tests; they are
listed with ``on_class=False``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

#: The versions these names were checked against (``pyproject.toml``'s lower bounds).
TESTED = {"transformers": "5.x", "accelerate": "1.x", "deepspeed": "0.19.x"}


@dataclass(frozen=True)
class Internal:
    """One private upstream name: ``owner`` (``module:Class``) has ``name``."""

    package: str
    owner: str
    name: str
    used_in: str
    why: str
    on_class: bool = True


INTERNALS = (
    Internal(
        "transformers",
        "transformers:Trainer",
        "_save_checkpoint",
        "scalemlo/hf/trainer.py",
        "overridden: the Trainer's checkpoint is written into a staging directory with the scalemlo state "
        "and made visible by one rename (atomic checkpoints)",
    ),
    Internal(
        "transformers",
        "transformers:Trainer",
        "_get_output_dir",
        "scalemlo/hf/trainer.py",
        "read, and pointed at the staging directory for the duration of _save_checkpoint",
    ),
    Internal(
        "transformers",
        "transformers:Trainer",
        "_remove_unused_columns",
        "scalemlo/hf/evaluation.py",
        "extended: evaluation keeps the columns a weighting reads (ids, sources)",
    ),
    Internal(
        "transformers",
        "transformers:Trainer",
        "_get_dataloader",
        "scalemlo/hf/trainer.py",
        "with selection_pool > 1, the training loader yields selection_pool x the batch of candidates, built as "
        "the Trainer builds its own (sampler, collator, workers, seeds)",
    ),
    Internal(
        "transformers",
        "transformers:Trainer",
        "_get_train_sampler",
        "scalemlo/hf/trainer.py",
        "passed to _get_dataloader for the candidates' loader: the Trainer's own sampler and data order",
    ),
    Internal(
        "transformers",
        "transformers:Trainer",
        "_train_batch_size",
        "scalemlo/hf/trainer.py",
        "the per-device batch the Trainer trains with (it can differ from the argument under auto_find_batch_size)",
        on_class=False,
    ),
    Internal(
        "transformers",
        "transformers:Trainer",
        "_prepare_inputs",
        "scalemlo/hf/evaluation.py",
        "the Trainer's move of an evaluation batch to the device, before the token-mean loss",
    ),
    Internal(
        "transformers",
        "transformers.integrations.deepspeed:",
        "_hf_deepspeed_config_weak_ref",
        "scalemlo/zero_init.py",
        "zero_init builds a ZeRO-3 model partitioned under transformers' from_pretrained and puts back the "
        "process-wide DeepSpeed config it found",
    ),
    Internal(
        "accelerate",
        "accelerate.state:AcceleratorState",
        "_reset_state",
        "scalemlo/hf/state.py",
        "a second Trainer in one process starts from a clean accelerate state (its own DeepSpeed plugin)",
    ),
    Internal(
        "accelerate",
        "accelerate.state:GradientState",
        "_reset_state",
        "scalemlo/hf/state.py",
        "as above, for the gradient-accumulation state",
    ),
    Internal(
        "accelerate",
        "torch.nn:Module",
        "_original_forward",
        "scalemlo/precision.py",
        "set by accelerate's Accelerator.prepare_model on a model whose forward it wraps in autocast: "
        "forwards inside a hypergradient run the unwrapped one (the precision rule of scalemlo/precision.py)",
        on_class=False,
    ),
    Internal(
        "deepspeed",
        "deepspeed.runtime.engine:DeepSpeedEngine",
        "_backward_prologue",
        "scalemlo/backend/deepspeed.py",
        "a level's backward runs the ZeRO prologue around torch.autograd.backward(inputs=its parameters), so "
        "another level's ZeRO hooks do not fire",
    ),
    Internal(
        "deepspeed",
        "deepspeed.runtime.engine:DeepSpeedEngine",
        "_backward_epilogue",
        "scalemlo/backend/deepspeed.py",
        "as above: reduce-scatters the last gradient bucket",
    ),
    Internal(
        "deepspeed",
        "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer",
        "_update_scale",
        "scalemlo/backend/deepspeed.py",
        "fp16: a non-finite hypergradient lowers DeepSpeed's loss scale as its own overflow check would",
    ),
    Internal(
        "deepspeed",
        "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3",
        "_update_scale",
        "scalemlo/backend/deepspeed.py",
        "as above, at ZeRO-3",
    ),
    Internal(
        "deepspeed",
        "deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer",
        "fp32_groups",
        "scalemlo/backend/deepspeed.py, scalemlo/backend/base.py",
        "bf16/fp16 at ZeRO-0: the float32 master weights are the level's state (undoing the optimizer step "
        "DeepSpeed takes when it builds the optimizer, reading and writing the weights)",
        on_class=False,
    ),
    Internal(
        "deepspeed",
        "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3",
        "_is_gradient_accumulation_boundary",
        "scalemlo/backend/deepspeed.py",
        "ZeRO-3 with optimizer offload: saved and restored around finalize_gradient_accumulation_boundary, which "
        "copies the gradient partitions where the local-gradient accessor reads them",
        on_class=False,
    ),
    Internal(
        "deepspeed",
        "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3",
        "grad_partitions_flat_buffer",
        "scalemlo/backend/deepspeed.py",
        "ZeRO-3: zeroed after a hypergradient's backward (the local-gradient accessor returns copies in bf16)",
        on_class=False,
    ),
)


class UpstreamError(RuntimeError):
    """An installed transformers, accelerate or DeepSpeed lacks a name scalemlo uses (see `INTERNALS`)."""


def _resolve(owner: str):
    module, _, qualname = owner.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def _owner(internal: Internal) -> str:
    module, _, qualname = internal.owner.partition(":")
    return qualname or module


def missing(package: str | None = None) -> list[Internal]:
    """The class-level internals (of ``package``, or all) that the installed versions lack."""
    gone = []
    for internal in INTERNALS:
        if not internal.on_class or (package is not None and internal.package != package):
            continue
        try:
            present = hasattr(_resolve(internal.owner), internal.name)
        except (ImportError, AttributeError):
            present = False
        if not present:
            gone.append(internal)
    return gone


def require(package: str) -> None:
    """Raise `UpstreamError` naming every private name of ``package`` scalemlo uses that is missing.

    Called where the names are first needed (``ReweightingTrainer`` construction, a DeepSpeed level's
    backend), before any compute.
    """
    gone = missing(package)
    if gone:
        version = importlib.import_module(package).__version__
        names = "; ".join(f"{_owner(i)}.{i.name} (used in {i.used_in}: {i.why})" for i in gone)
        raise UpstreamError(
            f"{package} {version} lacks what scalemlo uses from it: {names}. scalemlo was tested with "
            f"{package} {TESTED[package]}; install that (pip install '{package}=={TESTED[package].replace('x', '*')}')."
        )


def table() -> str:
    """The inventory as a Markdown table (``docs/status.md`` holds it; a test keeps the two equal)."""
    rows = ["| package | owner | name | used in | why |", "|---|---|---|---|---|"]
    for i in INTERNALS:
        owner = _owner(i) + ("" if i.on_class else " (instance)")
        rows.append(f"| {i.package} | `{owner}` | `{i.name}` | {i.used_in} | {i.why} |")
    return "\n".join(rows)
