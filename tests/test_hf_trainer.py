"""ReweightingTrainer: the Trainer's habits kept, both levels' accumulation right, stages agree, exact resume.

A tiny GPT-2 (built from a config) on counting sequences, a quarter of the
training rows replaced by random tokens in their own source; the meta set is
clean. CPU, fp32, one process (the two-rank runs are in test_kill_and_resume's
Trainer configurations).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hf_toy import T, V, collate, rows
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from scalemlo.distributed import ensure_distributed
from scalemlo.hf import ReweightingArguments, ReweightingTrainer, reset_trainer_state
from scalemlo.hf.exports import add_weight_column

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_trainer_state():
    ensure_distributed()  # a one-process group, as a launcher would start (no environment variables set)
    yield
    reset_trainer_state()


def trainer(
    tmp_path,
    deepspeed=None,
    batch=8,
    accumulation=1,
    max_steps=6,
    reweighting="source",
    eval_dataset=None,
    collator=collate,
    **kwargs,
):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=V,
            n_positions=T,
            attn_implementation="eager",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    config = {"save_strategy": "no", **kwargs}
    args = ReweightingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        seed=0,
        meta_learning_rate=0.1,
        per_device_meta_batch_size=8,
        reweighting=reweighting,
        deepspeed=deepspeed,
        logging_steps=1,
        disable_tqdm=True,
        **config,
    )
    extra = {"reweighter_kwargs": {"sources": ["clean", "noisy"]}} if reweighting == "source" else {}
    if reweighting == "example":
        extra = {"reweighter_kwargs": {"n_examples": 64}}
    train, meta = Dataset.from_list(rows(64, 16, 0)), Dataset.from_list(rows(16, 0, 1))
    return ReweightingTrainer(
        model=model,
        args=args,
        train_dataset=train,
        meta_dataset=meta,
        data_collator=collator,
        eval_dataset=eval_dataset,
        **extra,
    )


def parameters(t: ReweightingTrainer) -> torch.Tensor:
    from scalemlo.backend import DeepSpeedBackend

    lm = t._model_level
    if isinstance(lm.backend, DeepSpeedBackend) and lm.backend.partitioned:
        from deepspeed.utils import safe_get_full_fp32_param

        model = [safe_get_full_fp32_param(p) for p in lm.params]
    else:
        model = [p.detach() for p in lm.params]
    return torch.cat([p.reshape(-1).double() for p in model + list(t.reweighter.parameters())])


def ds(stage: int) -> str:
    return str(ROOT / "configs" / "ds" / f"trainer_zero{stage}.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    t = trainer(tmp_path_factory.mktemp("ref"))
    t.train()
    return t


class CountForwards(TrainerCallback):
    def __init__(self, model):
        self.count = 0
        model.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


def test_the_weights_learn_to_trust_the_clean_source(reference):
    alpha = reference.reweighter.source_weights()
    assert alpha["clean"] > 0.55 > alpha["noisy"]  # started at 0.5 each
    # shared forward (the default): the meta step made due by step t is taken inside step t + 1, so
    # the one due after the last step (6) is not taken
    assert reference.args.meta_level_config().shared_forward and reference._meta_level.steps == 5
    logged = [h for h in reference.state.log_history if "meta/hypergrad_norm" in h]
    assert len(logged) == 5 and all(h["weight/source/noisy"] < h["weight/source/clean"] for h in logged[1:])


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_meta_stop_ratio_keeps_the_weights_fixed_after_that_share_of_the_run(tmp_path, shared):
    """--meta_stop_ratio 0.5 of 8 steps: meta steps are due after steps 1-4 only (shared, each is taken
    inside the next step), and the weighting model is the same from then to the end."""

    class Record(TrainerCallback):
        def __init__(self):
            self.alpha = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.alpha[state.global_step] = dict(t.reweighter.source_weights())

    t = trainer(tmp_path, max_steps=8, meta_stop_ratio=0.5, shared_forward=shared)
    record = Record()
    t.add_callback(record)
    t.train()
    assert t._meta_level.steps == 4
    last = 5 if shared else 4  # the step whose end first shows the last meta step's weights
    assert record.alpha[last - 1] != record.alpha[last]
    assert all(record.alpha[step] == record.alpha[last] for step in range(last, 9))


@pytest.mark.parametrize("shared, forwards", [(True, 6 + 5 * 2), (False, 6 + 6 * 4)])
def test_a_shared_meta_step_costs_two_forwards_of_the_model(tmp_path, shared, forwards):
    """6 steps: shared, each meta step adds the meta batch's forward and one moved forward (its training
    forward is the step's own); without, the meta batch's, the held losses' and two moved forwards."""
    t = trainer(tmp_path, shared_forward=shared)
    counter = CountForwards(t.model)
    t.train()
    assert counter.count == forwards


@pytest.fixture(scope="module")
def unshared_reference(tmp_path_factory):
    t = trainer(tmp_path_factory.mktemp("unshared"), shared_forward=False)
    t.train()
    return t


def test_gradient_accumulation_is_right_for_both_levels(tmp_path, unshared_reference):
    """Batches of 8 in one step, or the same 8 in two micro-batches of 4: one trajectory. The weights are
    fixed over a step's micro-batches, and the hypergradient differentiates both of them (so accumulation
    turns the shared forward off by default: it would differentiate the first micro-batch only)."""
    t = trainer(tmp_path, batch=4, accumulation=2)
    assert not t.args.meta_level_config().shared_forward
    t.train()
    a, b = parameters(t), parameters(unshared_reference)
    assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_stages_follow_the_same_trajectory(tmp_path, reference, stage):
    t = trainer(tmp_path, deepspeed=ds(stage))
    t.train()
    a, b = parameters(t), parameters(reference)
    assert float((a - b).norm() / b.norm()) < 1e-5


def test_resume_from_checkpoint_is_exact_and_checkpoints_are_complete(tmp_path):
    # The uninterrupted run in this test: a DeepSpeed Trainer earlier in the same process changes the
    # plain-torch run's last bits (1e-6), so a comparison across tests would not be about the resume.
    uninterrupted = trainer(tmp_path / "uninterrupted")
    uninterrupted.train()
    reference = parameters(uninterrupted)
    reset_trainer_state()

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    run = tmp_path / "run"
    first = trainer(run, save_strategy="steps", save_steps=2, save_total_limit=2)
    first.add_callback(Stop())
    first.train()
    names = sorted(p.name for p in run.iterdir())
    assert "checkpoint-2" in names and "checkpoint-4" in names and not [n for n in names if n.startswith(".")]
    checkpoint = run / "checkpoint-4"
    assert (checkpoint / "scalemlo" / "scalemlo_checkpoint.json").is_file()
    weights = json.loads((checkpoint / "weights.json").read_text())
    assert set(weights["sources"]) == {"clean", "noisy"} and len(weights["examples"]) > 0
    reset_trainer_state()  # a new process, as far as the Trainer's global state goes
    resumed = trainer(run, save_strategy="steps", save_steps=2, save_total_limit=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(parameters(resumed), reference)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_a_sama_run_resumes_bit_for_bit(tmp_path, shared):
    """Stopped after step 4 and resumed from checkpoint-4: the model and the weighting model end bit-identical
    to the uninterrupted run. Shared, the meta step made due by step 4 is taken inside step 5 and reads step
    4's gradients, which the checkpoint keeps beside it (last_step.rank0.pt; a checkpoint that names the record
    sama_last_step.rank0.pt resumes the same); separate, it was taken before the checkpoint was written."""
    kw = {"hypergradient_method": "sama", "shared_forward": shared, "save_strategy": "steps", "save_steps": 2}
    uninterrupted = trainer(tmp_path / "uninterrupted", **kw)
    uninterrupted.train()
    reference = parameters(uninterrupted)
    reset_trainer_state()

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    first = trainer(tmp_path / "run", **kw)
    first.add_callback(Stop())
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "last_step.rank0.pt").is_file() == shared
    runs = [tmp_path / "run"]
    if shared:  # the same checkpoint with the record named after sama
        shutil.copytree(tmp_path / "run", tmp_path / "named_after_sama")
        named = tmp_path / "named_after_sama" / "checkpoint-4"
        (named / "last_step.rank0.pt").rename(named / "sama_last_step.rank0.pt")
        runs.append(tmp_path / "named_after_sama")
    for run in runs:
        reset_trainer_state()
        resumed = trainer(run, **kw)
        resumed.train(resume_from_checkpoint=str(run / "checkpoint-4"))
        assert resumed._meta_level.steps == uninterrupted._meta_level.steps
        assert torch.equal(parameters(resumed), reference)


@pytest.mark.parametrize("deepspeed", [None, "zero0"])
def test_sama_keeps_the_steps_gradients_and_learns_to_trust_the_clean_source(tmp_path, deepspeed):
    """sama reads the gradient each AdamW step used; the Trainer's step (DeepSpeed's too) clears it,
    so a pre-step hook keeps a copy. Checked against AdamW's own first moment: after the step,
    exp_avg = beta1 * exp_avg_before + (1 - beta1) * g for the kept g."""
    t = trainer(tmp_path, deepspeed=ds(0) if deepspeed else None, hypergradient_method="sama")
    before: dict = {}

    class Moments(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            opt = t.mlo.levels["model"].backend._optimizer_for_state
            before.clear()
            before.update({p: opt.state[p]["exp_avg"].clone() for p in t.model.parameters() if p in opt.state})

    t.add_callback(Moments())
    t.train()
    backend = t.mlo.levels["model"].backend
    opt = backend._optimizer_for_state
    beta1 = opt.param_groups[0]["betas"][0]
    assert isinstance(opt, torch.optim.AdamW) and backend.last_step.grads is not None
    for p, g in zip(backend.params, backend.last_step.grads):
        expected = beta1 * before[p] + (1 - beta1) * g
        assert torch.allclose(opt.state[p]["exp_avg"], expected, rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in backend.last_step.grads)
    alpha = t.reweighter.source_weights()
    assert alpha["clean"] > 0.55 > alpha["noisy"]  # started at 0.5 each


def test_weights_are_exported_and_become_a_column(tmp_path, reference):
    weights = reference.export_weights(tmp_path)
    data = json.loads((tmp_path / "weights.json").read_text())
    assert data["source_softmax"] == pytest.approx(reference.reweighter.source_weights())
    assert (tmp_path / "example_weights.csv").read_text().startswith("id,source,weight")
    column = add_weight_column(Dataset.from_list(rows(64, 16, 0)), weights)["scalemlo_weight"]
    noisy = [w for i, w in enumerate(column) if i % 4 == 0]
    clean = [w for i, w in enumerate(column) if i % 4]
    # the final weights of every example, mean 1 over the training set (tests/test_hf_trainer_exports.py)
    assert len(set(noisy)) == len(set(clean)) == 1 and noisy[0] < 1.0 < clean[0]
    assert sum(column) / len(column) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"meta_dataset": None}, "needs a meta_dataset"),
        (
            {"hypergradient_method": "sama", "deepspeed": {"zero_optimization": {"stage": 2}}},
            "sama' needs the model's optimizer state .* ZeRO-2 keeps in flat partitions",
        ),
        (
            {
                "hypergradient_method": "sama",
                "deepspeed": {
                    "zero_optimization": {"stage": 0},
                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                },
            },
            "builds DeepSpeed's own optimizer",
        ),
        ({"hypergradient_method": "darts"}, "method='darts' is not known"),
        ({"meta_optimizer": "lion"}, "--meta_optimizer 'lion' is not known"),
        ({"meta_adam_beta2": 1.0}, r"--meta_adam_beta2 must be in \[0, 1\), got 1.0"),
        ({"meta_stop_ratio": 0.0}, r"--meta_stop_ratio must be in \(0, 1\]"),
        ({"meta_stop_ratio": 1.5}, r"--meta_stop_ratio must be in \(0, 1\]"),
        ({"unroll_steps": 0}, "--unroll_steps must be >= 1"),
        # the two levels' DeepSpeed configs must agree
        ({"meta_deepspeed": {"zero_optimization": {"stage": 3}}}, "uses ZeRO-3, but the weighting model steps on"),
        (
            {"meta_deepspeed": {"train_micro_batch_size_per_gpu": 4}},
            "train_micro_batch_size_per_gpu=4 but --per_device_meta_batch_size is 8",
        ),
        ({"meta_deepspeed": {"gradient_accumulation_steps": 2}}, "gradient_accumulation_steps=2 but"),
        ({"meta_deepspeed": {"zero_optimisation": {"stage": 1}}}, "did you mean 'zero_optimization'"),
        ({"meta_deepspeed": {"bf16": {"enabled": True}}}, "runs the weighting model in bf16, which the Trainer"),
        ({"meta_deepspeed": {"fp16": {"enabled": True}}}, "runs the weighting model in fp16, which the Trainer"),
    ],
)
def test_bad_trainer_input(tmp_path, change, words):
    for key in ("meta_deepspeed", "deepspeed"):
        if isinstance(change.get(key), dict):
            path = tmp_path / f"{key}.json"
            path.write_text(json.dumps(change[key]))
            change = {**change, key: str(path)}
    with pytest.raises(ValueError, match=words):
        if "meta_dataset" in change:
            t = trainer(tmp_path)
            reset_trainer_state()
            ReweightingTrainer(model=t.model, args=t.args, train_dataset=t.train_dataset, meta_dataset=None)
        else:
            trainer(tmp_path, **change)


def test_another_run_in_output_dir_and_a_wrong_resume_path_are_refused(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(ValueError, match="holds another run .*--overwrite_output_dir"):
        trainer(tmp_path).train()
    t = trainer(tmp_path, overwrite_output_dir=True)
    with pytest.raises(ValueError, match="is not a complete checkpoint of a ReweightingTrainer run"):
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))


def test_a_checkpoint_of_another_rank_count_is_refused_before_anything_loads(tmp_path):
    """A checkpoint saved on 2 ranks resumed in 1 process: refused with the fix (the same number of ranks)
    before transformers or DeepSpeed load any of it, so the model is left as built."""
    trainer(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    manifest = checkpoint / "scalemlo" / "scalemlo_checkpoint.json"
    saved = json.loads(manifest.read_text())
    saved["signature"]["world_size"] = 2  # as a 2-rank run writes it
    manifest.write_text(json.dumps(saved))
    reset_trainer_state()
    t = trainer(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    built = [p.detach().clone() for p in t.model.parameters()]
    with pytest.raises(ValueError, match=r"saved by a run on 2 rank\(s\); this run has 1.*--num_gpus 2"):
        t.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(built, t.model.parameters()))


def test_a_deepspeed_config_that_builds_its_own_optimizer_trains(tmp_path):
    """A --deepspeed config with "optimizer" and "scheduler" blocks ("auto" values, as Hugging Face users
    write them): accelerate hands the Trainer a placeholder optimizer and DeepSpeed builds the real one. A
    method that does not read the model's optimizer (finite_difference) trains on it, and the weights learn."""
    config = json.loads(Path(ds(0)).read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    t = trainer(tmp_path / "run", deepspeed=str(path), hypergradient_method="finite_difference")
    t.train()
    assert t._meta_level.steps == 5
    assert t.reweighter.source_weights()["clean"] > 0.5 > t.reweighter.source_weights()["noisy"]


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_meta_optimizer_takes_its_flags(tmp_path, kind):
    """--meta_optimizer, --meta_learning_rate, --meta_weight_decay and the adam betas reach the weighting
    model's optimizer (sgd has no betas)."""
    t = trainer(tmp_path, meta_optimizer=kind, meta_weight_decay=0.2, meta_adam_beta2=0.99)
    optimizer = t._meta_optimizer_factory()([torch.nn.Parameter(torch.zeros(3))])
    reset_trainer_state()
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__ == {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[kind]
    assert (group["lr"], group["weight_decay"]) == (0.1, 0.2)  # the helper sets meta_learning_rate 0.1
    assert group.get("betas") == (None if kind == "sgd" else (0.9, 0.99))
