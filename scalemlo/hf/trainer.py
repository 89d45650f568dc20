"""``ReweightingTrainer``: a ``transformers.Trainer`` whose training data is weighted by a learned model.

A user adopts it by changing one class and passing a ``meta_dataset``::

    trainer = ReweightingTrainer(model=model, args=ReweightingArguments(...), train_dataset=train,
                                 meta_dataset=meta, data_collator=collator)
    trainer.train()

The model is trained by the Trainer's own loop (its DeepSpeed engine comes
from ``--deepspeed ds.json``, ZeRO 0-3) on sum_i w_i l_i / n: per-example
causal-LM losses from the logits, weights from a reweighting module
(`scalemlo.hf.reweighting`) held fixed during the model's step. Every
``unroll_steps`` optimizer steps the weighting module takes one step on the
hypergradient of the model's loss on a clean meta batch, after the first
``meta_warmup_steps`` and up to the share ``meta_stop_ratio`` of ``max_steps``
(the weights stay as learned after it). That step is a
scalemlo program: the model is a `scalemlo.Level` over the Trainer's own
engine (adopted, never rebuilt), the weighting module a Level in its own
DeepSpeed engine, and the hypergradient comes from the same coordinator and
method registry as `scalemlo.Engine` (``Engine.step_level``).

Gradient accumulation is right for both levels: the weights stay fixed over
an optimizer step's micro-batches (they only change between steps), and the
hypergradient differentiates the mean over those same micro-batches.

By default (``--shared_forward``, on for the methods declared able to share it,
``Method.shared_forward``) the meta step shares the model's forward
(`scalemlo.hypergrad.shared_forward`): it is taken at the start of the
optimizer step after the one that made it due, between the forward of that
step's first micro-batch and its backward, on that micro-batch (7 forward
units instead of 8, and exact about the weights' held inputs); the weights of
the whole step then come from the new weighting parameters. The point it
differentiates at is the same (the parameters after the due step); a meta step
due after the last optimizer step is not taken.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import BatchEncoding, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

from scalemlo import checkpoint as scalemlo_checkpoint
from scalemlo import upstream
from scalemlo.backend import (
    DeepSpeedBackend,
    LastStep,
    TorchBackend,
    deepspeed_config_for,
    scale_fp16_zero0_loss,
    zero_stage_of,
)
from scalemlo.config import EngineConfig, LevelConfig
from scalemlo.distributed import ensure_distributed, is_main_process, rank, world_size
from scalemlo.engine import Engine
from scalemlo.hf.adapters import with_peft
from scalemlo.hf.arguments import ReweightingArguments
from scalemlo.hf.data import (
    check_batch,
    check_example_ids,
    is_table,
    prepare_meta_set,
    prepare_training_set,
    scheme_arguments,
    source_mapping,
)
from scalemlo.hf.evaluation import TokenMeanEvaluation, token_mean_loss
from scalemlo.hf.exports import WeightTable, write_weights
from scalemlo.hf.losses import counted_targets, per_example_causal_lm_loss
from scalemlo.hf.model_card import ModelCards
from scalemlo.hf.reweighting import CollapseMonitor, ExampleWeights, Reweighter, build_reweighter, weight_stats
from scalemlo.hf.selection import SELECTION_FLOOR, Selector, with_floor
from scalemlo.hf.state import isolate, one_process_view, reset_trainer_state  # noqa: F401 (re-exported)
from scalemlo.hypergrad.shared_forward import SharedForward, step_inside
from scalemlo.level import FED, Level, frozen
from scalemlo.methods import METHODS, Method, get_method

log = logging.getLogger(__name__)

SCALEMLO_DIR = "scalemlo"  # inside checkpoint-STEP: the meta level, data positions, method state, RNGs
# inside checkpoint-STEP: the model's last step, for a method that reads it (Method.reads_last_step)
LAST_STEP = "last_step.rank{rank}.pt"
# the same record in checkpoints that name it after sama: read where LAST_STEP is absent, so they resume
LAST_STEP_SAMA_NAME = "sama_last_step.rank{rank}.pt"
REFERENCE_ROWS = 1024  # ExampleScorer(centre="meta"): the meta rows whose scores set the centre
# What transformers' collators (DataCollatorWithPadding, DataCollatorForLanguageModeling) batch into; a checkpoint
# holds the last steps' batches (for an exact resume), which loading allows besides tensors and plain data.
BATCH_TYPES = [BatchEncoding]


def per_example_losses(module: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example causal-LM losses [B] (float32) and their token counts [B] for a tokenized batch."""
    logits = module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return per_example_causal_lm_loss(logits, batch["labels"], batch.get("attention_mask"))


class _Model(Level):
    """The model the Trainer fine-tunes, a reweighted level: its objective is sum_i w_i l_i / n over the
    n examples with a counted target (the weighting's inputs held: ``Level.held``, as in compute_loss)."""

    def per_example_losses(self, batch):
        return per_example_losses(self.module, batch)[0]

    def example_weights(self, batch, losses):
        return valid_weights(self.uppers["meta"].module.weights(losses, batch), batch)


def valid_examples(batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """[B] bool: the examples with at least one counted target."""
    return counted_targets(batch["labels"].to(device), batch.get("attention_mask")).any(dim=1)


def valid_weights(weights: torch.Tensor, batch: Mapping[str, Any], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Weights that make mean_i w_i l_i the mean over the examples with a counted target.

    The other examples have loss 0, and get weight 0.

    Args:
        weights: [B] the examples' weights.
        batch: the tokenized batch (its ``labels`` and ``attention_mask`` say which targets count).
        valid: `valid_examples` of the batch, if already at hand.
    """
    valid = valid_examples(batch, weights.device) if valid is None else valid
    return weights * valid * (len(valid) / valid.sum().clamp_min(1))


class _Meta(Level):
    """The weighting model: its objective is the model's token-level loss on the clean meta set."""

    def training_step(self, batch):
        model = self.lowers["model"].module
        # The meta DataLoader's batches are on the CPU; the Trainer's own inputs reach the model's device
        # through Trainer._prepare_inputs, these through this move (a no-op on the CPU).
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        losses, counts = per_example_losses(model, batch)
        return (losses * counts).sum() / counts.sum().clamp_min(1)


class _Schedule(TrainerCallback):
    """Runs the scalemlo side at the Trainer's step boundaries."""

    def __init__(self, trainer: ReweightingTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._scored = None
        self.trainer._start_mlo()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._scored = None  # load_best_model_at_end may have changed the model at this step

    def on_step_begin(self, args, state, control, **kwargs):
        # the lrs the coming step uses (shared: the methods read the coming lrs; a method reading the last
        # step: its pre-step hook records the step when the step is taken, so a step skipped for an fp16
        # overflow records nothing)
        if not self.trainer._shared and not self.trainer._method.reads_last_step:
            self.trainer._model_level.backend.record_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._maybe_meta_step()


class ReweightingTrainer(ModelCards, TokenMeanEvaluation):
    """A ``transformers.Trainer`` that learns how to weight its training data (see the module docstring).

    Evaluation (``evaluate()``, ``--eval_strategy``, ``load_best_model_at_end``, ``predict()``) reports the
    unweighted token-mean loss and its perplexity, whatever the weighting
    (`scalemlo.hf.evaluation`). ``load_best_model_at_end`` returns the model to the best checkpoint, as
    ``Trainer`` does; the weighting model stays as it ended (``export_weights`` and ``score`` give the final
    weighting; the best checkpoint's own is in its ``weights.json``). ``save_model`` writes a model card beside
    the model (`scalemlo.hf.model_card`).

    Args:
        meta_dataset: the clean meta set (tokenized like the training set:
            ``input_ids``, ``attention_mask``, ``labels``).
        reweighter: a `scalemlo.hf.reweighting.Reweighter`; default
            built from ``args.reweighting`` (``reweighter_kwargs`` passed on).
        reweighter_kwargs: the scheme's arguments; those it needs and lacks come from the training set
            (``source``: the names of a string ``source`` column, or the number of indices; ``example``: the
            number of rows).
        example_names: the training examples' names, by row (for the exports; default: a string ``id``
            column's values, else the row numbers).
        source_names: the names of the indices of an integer ``source`` column (default: the reweighter's).
        model_card_metrics: held-out results for the model card ``save_model`` writes (name -> value, e.g.
            ``{"heldout_loss": 2.31, "heldout_loss_uniform": 2.40}``); also settable later as the attribute.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``): the model is wrapped by ``peft.get_peft_model``
            and only the adapter trains, as in TRL's trainers (``--use_peft`` builds one from the ``lora_*``
            flags; `scalemlo.hf.adapters`).

    Every other argument is ``transformers.Trainer``'s.

    The training set (a ``datasets.Dataset``) needs no reweighting columns of its own: the Trainer numbers
    its rows in an ``id`` column where it has none, maps a string ``source`` column to indices, drops text
    columns from it and the meta set, and collates one batch of each at construction
    (`scalemlo.hf.data`).
    """

    def __init__(
        self,
        *args,
        meta_dataset=None,
        reweighter: Reweighter | None = None,
        reweighter_kwargs: dict | None = None,
        example_names=None,
        source_names=None,
        model_card_metrics: Mapping[str, float] | None = None,
        peft_config=None,
        **kwargs,
    ):
        upstream.require("transformers")  # the private Trainer hooks it overrides, before anything is built
        upstream.require("accelerate")
        args, kwargs = with_peft(args, kwargs, peft_config)
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ReweightingArguments):
            raise ValueError("ReweightingTrainer needs ReweightingArguments (TrainingArguments plus the meta fields)")
        if meta_dataset is None or len(meta_dataset) == 0:
            raise ValueError("ReweightingTrainer needs a meta_dataset: a small clean set the weights are judged on")
        self._check_level_configs()
        train = self.train_dataset
        if reweighter is None:
            if train is not None:
                reweighter_kwargs = scheme_arguments(self.args.reweighting, train, reweighter_kwargs, source_names)
            reweighter = build_reweighter(self.args.reweighting, **(reweighter_kwargs or {}))
        self.reweighter = reweighter
        self._source_mapping = source_mapping(self.reweighter, train, source_names)  # a string source column's
        prepared = prepare_training_set(train, self._source_mapping, example_names, source_names)
        self.user_train_dataset = train  # as given: the weighted dataset export keeps its text columns
        self.train_dataset = prepared.dataset
        self.meta_dataset = prepare_meta_set(meta_dataset, self._source_mapping)
        if getattr(self.reweighter, "needs_reference", False):  # a scorer centred on the meta set's scores
            rows = [self.meta_dataset[i] for i in range(min(len(self.meta_dataset), REFERENCE_ROWS))]
            self.reweighter.set_reference(self.data_collator(rows))
        self.args.remove_unused_columns = False  # the reweighter reads columns the model does not (source, id)
        self.model_accepts_loss_kwargs = (
            False  # our loss is a mean per micro-batch: the Trainer divides by accumulation
        )
        self.add_callback(_Schedule(self))
        self.mlo: Engine | None = None
        self._resume_dir: Path | None = None
        self._group_index: list[int] | None = None
        self._meta_logs: dict[str, float] = {}
        self._shared = self.args.meta_level_config().shared_forward
        self._meta_due = False  # shared forward: a meta step waits for the next optimizer step's forward
        self._weight_sums: dict[str, float] = {}
        self._weight_counts: dict[str, int] = {}  # per key: a source's mean counts the batches holding it
        self._collapse = CollapseMonitor(raw_epsilon=1e-6)
        self._source_names = prepared.source_names or getattr(self.reweighter, "names", None)
        self.weight_table = WeightTable(prepared.example_names, self._source_names)
        if self.args.selection_pool > 1:
            if self.reweighter.reads_losses:
                raise ValueError(
                    f"--selection_pool {self.args.selection_pool} draws each batch by the weights before the model's "
                    f"forward, but {type(self.reweighter).__name__} weighs examples by their losses; use a scheme that "
                    "does not read them (reweighting scorer with features ngrams, example or source) or "
                    "--selection_pool 1"
                )
            self.reweighter.sampled = True
        self._selector = None
        if self.args.selection_pool > 1 and self.train_dataset is not None:
            self._selector = Selector(self.args.selection_schedule, len(self.train_dataset))
            if self.args.selection_schedule == "balanced" and is_table(self.train_dataset):
                ids = self.train_dataset["id"]
                if len(ids) and (min(ids) < 0 or max(ids) >= len(ids)):
                    raise ValueError(
                        "--selection_schedule balanced keeps one count per training row, indexed by the 'id' "
                        f"column, which must number the rows 0..{len(ids) - 1} (it holds {min(ids)}..{max(ids)}); "
                        "drop the column (the trainer numbers the rows), pass names as example_names, or use "
                        "--selection_schedule random"
                    )
        if self.args.save_weighted_dataset != "no" and not is_table(train):
            raise ValueError(
                f"--save_weighted_dataset {self.args.save_weighted_dataset} writes a datasets.Dataset, but the "
                f"training set is a {type(train).__name__}; pass a datasets.Dataset or --save_weighted_dataset no"
            )
        self.model_card_metrics: dict[str, float] = dict(model_card_metrics or {})
        self._scored: tuple[tuple[int, int], torch.Tensor] | None = None  # (step, meta steps), score() then
        self._check_data(meta_dataset)

    def create_accelerator_and_postprocess(self) -> None:
        """Build the Trainer's accelerator after an earlier Trainer's process-wide state is forgotten.

        A one-process run gets one without DDP (`scalemlo.hf.state`).
        """
        with one_process_view(self.args.deepspeed):
            isolate(self.args)
            super().create_accelerator_and_postprocess()

    # ---- checks before anything runs ------------------------------------------------------------
    def _check_data(self, meta_dataset) -> None:
        """One training batch and one meta batch through the data collator (and the training batch through the
        weighting), so a set that cannot train fails here with its columns named, not at the first (meta) step."""
        if isinstance(self.reweighter, ExampleWeights) and self.train_dataset is not None:
            check_example_ids(self.train_dataset, self.reweighter.logits.numel())
        if self.train_dataset is not None:
            size = self.args.per_device_train_batch_size * self.args.selection_pool
            check_batch(
                "train_dataset",
                self.train_dataset,
                self.data_collator,
                size,
                self.reweighter,
                getattr(self.user_train_dataset, "column_names", None),
            )
        check_batch(
            "meta_dataset",
            self.meta_dataset,
            self.data_collator,
            self.args.per_device_meta_batch_size,
            columns=getattr(meta_dataset, "column_names", None),
        )

    def _check_level_configs(self) -> None:
        """The two levels' settings must agree: refused here, before any engine is built or any step runs."""
        args = self.args
        model_cfg = args.hf_deepspeed_config.config if args.deepspeed and args.hf_deepspeed_config else {}
        if not model_cfg and self.is_deepspeed_enabled:  # accelerate launch with a DEEPSPEED config: its plugin's
            model_cfg = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
        if args.fp16 and not args.deepspeed and not (torch.cuda.is_available() and not args.use_cpu):
            log.warning(
                "--fp16 without --deepspeed on a CPU: Accelerate trains the model in float32 there (torch's fp16 "
                "autocast and GradScaler are for GPUs); use --bf16 for mixed precision on a CPU"
            )
        stage = model_cfg.get("zero_optimization", {}).get("stage", 0)
        method = self._method
        if method.reads_last_step and stage != 0:
            # the methods for a model at this stage, a Trainer's model being too large for a dense Hessian
            others = [
                m.name
                for m in METHODS.values()
                if stage in m.lower_zero_stages(args.second_order) and not m.dense_hessian
            ]
            raise ValueError(
                f"hypergradient_method={method.name!r} needs the model's optimizer state and last gradients per "
                f"parameter, which ZeRO-{stage} keeps in flat partitions; run the model at ZeRO-0 (or without "
                f"--deepspeed or accelerate's DeepSpeed plugin), or use {', '.join(others)}"
            )
        if method.reads_last_step and "optimizer" in model_cfg:
            raise ValueError(
                f"hypergradient_method={method.name!r} reads torch's Adam/AdamW/SGD state; the --deepspeed config "
                f'builds DeepSpeed\'s own optimizer ({model_cfg["optimizer"].get("type")!r}): remove its "optimizer" '
                "block (the Trainer then builds torch's, e.g. --optim adamw_torch)"
            )
        if args.meta_deepspeed is None:
            return
        meta = args.meta_level_config()
        raw = meta.resolved_deepspeed_config()
        cfg = deepspeed_config_for(meta, "meta")  # unknown keys, accumulation, clipping, batch sizes, precision
        for precision in ("bf16", "fp16"):
            if cfg.get(precision, {}).get("enabled") is True:
                raise ValueError(
                    f"--meta_deepspeed {args.meta_deepspeed} runs the weighting model in {precision}, which the "
                    f"Trainer does not support yet (scalemlo.Engine does); keep the weighting model in fp32 (set "
                    f"{precision}.enabled false): it is small"
                )
        if zero_stage_of(cfg, "meta") == 3:
            raise ValueError(
                f"--meta_deepspeed {args.meta_deepspeed} uses ZeRO-3, but the weighting model steps on "
                "hypergradients, which ZeRO-3 cannot take; use stage 0-2 for it (the model may use ZeRO-3)"
            )
        micro = raw.get("train_micro_batch_size_per_gpu", "auto")
        if micro != "auto" and micro != args.per_device_meta_batch_size:
            raise ValueError(
                f"--meta_deepspeed {args.meta_deepspeed} has train_micro_batch_size_per_gpu={micro} but "
                f'--per_device_meta_batch_size is {args.per_device_meta_batch_size}; make them agree or use "auto"'
            )

    def _check_output_dir(self, resuming: bool) -> None:
        out = Path(self.args.output_dir)
        others = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
        if others and not self.args.overwrite_output_dir and not resuming:
            raise ValueError(
                f"output_dir {out} holds another run ({others[-1].name}); pass --overwrite_output_dir to replace it "
                "or --resume_from_checkpoint to continue it"
            )

    # ---- the loss the Trainer trains on -------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted loss; the weighting module is held fixed (its step comes from the hypergradient).

        With a shared forward and a meta step due, the meta step is taken here, between this
        micro-batch's forward and the weights that multiply its losses. A model in eval mode gets the
        unweighted token-mean loss (and its logits as the outputs), as evaluation reports it.
        """
        if not model.training:
            sums, counts, logits = token_mean_loss(model, inputs)
            loss = (sums.sum() / counts.sum().clamp_min(1)).float()
            return (loss, {"logits": logits}) if return_outputs else loss
        losses = None
        if self._meta_due:
            self._meta_due = False
            losses_of = lambda batch: per_example_losses(model, batch)[0]  # noqa: E731
            levels = list(self.mlo.levels.values())
            losses = step_inside(self._model_level, inputs, self._meta_step, levels, losses_of=losses_of)
        with frozen([self._meta_level]):
            if losses is None:
                losses = per_example_losses(model, inputs)[0]
            weights = self.reweighter.weights(losses.detach(), inputs)
        valid = valid_examples(inputs, weights.device)
        loss = (valid_weights(weights, inputs, valid) * losses).mean()
        scale_fp16_zero0_loss(self.model_wrapped, loss)  # DeepSpeed 0.19 leaves an fp16 ZeRO-0 loss unscaled
        if not self.reweighter.sampled:  # a drawn batch's weights are tracked over its candidates (_select)
            sources = inputs.get("source")  # the statistics cover the rows that trained, sources and weights alike
            if sources is not None:
                sources = torch.as_tensor(sources)
                sources = sources[valid.to(sources.device)]
            self._track_weights(weights.detach()[valid], sources)
            self.weight_table.update(inputs.get("id"), weights.detach(), inputs.get("source"))
        return (loss, None) if return_outputs else loss

    def get_train_dataloader(self):
        """The Trainer's training DataLoader; with ``selection_pool`` k its batches are the k x batch candidates."""
        pool = self.args.selection_pool
        if pool == 1:
            return super().get_train_dataloader()
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * pool,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _select(self, candidates: Mapping[str, Any]) -> dict[str, Any]:
        """``per_device_train_batch_size`` of the candidates, chosen by the current weights plus the
        ``--selection_floor`` (`scalemlo.hf.selection`); padding beyond the chosen rows' longest is cut.

        The draw is seeded by the run's seed, the step and the candidates, so a resumed run draws the same."""
        size = self.args.per_device_train_batch_size
        rows = len(candidates["input_ids"])
        if rows <= size:
            return dict(candidates)
        with torch.no_grad(), frozen([self._meta_level]):
            raw = self.reweighter.raw_weights(None, candidates).detach().float().cpu()
        normalised = raw / raw.mean().clamp_min(self.reweighter.eps)
        self._track_weights(normalised, candidates.get("source"))
        self.weight_table.update(candidates.get("id"), normalised, candidates.get("source"))
        key = (self.args.seed, self.state.global_step, int(torch.as_tensor(candidates["input_ids"]).sum()))
        generator = torch.Generator().manual_seed(hash(key) % 2**62)
        drawn, added = with_floor(raw, self.args.selection_floor)
        chosen = self._selector.choose(drawn, candidates.get("id"), size, generator)
        batch = {
            k: v[chosen.to(v.device)] if isinstance(v, torch.Tensor) and len(v) == rows else v
            for k, v in candidates.items()
        }
        if self.args.selection_floor > 0:
            batch[SELECTION_FLOOR] = added.expand(size).clone().to(batch["input_ids"].device)
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            width = int(torch.nonzero(mask.any(0)).max()) + 1 if bool(mask.any()) else mask.shape[1]
            batch = {
                k: v[:, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == mask.shape else v
                for k, v in batch.items()
            }
        return batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.selection_pool > 1:
            inputs = self._select(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._model_level.fed_micro_step(inputs, stepped=self.accelerator.sync_gradients)
        return loss

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:  # accelerate's placeholder: the DeepSpeed config's "optimizer" block builds it later
            self._group_index = None
            return optimizer
        group_of = {id(p): i for i, group in enumerate(groups) for p in group["params"]}
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._group_index = [group_of.get(id(p), 0) for p in params]
        return optimizer

    # ---- the scalemlo side ----------------------------------------------------------------------------
    @property
    def _method(self) -> Method:
        """The hypergradient method and what it needs (`scalemlo.methods`)."""
        return get_method(self.args.hypergradient_method)

    @property
    def _model_level(self) -> _Model:
        return self.mlo.levels["model"]

    @property
    def _meta_level(self) -> _Meta:
        return self.mlo.levels["meta"]

    def _start_mlo(self) -> None:
        """Build the two-level program around the Trainer's engine (at train begin, after DeepSpeed's init)."""
        ensure_distributed()
        args = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        group_index = self._group_index or [0] * len(params)
        model_level = _Model("model", self.model, None, FED, config=LevelConfig())
        if self.is_deepspeed_enabled:
            model_level.backend = DeepSpeedBackend.adopt(self.model_wrapped, params, group_index)
        else:
            # the torch optimizer under accelerate's wrapper (its state and param_groups are what methods read)
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            model_level.backend = TorchBackend.adopt(self.model, params, optimizer, group_index)
        meta_level = _Meta(
            "meta",
            self.reweighter,
            self._meta_optimizer_factory(),
            self._meta_dataloader(),
            config=args.meta_level_config(),
        )
        config = EngineConfig(max_steps=0, log_every=0, progress_bar=False, nonfinite=args.nonfinite)
        self.mlo = Engine([model_level, meta_level], {"meta": ["model"]}, config)
        if self._method.reads_last_step:
            self._keep_step_gradients(model_level.backend, self._method.name)
        if self._resume_dir is not None:
            with scalemlo_checkpoint.allowing(BATCH_TYPES):
                scalemlo_checkpoint.load(self.mlo, self._resume_dir / SCALEMLO_DIR, levels=["meta"])
            if self._selector is not None:
                self._selector.load(self._resume_dir)
            # a meta step made due by the checkpoint's step is taken in the step after it
            self._meta_due = self._shared and self._meta_step_due_after(self.state.global_step)
            if self._meta_due and self._method.reads_last_step:
                self._load_last_step(self._resume_dir)

    @staticmethod
    def _keep_step_gradients(backend, method: str) -> None:
        """Record the model's optimizer steps for a method that reads the last step (``Method.reads_last_step``).

        Such a method reads the gradients of the model's last optimizer step, which the Trainer's step (DeepSpeed's
        included) clears: a pre-step hook on the torch optimizer records the step (``backend.last_step``: its lrs,
        and a copy of each gradient, one parameter-sized buffer). A step skipped for an fp16 overflow is not
        recorded, so the record stays the last step taken, which the optimizer state matches: DeepSpeed's scaler
        and torch's GradScaler do not call the optimizer then, except a fused one (``adamw_torch_fused``, the
        Trainer's default where torch has it), which GradScaler calls with ``found_inf`` set and which skips the
        update itself (its gradients are then still scaled by ``grad_scale`` unless they were unscaled for
        clipping).

        Args:
            backend: the model level's backend.
            method: the method's name (named in the error).

        Raises:
            ValueError: the model's optimizer is not torch's Adam, AdamW or SGD.
        """
        optimizer = backend.torch_optimizer
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
            raise ValueError(
                f"hypergradient_method={method!r} supports the model's optimizer Adam, AdamW or SGD, not "
                f"{type(optimizer).__name__}; choose --optim adamw_torch (or sgd) or another method"
            )

        def keep(_optimizer, _args, _kwargs) -> None:
            found_inf = getattr(_optimizer, "found_inf", None)
            if found_inf is not None and bool(found_inf):
                return  # a fused optimizer under GradScaler, told of an overflow: it skips this step
            backend.record_step()
            # the gradients the torch optimizer steps on (clipped; under DeepSpeed's bf16 ZeRO-0 optimizer
            # those of its float32 copies)
            stepped = [backend.stepped_tensor(p) for p in backend.params]
            grads = [torch.zeros_like(q) if q.grad is None else q.grad.detach().clone() for q in stepped]
            scale = getattr(_optimizer, "grad_scale", None)  # GradScaler's, for a fused optimizer to unscale
            if scale is not None:
                grads = [g.div_(scale.to(g.dtype)) for g in grads]
            backend.last_step.grads = grads

        optimizer.register_step_pre_hook(keep)

    def _save_last_step(self, directory: Path) -> None:
        """A meta step due but not yet taken (shared forward), by a method that reads the model's last step,
        reads its gradients, which no checkpoint of the Trainer holds; saved beside it (each rank its own) so
        a resume takes the same meta step."""
        last = self._model_level.backend.last_step
        if last is None or last.grads is None:
            return
        record = {"lrs": last.lrs, "fresh": last.fresh, "grads": [g.detach().cpu() for g in last.grads]}
        torch.save(record, directory / LAST_STEP.format(rank=rank()))

    def _load_last_step(self, checkpoint: Path) -> None:
        path = checkpoint / LAST_STEP.format(rank=rank())
        if not path.is_file():
            path = checkpoint / LAST_STEP_SAMA_NAME.format(rank=rank())
        if not path.is_file():
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint}: a meta step of method {self._method.name!r} is due at "
                f"step {self.state.global_step} and reads the model's last step, whose record "
                f"{LAST_STEP.format(rank=rank())} the checkpoint lacks"
            )
        record = scalemlo_checkpoint.read_plain(path, map_location="cpu")
        backend = self._model_level.backend
        grads = [g.to(backend.stepped_tensor(p).device) for g, p in zip(record["grads"], backend.params)]
        backend.last_step = LastStep(lrs=record["lrs"], fresh=record["fresh"], grads=grads)

    def _meta_optimizer_factory(self):
        args = self.args
        kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        options = {"lr": args.meta_learning_rate, "weight_decay": args.meta_weight_decay}
        if args.meta_optimizer in ("adam", "adamw"):
            options["betas"] = (args.meta_adam_beta1, args.meta_adam_beta2)
        return lambda params: kinds[args.meta_optimizer](params, **options)

    def _meta_dataloader(self) -> torch.utils.data.DataLoader:
        from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

        args, n = self.args, world_size()
        if n > 1:
            sampler = DistributedSampler(self.meta_dataset, shuffle=True, seed=args.seed, drop_last=True)
        else:
            sampler = RandomSampler(self.meta_dataset, generator=torch.Generator().manual_seed(args.seed))
        return DataLoader(
            self.meta_dataset,
            batch_size=args.per_device_meta_batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            drop_last=True,
        )

    def _meta_step_due_after(self, step: int) -> bool:
        args = self.args
        if step > args.meta_stop_ratio * self.state.max_steps:
            return False  # --meta_stop_ratio: the weights stay as learned for the rest of the run
        return step > args.meta_warmup_steps and not step % args.unroll_steps

    def _maybe_meta_step(self) -> None:
        if not self._meta_step_due_after(self.state.global_step):
            return
        if self._shared:
            self._meta_due = True  # taken inside the next step, on its forward (compute_loss)
        else:
            self._meta_step()

    def _meta_step(self, shared: SharedForward | None = None) -> None:
        metrics = self.mlo.step_level("meta", shared=shared)
        self._meta_logs = {f"meta/{k.split('/', 1)[1]}" if k.startswith("meta/") else k: v for k, v in metrics.items()}

    # ---- logging ----------------------------------------------------------------------------------
    def _track_weights(self, weights: torch.Tensor, sources) -> None:
        raw = getattr(self.reweighter, "last_raw", None)
        stats = weight_stats(weights, sources, self._source_names, raw=raw.detach() if raw is not None else None)
        stats["weight/collapsed"] = float(self._collapse.update(stats))
        for key, value in stats.items():
            self._weight_sums[key] = self._weight_sums.get(key, 0.0) + float(value)
            self._weight_counts[key] = self._weight_counts.get(key, 0) + 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._weight_counts:
            logs.update({k: v / self._weight_counts[k] for k, v in self._weight_sums.items()})
            self._weight_sums, self._weight_counts = {}, {}
        logs.update(self._meta_logs)
        self._meta_logs = {}
        super().log(logs, *args, **kwargs)

    # ---- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint plus the scalemlo side, made visible by one rename when complete."""
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f".staging-{name}"
        if is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        scalemlo_checkpoint.barrier()
        self._get_output_dir = lambda trial=None: str(staging)  # the Trainer writes staging/checkpoint-STEP
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        inner = staging / name
        best = self.state.best_model_checkpoint
        if best and str(staging) in best:  # the Trainer named the staging path: name the final one, on every rank
            self.state.best_model_checkpoint = best.replace(str(staging), str(run_dir))
            if is_main_process():  # and in the checkpoint's own state, which a resumed run reads
                self.state.save_to_json(str(inner / TRAINER_STATE_NAME))
        scalemlo_checkpoint.save(self.mlo, inner / SCALEMLO_DIR, levels=["meta"], write_latest=False)
        if self._meta_due and self._method.reads_last_step:
            self._save_last_step(inner)
        self.export_weights(inner)  # the final weights as of this step, of every training example
        if self._selector is not None:
            self._selector.save(inner)
        if is_main_process():
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(inner, final)
            shutil.rmtree(staging, ignore_errors=True)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        scalemlo_checkpoint.barrier()

    def export_weights(self, directory: str | os.PathLike | None = None, last_trained: bool = False) -> torch.Tensor:
        """Write the final weighting model's weight of every training example and the per-source means.

        The weights are mean 1 over the training set (`scalemlo.hf.exports`). Every rank must call it
        (a ZeRO-3 model's forward is collective); rank 0 writes.

        Args:
            directory: where to write them (default output_dir).
            last_trained: also write ``last_trained_weights.csv`` (the weight each example last trained with).

        Returns:
            float32 [N] the weights, by row of the training set.
        """
        weights = self._final_weights()
        table = self.weight_table
        if last_trained and world_size() > 1:
            import torch.distributed as dist

            tables = [None] * world_size()
            dist.all_gather_object(tables, table)
            table = tables[0].merged(tables[1:])
        if is_main_process():
            out = Path(directory or self.args.output_dir)
            train = self.train_dataset
            columns = getattr(train, "column_names", [])
            ids = train["id"] if "id" in columns else list(range(len(weights)))
            names = [table.name(int(i)) for i in ids]
            sources = train["source"] if "source" in columns else None
            softmax = self.reweighter.source_weights() if hasattr(self.reweighter, "source_weights") else None
            if softmax is not None and self._source_names is not None and len(softmax) == len(self._source_names):
                softmax = dict(zip(self._source_names, softmax.values()))  # named as the data names its indices
            write_weights(out, weights, names, sources, self._source_names, softmax)
            if last_trained:
                table.write(out)
        return weights

    def _final_weights(self) -> torch.Tensor:
        """``score()`` of the training set, computed once per (optimizer step, meta step): a checkpoint's model
        card and its weight exports share it. Every rank must call it (a ZeRO-3 model's forward is collective)."""
        key = self._score_key()
        if self._scored is None or self._scored[0] != key:
            self._scored = (key, self.score())
        return self._scored[1]

    def _score_key(self) -> tuple[int, int]:
        return self.state.global_step, self._meta_level.steps if self.mlo is not None else 0

    def save_weighted_dataset(self, directory: str | os.PathLike | None = None, weights=None):
        """Save the training set as given (text columns kept) with its learned weights.

        As ``--save_weighted_dataset`` says (`scalemlo.hf.exports.weighted_dataset`), saved with
        ``save_to_disk`` on rank 0. Every rank must call it.

        Args:
            directory: where to save it (default output_dir/weighted_dataset).
            weights: the training set's weights, by row (default: `score` of the training set).

        Returns:
            The dataset.
        """
        from scalemlo.hf.exports import weighted_dataset

        mode = self.args.save_weighted_dataset if self.args.save_weighted_dataset != "no" else "column"
        weights = self.score() if weights is None else weights
        out = weighted_dataset(
            self.user_train_dataset, weights, mode, self.args.weighted_dataset_threshold, self.args.seed
        )
        if is_main_process():
            out.save_to_disk(str(directory or Path(self.args.output_dir) / "weighted_dataset"))
        return out

    def score(self, dataset=None, batch_size: int | None = None) -> torch.Tensor:
        """The weight the current weighting model gives every row of ``dataset``: float32 [N], mean 1 over it.

        Works for any tokenized dataset with the columns the scheme reads (``input_ids`` for the scorer,
        ``id`` / ``source`` for the tables), including data the run never trained on (the scorer); add the
        result as a column with `scalemlo.hf.exports.add_weight_column` to filter on it. Its text
        columns are dropped and a string ``source`` column mapped as the training set's. The random state
        is left as it was (a checkpoint's export must not move a resumed run's).

        Args:
            dataset: rows the Trainer's data collator takes (``input_ids``, ``attention_mask``, ``labels``, ...);
                default the training set.
            batch_size: rows per forward (default ``per_device_eval_batch_size``).

        Returns:
            float32 [N] the weights, mean 1 over the dataset.
        """
        from scalemlo.hf.scorer import dataset_weights

        dataset = self.train_dataset if dataset is None else prepare_meta_set(dataset, self._source_mapping)
        with torch.random.fork_rng(devices=[]):
            return dataset_weights(
                self.reweighter,
                self.model,
                dataset,
                self.data_collator,
                batch_size or self.args.per_device_eval_batch_size,
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``Trainer.train``, resuming only from a complete checkpoint of this trainer.

        Args:
            resume_from_checkpoint: a path, or True for the latest in output_dir (default
                ``args.resume_from_checkpoint``); it must be a complete checkpoint of this trainer, checked
                before anything is loaded.
            kwargs: passed on to ``Trainer.train``.

        Returns:
            What ``Trainer.train`` returns.

        Raises:
            ValueError: no checkpoint to resume from, or not a complete checkpoint of a ``ReweightingTrainer``
                run.
        """
        resume_from_checkpoint = resume_from_checkpoint or self.args.resume_from_checkpoint or None
        if resume_from_checkpoint is True or resume_from_checkpoint == "True":
            from transformers.trainer_utils import get_last_checkpoint

            found = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if found is None:
                raise ValueError(f"--resume_from_checkpoint: no checkpoint-* in {self.args.output_dir} to resume from")
            resume_from_checkpoint = found
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint)
            try:
                resolved = scalemlo_checkpoint.resolve(path / SCALEMLO_DIR)
            except scalemlo_checkpoint.CheckpointError as exc:
                raise ValueError(
                    f"--resume_from_checkpoint {path} is not a complete checkpoint of a ReweightingTrainer run ({exc})"
                ) from None
            saved_ranks = scalemlo_checkpoint.saved_world_size(resolved)
            if saved_ranks != world_size():
                # refused here, before DeepSpeed or transformers load anything (a ZeRO-partitioned optimizer
                # cannot be loaded on another number of ranks; nor can the per-rank data and weighting state)
                raise ValueError(
                    f"--resume_from_checkpoint {path} was saved by a run on {saved_ranks} rank(s); this run has "
                    f"{world_size()}. Resume it with the same number of ranks (deepspeed --num_gpus {saved_ranks}, "
                    f"torchrun --nproc_per_node {saved_ranks})."
                )
            # DeepSpeed reads the model's engine state with weights_only=False; transformers reads the rest
            # (optimizer.pt, scheduler.pt, rng_state.pth) with weights_only=True
            with scalemlo_checkpoint.allowing(BATCH_TYPES):
                scalemlo_checkpoint.check_files(path)
            self._resume_dir = path
        self._check_output_dir(resuming=bool(resume_from_checkpoint))
        output = super().train(
            resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None, **kwargs
        )
        if self.args.save_weighted_dataset != "no":
            self.save_weighted_dataset()
        return output
