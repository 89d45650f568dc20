"""``ReweightingArguments``: ``TrainingArguments`` plus the meta level's fields.

Parsed by ``transformers.HfArgumentParser`` like any Trainer script's
arguments (flags, or one JSON/YAML file). The meta level is the weighting
model that learns how to weight the training data against a clean meta set;
its hypergradient fields mirror `scalemlo.LevelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from scalemlo.config import LevelConfig
from scalemlo.distributed import ensure_distributed
from scalemlo.hf.adapters import require_peft
from scalemlo.hf.exports import WEIGHTED_DATASET_MODES
from scalemlo.hf.selection import SCHEDULES as SELECTION_SCHEDULES
from scalemlo.hf.state import forget_leftover_deepspeed_flag, one_process_view
from scalemlo.methods import METHODS, get_method, methods_help, shared_forward_methods

META_OPTIMIZERS = ("adam", "adamw", "sgd")
LONG_SEQUENCES = ("truncate", "refuse")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ReweightingArguments(TrainingArguments):
    """The Trainer's arguments and the meta level's (see ``--help``).

    With ``deepspeed`` set, building them starts the process group DeepSpeed needs
    (`scalemlo.distributed.ensure_distributed`: the launcher's, or a one-process group without one),
    so a script runs alone, under ``deepspeed`` and under ``torchrun`` with no set-up call of its own.
    Without it, what an earlier Trainer of the process left (``ACCELERATE_USE_DEEPSPEED``) is ignored and a
    one-process run stays one process (no DDP): `scalemlo.hf.state`.
    """

    reweighting: str = field(
        default="meta_weight_net",
        metadata=_help(
            "How training examples are weighted: meta_weight_net (an MLP from each example's loss to its weight), "
            "source (one learned weight per value of the `source` column, a softmax), or example (one learned "
            "logit per training example)"
        ),
    )
    reweighting_hidden_size: int = field(default=100, metadata=_help("Hidden units of the Meta-Weight-Net"))
    meta_learning_rate: float = field(default=1e-3, metadata=_help("Learning rate of the weighting model"))
    meta_optimizer: str = field(default="adam", metadata=_help(f"Optimizer of the weighting model: {META_OPTIMIZERS}"))
    meta_weight_decay: float = field(default=0.0, metadata=_help("Weight decay of the weighting model's optimizer"))
    meta_adam_beta1: float = field(default=0.9, metadata=_help("beta1 of the weighting model's adam or adamw"))
    meta_adam_beta2: float = field(
        default=0.999,
        metadata=_help(
            "beta2 of the weighting model's adam or adamw: how many meta steps its gradient scale is averaged "
            "over (about 1 / (1 - beta2))"
        ),
    )
    per_device_meta_batch_size: int = field(
        default=8, metadata=_help("Meta-set examples per device per meta micro-batch")
    )
    meta_gradient_accumulation_steps: int = field(
        default=1, metadata=_help("Meta micro-batches averaged per meta step")
    )
    unroll_steps: int = field(default=1, metadata=_help("Optimizer steps of the model per step of the weighting model"))
    meta_warmup_steps: int = field(
        default=0, metadata=_help("Model optimizer steps before the weighting model first steps (weights stay uniform)")
    )
    meta_stop_ratio: float = field(
        default=1.0,
        metadata=_help(
            "Share of the run's optimizer steps (max_steps) after which the weighting model takes no more steps "
            "and the weights stay as learned; 1.0: it steps to the end"
        ),
    )
    hypergradient_method: str = field(
        default="finite_difference",
        metadata=_help(methods_help()),
    )
    fd_radius: float = field(default=1e-2, metadata=_help("Central-difference radius r (eps = r / ||w||)"))
    neumann_iterations: int = field(default=10, metadata=_help("Neumann series terms"))
    neumann_alpha: float = field(default=1e-2, metadata=_help("Neumann step alpha (needs alpha < 2 / lambda_max)"))
    cg_iterations: int = field(default=10, metadata=_help("Conjugate-gradient iterations"))
    penalty_alpha: float = field(default=100.0, metadata=_help("Penalty weight of the penalty method"))
    penalty_steps: int = field(default=1, metadata=_help("Auxiliary-copy updates per meta step (penalty)"))
    second_order: str = field(
        default="finite_difference",
        metadata=_help(
            "How neumann/cg form second-order products: finite_difference (differences of gradients: any model, "
            "any ZeRO stage) or autograd (double backward: exact, not at ZeRO-3, needs kernels with a double "
            "backward; scalemlo.LevelConfig's default)"
        ),
    )
    shared_forward: bool | None = field(
        default=None,
        metadata=_help(
            "Take each meta step inside the model's next optimizer step, on its forward (7 forward units instead "
            "of 8, exact about the weights' held inputs; scalemlo.LevelConfig.shared_forward). Default: on for "
            f"the methods that can share it ({', '.join(shared_forward_methods())}) without gradient accumulation "
            "on either level (with it, the meta step would differentiate the first micro-batch of the step only)"
        ),
    )
    shared_forward_difference: str = field(
        default="one_sided",
        metadata=_help(
            "Shared forward: 'one_sided' (one moved forward) or 'central' (two, error quadratic in fd_radius)"
        ),
    )
    shared_forward_radius: float | None = field(
        default=None, metadata=_help("Shared forward: radius of the one-sided difference (default by dtype: 1e-3 fp32)")
    )
    meta_max_grad_norm: float = field(default=0.0, metadata=_help("Gradient clipping of the weighting model (0: off)"))
    meta_deepspeed: str | None = field(
        default=None,
        metadata=_help(
            "DeepSpeed JSON of the weighting model's own engine (default: ZeRO-0 fp32; ZeRO-3 is refused: "
            "it steps on hypergradients)"
        ),
    )
    nonfinite: str = field(
        default="raise", metadata=_help("A non-finite loss or gradient: raise (stop) or skip (drop the batch/step)")
    )
    long_sequences: str = field(
        default="truncate",
        metadata=_help("Texts longer than the model's context: truncate (with a warning) or refuse"),
    )
    selection_pool: int = field(
        default=1,
        metadata=_help(
            "Candidates per trained example: each micro-batch is chosen from selection_pool x "
            "per_device_train_batch_size candidates in proportion to the learned weights (--selection_schedule), "
            "and trains with weight 1 (1: every example of the batch trains, weighted). Needs a scheme that weighs "
            "an example without the model's forward (scorer on ngrams, example, source)"
        ),
    )
    selection_schedule: str = field(
        default="balanced",
        metadata=_help(
            "With --selection_pool > 1, how candidates are chosen: balanced (the candidates of highest share x "
            "(times passed over + 1): each example trains in proportion to its weight, at even intervals) or "
            "random (drawn without replacement with probabilities proportional to the weights)"
        ),
    )
    selection_floor: float = field(
        default=0.0,
        metadata=_help(
            "With --selection_pool > 1, a floor under every candidate's weight, as a fraction of the pool's mean "
            "weight: an example the weighting drops still trains about floor / (1 + floor) as often as with equal "
            "weights, so its hypergradient keeps being measured and can raise it again (0: no floor)"
        ),
    )
    save_weighted_dataset: str = field(
        default="no",
        metadata=_help(
            "After training, write the training set with its learned weights (mean 1 over the set) to "
            "output_dir/weighted_dataset (datasets' save_to_disk): no, column (every row, a scalemlo_weight "
            "column), filter (the rows of weight >= --weighted_dataset_threshold) or resample (as many rows, "
            "drawn with replacement in proportion to the weights, seeded by --seed)"
        ),
    )
    weighted_dataset_threshold: float = field(
        default=0.5, metadata=_help("--save_weighted_dataset filter: the least weight a row keeps (mean weight: 1)")
    )
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("Start over in an output_dir that holds another run's checkpoints")
    )
    max_length: int | None = field(
        default=None, metadata=_help("Tokens per example (default: the model's context length)")
    )
    use_peft: bool = field(
        default=False,
        metadata=_help(
            "Train a LoRA adapter (peft: pip install peft) over the frozen model, as TRL's --use_peft: the model "
            "steps and the hypergradient flows through the adapter's parameters only; save_model writes the adapter"
        ),
    )
    lora_r: int = field(default=16, metadata=_help("--use_peft: LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("--use_peft: LoRA alpha (the update is scaled by alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("--use_peft: dropout on the LoRA branch's input"))
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata=_help(
            "--use_peft: the modules LoRA adapts, by name (e.g. q_proj v_proj), or all-linear (every linear layer "
            "but the output head); default: peft's choice for the architecture"
        ),
    )

    def __post_init__(self) -> None:
        if self.deepspeed:
            # DeepSpeed needs a process group before TrainingArguments resolves the devices and reads the
            # config: without a launcher accelerate would look for one through MPI (mpi4py), and under
            # deepspeed/torchrun a ZeRO-3 config's batch sizes would be checked against one rank. The
            # launcher's group, or a one-process gloo group without one (idempotent).
            ensure_distributed()
        else:
            forget_leftover_deepspeed_flag(self.deepspeed)
        with one_process_view(self.deepspeed):
            super().__post_init__()
        for name, value, allowed in (
            ("meta_optimizer", self.meta_optimizer, META_OPTIMIZERS),
            ("long_sequences", self.long_sequences, LONG_SEQUENCES),
            ("save_weighted_dataset", self.save_weighted_dataset, WEIGHTED_DATASET_MODES),
            ("selection_schedule", self.selection_schedule, SELECTION_SCHEDULES),
        ):
            if value not in allowed:
                raise ValueError(f"--{name} {value!r} is not known; allowed: {', '.join(allowed)}")
        for name in ("per_device_meta_batch_size", "meta_gradient_accumulation_steps", "unroll_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.selection_pool < 1:
            raise ValueError(f"--selection_pool must be >= 1, got {self.selection_pool}")
        if not self.selection_floor >= 0:
            raise ValueError(
                f"--selection_floor must be >= 0 (a fraction of the pool's mean weight), got {self.selection_floor}"
            )
        if self.selection_floor > 0 and self.selection_pool == 1:
            raise ValueError(
                "--selection_floor applies to the draw from a selection pool; set --selection_pool > 1 or leave "
                "the floor at 0"
            )
        for name in ("meta_adam_beta1", "meta_adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.meta_warmup_steps < 0:
            raise ValueError(f"--meta_warmup_steps must be >= 0, got {self.meta_warmup_steps}")
        if not 0.0 < self.meta_stop_ratio <= 1.0:
            raise ValueError(
                f"--meta_stop_ratio must be in (0, 1] (a share of max_steps; 1: the weighting learns to the end), "
                f"got {self.meta_stop_ratio}"
            )
        self._check_peft()
        self.meta_level_config()  # bad method names, radii, ... fail now, before any model is built

    def _check_peft(self) -> None:
        targets = self.lora_target_modules
        if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0].lower() == "all-linear":
            # peft takes the shorthand as a string only; a one-name list stays a list (a string is a regex to peft)
            self.lora_target_modules = targets[0]
        if not self.use_peft:
            return
        require_peft("--use_peft")  # before any model is built
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def _shared_forward(self) -> bool:
        if self.shared_forward is not None:
            return self.shared_forward
        return (
            self.hypergradient_method in METHODS
            and get_method(self.hypergradient_method).shared_forward
            and self.meta_gradient_accumulation_steps == 1
            and self.gradient_accumulation_steps == 1  # else the meta step would see the first micro-batch only
        )

    def meta_level_config(self) -> LevelConfig:
        """The weighting level's `scalemlo.LevelConfig` from these arguments."""
        return LevelConfig(
            method=self.hypergradient_method,
            unroll_steps=1,  # the Trainer's loop schedules meta steps itself (every unroll_steps)
            fd_radius=self.fd_radius,
            neumann_iterations=self.neumann_iterations,
            neumann_alpha=self.neumann_alpha,
            cg_iterations=self.cg_iterations,
            penalty_alpha=self.penalty_alpha,
            penalty_steps=self.penalty_steps,
            second_order=self.second_order,
            shared_forward=self._shared_forward(),
            shared_forward_difference=self.shared_forward_difference,
            shared_forward_radius=self.shared_forward_radius,
            gradient_accumulation=self.meta_gradient_accumulation_steps,
            gradient_clipping=self.meta_max_grad_norm,
            deepspeed_config=self.meta_deepspeed,
        )
