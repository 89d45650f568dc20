"""The GPU check (bf16 MLO on one GPU), prepared to run within ~8 minutes on one H100.

    bash benchmarks/gpu_check.sh                     # on a GPU machine; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --smoke           # the same code on the CPU with tiny models (a test runs it)

Three parts, each printing one line per measurement and adding it to the JSON:

1. agreement: the Meta-Weight-Net hypergradient of a GPT-2 LM level (DeepSpeed ZeRO-0) in bf16 against
   the float32 run of the same program at the same point (the same bf16-representable weights, the same
   batches): cosine and relative error, for ``finite_difference`` (before any step and after 3),
   ``sama`` and ``cg`` (finite-difference HVPs) after 3 steps; the same for fp16 (DeepSpeed's fp16
   optimizer with dynamic loss scaling; on a CPU without fp16 arithmetic DeepSpeed is let build it,
   ``scalemlo.testing.allow_deepspeed_fp16_on_cpu``), with the fp16 level's skipped (overflow) steps.
2. throughput: tokens per second of the LM level trained alone (plain fine-tuning in the same engine)
   and with MLO (``finite_difference``, unroll_steps 1 and 10; shared forward at unroll 1), bf16.
3. fit: the largest GPT-2-shaped model (ascending ladder) whose MLO step (ZeRO-3, bf16, built
   partitioned with ``scalemlo.zero_init``) runs on one device, each size in its own process with a
   time limit; peak device memory per size.

Batches are made on the model's device (scalemlo does not move batches). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SIZES = {  # GPT-2 shapes (n_positions kept small: the batches are 64 tokens)
    "tiny": dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4),
    "4m": dict(vocab_size=8192, n_embd=256, n_layer=2, n_head=4),
    "124m": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12),
    "774m": dict(vocab_size=50257, n_embd=1280, n_layer=36, n_head=20),
    "1.5b": dict(vocab_size=50257, n_embd=1600, n_layer=48, n_head=25),
    "2.7b": dict(vocab_size=50257, n_embd=2560, n_layer=32, n_head=32),
    "4b": dict(vocab_size=50257, n_embd=3072, n_layer=36, n_head=24),
    "6.7b": dict(vocab_size=50257, n_embd=4096, n_layer=32, n_head=32),
}
BATCH, TOKENS = 8, 64


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def make_lm(size: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        **SIZES[size],
        n_positions=TOKENS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def batches(size: str, count: int, seed: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    vocab = SIZES[size]["vocab_size"]
    return [(torch.randint(0, vocab, (BATCH, TOKENS), generator=g).to(device()),) for _ in range(count)]


def levels(
    size: str,
    method: str,
    precision: str,
    stage: int = 0,
    plain: bool = False,
    unroll: int = 1,
    shared: bool = False,
    lm: torch.nn.Module | None = None,
    **method_kwargs,
):
    """An Engine of the reweighting task: the LM (DeepSpeed, ``stage``, ``precision``) under a Meta-Weight-Net
    (DeepSpeed ZeRO-0, float32). ``plain``: the LM level alone, its weights fixed."""
    from reweighting_worker import WeightNet, per_example_loss

    from scalemlo import Engine, EngineConfig, Level, LevelConfig

    ds = {"zero_optimization": {"stage": stage}, **({"bf16": {"enabled": True}} if precision == "bf16" else {})}
    if precision == "fp16":
        ds["fp16"] = {"enabled": True}
    weigher = WeightNet().to(device())

    class LM(Level):
        def per_example_losses(self, batch):
            return per_example_loss(self.module, batch[0])

        def example_weights(self, batch, losses):
            return weigher(losses.float()) if plain else self.uppers["reweight"](losses)

    class Reweight(Level):
        def training_step(self, batch):
            return per_example_loss(self.lowers["lm"].module, batch[0]).mean()

    lm = make_lm(size) if lm is None else lm
    lower = LM(
        "lm",
        lm,
        torch.optim.Adam(lm.parameters(), lr=1e-4),
        batches(size, 4, 0),
        config=LevelConfig(deepspeed_config=ds),
    )
    if plain:
        weigher.requires_grad_(False)
        return Engine([lower], {}, EngineConfig(max_steps=0, progress_bar=False))
    meta_config = LevelConfig(
        method=method,
        unroll_steps=unroll,
        shared_forward=shared,
        deepspeed_config={"zero_optimization": {"stage": 0}},
        **method_kwargs,
    )
    upper = Reweight(
        "reweight", weigher, torch.optim.Adam(weigher.parameters(), lr=1e-3), batches(size, 4, 1), config=meta_config
    )
    return Engine([lower, upper], {"reweight": ["lm"]}, EngineConfig(max_steps=0, progress_bar=False))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def agreement(size: str) -> list[dict]:
    """bf16 and fp16 against float32 at the same point, per method."""
    if not torch.cuda.is_available():
        from scalemlo.testing import allow_deepspeed_fp16_on_cpu

        allow_deepspeed_fp16_on_cpu()
    torch.manual_seed(0)
    base = make_lm(size)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.bfloat16().float())  # bf16-representable: both runs start from the same weights
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = []
    # At step 0 the bf16 level is evaluated in float32 at its masters, which equal the float32 run's
    # weights: the same numbers (a check of the rule). After 3 steps of each run (each in its own
    # precision, the upper level stepping too) the two programs have drifted apart: the agreement the
    # tests ask for (cosine >= 0.99 on the CPU, tests/test_low_precision.py).
    cg = dict(second_order="finite_difference", cg_iterations=3)
    cases = [("finite_difference", 0, {}), ("finite_difference", 3, {}), ("sama", 3, {}), ("cg", 3, cg)]
    precisions = ("fp32", "bf16", "fp16")
    for method, steps, kw in cases:
        grads, overflows = {}, {}
        for precision in precisions:
            torch.manual_seed(1)
            lm = make_lm(size)
            lm.load_state_dict(state)
            engine = levels(size, method, precision, lm=lm, **kw)
            for _ in range(steps):  # sama reads the last Adam step's state: take steps first
                engine.step()
            grads[precision] = _flat(engine.hypergradient("reweight"))
            overflows[precision] = engine.levels["lm"].overflow_steps
            del engine
        b = grads["fp32"]
        for precision in precisions[1:]:
            a = grads[precision]
            out.append(
                {
                    "part": "agreement",
                    "size": size,
                    "method": method,
                    "precision": precision,
                    "steps_before": steps,
                    "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                    "rel_err": float((a - b).norm() / b.norm().clamp_min(1e-300)),
                    "overflow_steps": overflows[precision],
                }
            )
    return out


def throughput(size: str, steps: int) -> list[dict]:
    """Tokens per second, plain vs MLO, bf16, ZeRO-0; each row built fresh, timed after one warm-up cycle."""
    rows = []
    for name, kw in (
        ("plain", dict(plain=True)),
        ("mlo fd unroll 1", {}),
        ("mlo fd unroll 10", dict(unroll=10)),
        ("mlo fd shared unroll 1", dict(shared=True)),
    ):
        torch.manual_seed(0)
        engine = levels(size, "finite_difference", "bf16", **kw)
        cycle = kw.get("unroll", 1)
        for _ in range(cycle):  # warm-up: one full cycle
            engine.step()
        _sync()
        start = time.perf_counter()
        n = max(steps, cycle) // cycle * cycle
        for _ in range(n):
            engine.step()
        _sync()
        seconds = (time.perf_counter() - start) / n
        rows.append(
            {
                "part": "throughput",
                "size": size,
                "row": name,
                "s_per_step": seconds,
                "tokens_per_s": BATCH * TOKENS / seconds,
            }
        )
        del engine
    plain = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_plain"] = r["tokens_per_s"] / plain
    return rows


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fit_one(size: str) -> dict:
    """One MLO step at ZeRO-3 bf16, the LM built partitioned; peak device memory (CUDA) or RSS."""
    import scalemlo

    ds = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    with scalemlo.zero_init(ds):
        lm = make_lm(size)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters())
    engine = levels(size, "finite_difference", "bf16", stage=3, lm=lm)
    start = time.perf_counter()
    engine.step()
    _sync()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return {
        "part": "fit",
        "size": size,
        "params": params,
        "ok": True,
        "step_s": time.perf_counter() - start,
        "peak_device_mb": peak,
    }


def fit(ladder: list[str], limit_s: float) -> list[dict]:
    """Each size in its own process (an out-of-memory leaves nothing behind); stops at the first failure."""
    rows = []
    for size in ladder:
        cmd = [sys.executable, __file__, "--fit-one", size]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, env=os.environ.copy())
            found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"part": "fit"')]
            row = (
                found[-1]
                if proc.returncode == 0 and found
                else {"part": "fit", "size": size, "ok": False, "error": (proc.stderr or proc.stdout)[-400:]}
            )
        except subprocess.TimeoutExpired:
            row = {"part": "fit", "size": size, "ok": False, "error": f"over the {limit_s:.0f} s limit"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not row["ok"]:
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, few steps (the CPU test)")
    parser.add_argument("--size", default="124m", help="the model of agreement and throughput")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per throughput row")
    parser.add_argument("--ladder", nargs="*", default=["774m", "1.5b", "2.7b", "4b"])
    parser.add_argument("--fit-limit-s", type=float, default=75.0)
    parser.add_argument("--parts", nargs="+", default=["agreement", "throughput", "fit"])
    parser.add_argument("--fit-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.fit_one:
        print(json.dumps(fit_one(args.fit_one)), flush=True)
        return
    if args.smoke:
        args.size, args.steps, args.ladder = "tiny", 2, ["tiny", "4m"]
    machine = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    rows: list[dict] = []
    started = time.time()
    for part in args.parts:
        found = {
            "agreement": lambda: agreement(args.size),
            "throughput": lambda: throughput(args.size, args.steps),
            "fit": lambda: fit(args.ladder, args.fit_limit_s),
        }[part]()
        for row in found:
            if part != "fit":
                print(json.dumps(row), flush=True)
        rows += found
        result = {"machine": machine, "seconds": time.time() - started, "parts_done": part, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))  # after every part: a time limit keeps the rest
    print(f"wrote {args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
