"""ReweightingTrainer resume at ZeRO-3 on the ranks of a launch: the ``trainer_resume`` cases of zero_suite.py.

Per (method, shared forward, scheme) the same Trainer runs twice with the model at ZeRO-3: uninterrupted, and
stopped after a step drawn at random (seeded by the case's name) then resumed from that step's checkpoint
by a fresh trainer. Both save every ``stop`` steps (ZeRO-3 checkpoints are the slow part here), so they
write the same checkpoints up to the stop. Recorded: whether the model's full fp32
parameters, the weighting model's parameters (on every rank) and the exports written to output_dir at the
end (``export_weights``: ``weights.json``, ``example_weights.csv``, ``source_weights.csv``) are
bit-identical to the uninterrupted run's. A configuration the Trainer refuses (sama at ZeRO 1-3, a shared
forward for a method without one) records the refusal instead. The one-process matrix at ZeRO-0, every
scheme: ``tests/test_hf_resume_matrix.py``.
"""

from __future__ import annotations

import random
import sys
import zlib
from pathlib import Path

import torch

from scalemlo.hf.reweighting import REWEIGHTERS  # every scheme (scalemlo.hf registers the scorer)
from scalemlo.hypergrad import METHODS

ROOT = Path(__file__).resolve().parents[2]
STEPS = 5
# Every method x shared forward on/off with the default scheme (meta_weight_net, which reads the losses), and
# every other scheme with the default method (finite_difference, shared); exact refuses a language model
# (LevelConfig.exact_max_params, which the Trainer leaves at 4096).
CASES = [(method, shared, "meta_weight_net") for method in sorted(set(METHODS) - {"exact"}) for shared in (True, False)]
CASES += [("finite_difference", True, scheme) for scheme in sorted(REWEIGHTERS) if scheme != "meta_weight_net"]
EXPORTS = ("weights.json", "example_weights.csv", "source_weights.csv")


def case_name(method: str, shared: bool, scheme: str) -> str:
    return f"{method}-{'shared' if shared else 'unshared'}-{scheme}"


def stop_step(method: str, shared: bool, scheme: str) -> int:
    """The step after which the interrupted run stops, in 1..STEPS-1 (the same on every rank)."""
    return random.Random(zlib.crc32(case_name(method, shared, scheme).encode())).randint(1, STEPS - 1)


def trainer(output_dir: Path, method: str, shared: bool, scheme: str, save_steps: int, stop: int | None = None):
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, TrainerCallback

    from scalemlo.hf import ReweightingArguments, ReweightingTrainer, reset_trainer_state

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from hf_toy import T, V, collate, rows
    finally:
        sys.path.pop(0)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == stop

    reset_trainer_state()  # each run as in a new process, as far as the Trainer's global state goes
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
    args = ReweightingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        seed=0,
        meta_learning_rate=0.1,
        per_device_meta_batch_size=4,
        reweighting=scheme,
        hypergradient_method=method,
        shared_forward=shared,
        neumann_iterations=2,
        cg_iterations=2,
        deepspeed=str(ROOT / "configs" / "ds" / "trainer_zero3.json"),
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1,
        disable_tqdm=True,
    )
    t = ReweightingTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows(64, True, 0)),
        meta_dataset=Dataset.from_list(rows(16, False, 1)),
        data_collator=collate,
        callbacks=[StopAt()] if stop else None,
    )
    t.remove_callback(PrinterCallback)  # the launch's output stays the suite's records
    return t


def finished(t) -> dict:
    """The model's full fp32 parameters (a collective at ZeRO-3), the weighting model's, the meta steps."""
    from deepspeed.utils import safe_get_full_fp32_param

    lm = t._model_level
    model = [safe_get_full_fp32_param(p).clone() if lm.backend.partitioned else p.detach().clone() for p in lm.params]
    t.export_weights()  # to output_dir; every rank (the scores are a ZeRO-3 forward)
    return {
        "model": model,
        "weights": [p.detach().clone() for p in t.reweighter.parameters()],
        "meta_steps": t._meta_level.steps,
        "partitioned": lm.backend.partitioned,
    }


def on_every_rank(flag: bool) -> bool:
    import torch.distributed as dist

    value = torch.tensor(int(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def resume_record(work: Path, method: str, shared: bool, scheme: str) -> dict:
    """Uninterrupted, stopped and resumed runs of one case; ``refused``: the Trainer's error, if it refused."""
    import torch.distributed as dist

    stop = stop_step(method, shared, scheme)
    record: dict = {"stop_after_step": stop, "steps": STEPS}
    try:
        t = trainer(work / "uninterrupted", method, shared, scheme, save_steps=stop)
    except ValueError as exc:  # the same on every rank: refused at construction, before any collective
        return {**record, "refused": str(exc)}
    initial = [p.detach().clone() for p in t.reweighter.parameters()]
    t.train()
    expected = finished(t)
    first = trainer(work / "run", method, shared, scheme, save_steps=stop, stop=stop)
    first.train()
    stopped_at = first.state.global_step
    resumed = trainer(work / "run", method, shared, scheme, save_steps=stop)
    resumed.train(resume_from_checkpoint=str(work / "run" / f"checkpoint-{stop}"))
    got = finished(resumed)
    dist.barrier()  # rank 0's exports written
    exports_equal = all(
        (work / "run" / name).read_bytes() == (work / "uninterrupted" / name).read_bytes() for name in EXPORTS
    )
    same = lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    return {
        **record,
        "stopped_at": stopped_at,
        "partitioned": expected["partitioned"],
        "meta_steps": [expected["meta_steps"], got["meta_steps"]],
        "weighting_moved": on_every_rank(not same(initial, expected["weights"])),
        "model_equal": on_every_rank(same(got["model"], expected["model"])),
        "weighting_equal": on_every_rank(same(got["weights"], expected["weights"])),
        "exports_equal": on_every_rank(exports_equal),
    }
