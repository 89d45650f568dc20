"""One row of benchmarks/trainer_overhead.py in its own process: train, time the steps, measure peak RSS.

    python benchmarks/trainer_overhead_worker.py --trainer plain --size tiny --steps 12 --result row.json
    python benchmarks/trainer_overhead_worker.py --trainer reweighting --unroll_steps 10 --size 124m --result row.json

A GPT-2 built from a config (no download) is trained for ``--steps`` optimizer
steps on random token ids by ``transformers.Trainer`` (``--trainer plain``) or
``scalemlo.hf.ReweightingTrainer`` (``--trainer reweighting``: Meta-Weight-Net,
finite-difference hypergradient, a meta step every ``--unroll_steps`` steps from
the first), both inside DeepSpeed ZeRO-0 (configs/ds/trainer_zero0.json), one
process, CPU. Writes one JSON object to ``--result``: the wall-clock time at
the end of every optimizer step (after the meta step of that step, if any),
the RSS just before the model is built and the process's peak RSS (KiB).
Threads: torch's (accelerate sets the physical core count unless
``OMP_NUM_THREADS`` is set; the orchestrator sets it for ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ["DS_ACCELERATOR"] = "cpu"  # before anything imports deepspeed

# deepspeed is imported now so that its import is not counted in the peak - pre-model RSS
import deepspeed  # noqa: E402, F401
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from scalemlo.distributed import ensure_distributed  # noqa: E402
from scalemlo.hf import ReweightingArguments, ReweightingTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_CONFIG = ROOT / "configs" / "ds" / "trainer_zero0.json"
SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=1024),
    "124m": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}
REWEIGHTING = dict(reweighting="meta_weight_net", hypergradient_method="finite_difference", meta_warmup_steps=0)


class RandomTokens(torch.utils.data.Dataset):
    """``n`` rows of ``seq_len`` uniform random token ids from a seeded generator; labels = input_ids."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int):
        self.ids = torch.randint(0, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "id": i}


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}


class StepClock(TrainerCallback):
    """``perf_counter`` at train begin and at the end of every optimizer step."""

    def __init__(self):
        self.begin = 0.0
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def current_rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=["plain", "reweighting"], required=True)
    parser.add_argument("--unroll_steps", type=int, default=1, help="reweighting only: steps per meta step")
    parser.add_argument("--size", choices=sorted(SIZES), default="124m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--result", required=True, help="where the row's JSON goes")
    args = parser.parse_args()

    ensure_distributed()  # a one-process gloo group: DeepSpeed uses it
    vocab = SIZES[args.size]["vocab_size"]
    rows = args.steps * args.batch_size  # every step reads fresh rows: no epoch boundary inside the run
    train = RandomTokens(rows, args.seq_len, vocab, seed=0)
    meta = RandomTokens(rows, args.seq_len, vocab, seed=1)

    rss_before_model = current_rss_kib()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SIZES[args.size]))
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        common = dict(
            output_dir=output_dir,
            deepspeed=str(DEEPSPEED_CONFIG),
            use_cpu=True,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4,
            seed=0,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        if args.trainer == "plain":
            trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train, data_collator=collate)
        else:
            reweighting_args = ReweightingArguments(
                **common, **REWEIGHTING, unroll_steps=args.unroll_steps, per_device_meta_batch_size=args.batch_size
            )
            trainer = ReweightingTrainer(
                model=model, args=reweighting_args, train_dataset=train, meta_dataset=meta, data_collator=collate
            )
        trainer.add_callback(clock)  # after ReweightingTrainer's own callback: a step's stamp includes its meta step
        trainer.train()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if len(clock.ends) != args.steps:
        raise RuntimeError(f"expected {args.steps} optimizer steps, the Trainer took {len(clock.ends)}")
    result = {
        "trainer": args.trainer,
        "unroll_steps": args.unroll_steps if args.trainer == "reweighting" else None,
        "params": sum(p.numel() for p in model.parameters()),
        "step_end_s": [t - clock.begin for t in clock.ends],
        "meta_steps": trainer._meta_level.steps if args.trainer == "reweighting" else 0,
        "rss_before_model_kib": rss_before_model,
        "peak_rss_kib": peak_rss,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
