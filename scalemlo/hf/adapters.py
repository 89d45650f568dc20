"""LoRA adapters (PEFT) for ``ReweightingTrainer``, as TRL's trainers take them.

``--use_peft`` with ``--lora_r --lora_alpha --lora_dropout --lora_target_modules`` (TRL's flags and
defaults), or a ``peft_config`` (e.g. a ``peft.LoraConfig``) given to the trainer, wraps the model with
``peft.get_peft_model`` before the Trainer sees it. The base weights are frozen (``requires_grad`` False),
so the Trainer's optimizer, its DeepSpeed engine and the trainer's model level (built from the parameters
that require gradients) hold the adapter's parameters only: the model steps and the hypergradient flows
through them alone, and ``save_model`` writes the adapter (``adapter_config.json``).

``peft`` is an optional dependency (``pip install peft``, or the ``peft`` extra).
"""

from __future__ import annotations

from typing import Any

PEFT_INSTALL_HINT = "pip install peft (or pip install 'scalemlo[peft]')"


def require_peft(reason: str):
    """The ``peft`` module, or an ImportError that says how to install it.

    Args:
        reason: what needs peft (named in the error).

    Raises:
        ImportError: peft is not installed.
    """
    try:
        import peft
    except ImportError:
        raise ImportError(f"{reason} needs the peft package: {PEFT_INSTALL_HINT}") from None
    return peft


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the model itself when it has none)."""
    return model.get_base_model() if is_peft_model(model) else model


def lora_config(args: Any):
    """The ``peft.LoraConfig`` of ``--use_peft`` (TRL's ``get_peft_config``).

    A causal-LM LoRA of rank ``lora_r``, scale ``lora_alpha / lora_r``, dropout ``lora_dropout`` on
    ``lora_target_modules`` (None: peft's default for the architecture; ``"all-linear"``: every linear layer
    but the output head), no bias.

    Args:
        args: the training arguments holding the ``lora_*`` fields.
    """
    peft = require_peft("--use_peft")
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        bias="none",
    )


def with_adapter(model: Any, peft_config: Any) -> Any:
    """``model`` wrapped by ``peft.get_peft_model(model, peft_config)``.

    Raises:
        ValueError: the model already is a PeftModel (its adapter would be wrapped in a second one).
    """
    peft = require_peft("peft_config")
    if is_peft_model(model):
        raise ValueError(
            "the model already is a PeftModel and a peft_config (or --use_peft) was given too; pass one of them: "
            "the PeftModel alone (its trainable adapter is trained), or the base model with the config"
        )
    return peft.get_peft_model(model, peft_config)


def with_peft(args: tuple, kwargs: dict, peft_config: Any) -> tuple[tuple, dict]:
    """The Trainer's positional and keyword arguments with its model wrapped in an adapter.

    The model is wrapped when ``peft_config`` is given or the arguments say ``use_peft`` (`lora_config`);
    the arguments are unchanged otherwise.

    Args:
        args: the Trainer's positional arguments (the model first, the training arguments second).
        kwargs: the Trainer's keyword arguments.
        peft_config: a ``peft`` config, or None.

    Raises:
        ValueError: an adapter is asked for and no model is given.
    """
    training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
    if peft_config is None and getattr(training_args, "use_peft", False):
        peft_config = lora_config(training_args)
    if peft_config is None:
        return args, kwargs
    if "model" in kwargs:
        return args, {**kwargs, "model": with_adapter(kwargs["model"], peft_config)}
    if not args:
        raise ValueError("peft_config (or --use_peft) needs a model to wrap: pass model=")
    return (with_adapter(args[0], peft_config), *args[1:]), kwargs


def adapter_settings(model: Any) -> dict[str, Any] | None:
    """The active adapter's settings for a model card (None: not a PeftModel)."""
    if not is_peft_model(model):
        return None
    config = model.peft_config[model.active_adapter]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    settings = {"type": str(getattr(config.peft_type, "value", config.peft_type))}
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules"):
        if hasattr(config, key):
            value = getattr(config, key)
            settings[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    settings["trainable parameters"] = f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f} %)"
    return settings
