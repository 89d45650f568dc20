"""How much can a learned weighting see? Per-example signals on the default corpus, during uniform training.

    python examples/llm_reweighting/diagnose_signal.py --steps 300 --at 50 150 300 --out signal.json

Trains the default run's model with uniform weights (the default corpus and
flags of ``config.yaml``, except ``--steps`` and ``--learning_rate``) and, at
the steps given by ``--at``, computes for every training document i:

- ``dot``: gᵢ · g_meta, where gᵢ is the gradient of document i's mean token loss and
  g_meta that of the whole meta set. A one-step hypergradient of i's weight is
  -lr · gᵢ · g_meta (finite_difference and sama estimate exactly this); a learned
  weighting can only move weights the way this signal points.
- ``cos``: the same, divided by both norms (what is left without the loss scale).
- ``pdot``: gᵢ · P g_meta with P = 1 / (√ŝ + eps) from the training optimizer's Adam state: the
  preconditioned product that ``sama`` (the default run's method) follows.
- ``neg_loss``: minus the document's loss (a low loss as the sign of a clean document).
- ``votes_pdot``: the sum over all measurements so far of sign(pdot): what a per-example weight
  table would learn if every document were visited at every measurement and judged against the
  whole meta set (Adam's first steps on a logit move it by ± its learning rate). It is a ceiling
  for a learned table at this budget, with the sampling noise of meta batches and visits removed.

It prints the ROC-AUC of each signal separating clean from corrupted
documents, overall and per corruption kind (0.5: no information), and the
share of clean and corrupted documents whose one-step hypergradient would
raise their weight (dot > 0). Results are in this example's README.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run_reweighting as rr  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from scalemlo.cli import reweight  # noqa: E402
from scalemlo.distributed import add_launcher_arguments, ensure_distributed, world_size  # noqa: E402
from scalemlo.hf.losses import per_example_causal_lm_loss  # noqa: E402

SIGNALS = ("dot", "cos", "pdot", "votes_pdot", "neg_loss")  # the table's rows, in order


def _mean_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses, counts = per_example_causal_lm_loss(logits, batch["labels"], batch["attention_mask"])
    return (losses * counts).sum() / counts.sum()


def adam_preconditioner(optimizer, params) -> torch.Tensor:
    """P = 1 / (sqrt(bias-corrected second moment) + eps) of Adam/AdamW, flattened like the parameters."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in params:
        state, group = optimizer.state[p], group_of[p]
        bc2 = 1 - group["betas"][1] ** float(state["step"])
        parts.append((1 / ((state["exp_avg_sq"] / bc2).sqrt() + group["eps"])).reshape(-1))
    return torch.cat(parts)


def signals(model, train, meta, collate, optimizer=None) -> dict[str, list[float]]:
    """dot, cos, neg_loss (and pdot, given the Adam optimizer) of every training document (module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731
    model.eval()  # no dropout: the signal of the model as it stands
    g_meta = flat(torch.autograd.grad(_mean_loss(model, collate([meta[i] for i in range(len(meta))])), params))
    out: dict[str, list[float]] = {"dot": [], "cos": [], "neg_loss": []}
    preconditioned = None
    if optimizer is not None:
        out["pdot"] = []
        preconditioned = adam_preconditioner(optimizer, params) * g_meta
    for i in range(len(train)):
        loss = _mean_loss(model, collate([train[i]]))
        g = flat(torch.autograd.grad(loss, params))
        out["dot"].append(float(g @ g_meta))
        if preconditioned is not None:
            out["pdot"].append(float(g @ preconditioned))
        out["cos"].append(float(g @ g_meta / (g.norm() * g_meta.norm()).clamp_min(1e-30)))
        out["neg_loss"].append(-float(loss.detach()))
    model.train()
    return out


def aucs(values: list[float], kinds: list[str]) -> dict[str, float]:
    """ROC-AUC of ``values`` for clean (kind "") against corrupted documents, overall and per kind."""
    from sklearn.metrics import roc_auc_score

    clean = [k == "" for k in kinds]
    result = {"all": float(roc_auc_score(clean, values))}
    for kind in sorted(set(kinds) - {""}):
        chosen = [i for i, k in enumerate(kinds) if k in ("", kind)]
        result[kind] = float(roc_auc_score([clean[i] for i in chosen], [values[i] for i in chosen]))
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = add_launcher_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--steps", type=int, default=300, help="uniform training steps (cosine schedule)")
    parser.add_argument("--at", type=int, nargs="+", default=[50, 150, 300], help="steps to measure at")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--corpus_seed", type=int, default=0)
    parser.add_argument("--work_dir", default="runs/llm_reweighting_signal", help="corpus and Trainer output")
    parser.add_argument(
        "--pretrain_steps",
        type=int,
        default=rr.default_flags().get("pretrain_steps", 0),
        help="start from the default run's pre-trained model (0: from scratch)",
    )
    parser.add_argument("--pretrain_cache", default=rr.default_flags().get("pretrain_cache", "runs/pretrained"))
    parser.add_argument("--out", default=None, help="write the measurements here (JSON)")
    options = parser.parse_args(argv)
    ensure_distributed()
    if world_size() > 1:
        raise SystemExit("diagnose_signal.py measures one model in one process: start it with python, not a launcher")
    argv = [
        f"--output_dir={options.work_dir}",
        f"--corpus_seed={options.corpus_seed}",
        f"--pretrain_steps={options.pretrain_steps}",
        f"--pretrain_cache={options.pretrain_cache}",
    ]
    argv = rr.default_run_argv(argv) + argv
    argv += [f"--learning_rate={options.learning_rate}", f"--max_steps={options.steps}"]
    model_args, data, _, args, _ = rr.parse(argv)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    collate = reweight.Collator(tokenizer.pad_token_id)
    train = reweight.load_split(data, "train")
    tokenized = reweight.tokenize(train, tokenizer, data, args, None)
    meta = reweight.tokenize(reweight.load_split(data, "meta"), tokenizer, data, args, None)
    kinds = list(train[data.corruption_column])
    model = reweight.build_model(model_args, tokenizer)
    rows: list[dict] = []
    votes = torch.zeros(len(tokenized), dtype=torch.float64)

    class Measure(TrainerCallback):
        def on_step_end(self, _args, state, control, optimizer=None, **kwargs):
            if state.global_step in options.at:
                values = signals(model, tokenized, meta, collate, optimizer)
                votes.add_(torch.tensor(values["pdot"], dtype=torch.float64).sign())
                values["votes_pdot"] = votes.tolist()
                dot = torch.tensor(values["dot"])
                clean = torch.tensor([k == "" for k in kinds])
                rows.append(
                    {
                        "step": state.global_step,
                        **{name: aucs(v, kinds) for name, v in values.items()},
                        "share_dot_positive_clean": float((dot[clean] > 0).double().mean()),
                        "share_dot_positive_corrupted": float((dot[~clean] > 0).double().mean()),
                    }
                )

    trainer = reweight.UniformTrainer(
        model=model,
        args=reweight.baseline_arguments(args, "uniform"),
        train_dataset=tokenized,
        data_collator=collate,
        callbacks=[Measure()],
    )
    trainer.train()
    kinds_sorted = ["all", *sorted(set(kinds) - {""})]
    print(f"{'step':>5} {'signal':>10} " + " ".join(f"{k:>14}" for k in kinds_sorted) + "   dot>0 clean/corrupted")
    for row in rows:
        for name in SIGNALS:
            shares = (
                f"   {row['share_dot_positive_clean']:.2f}/{row['share_dot_positive_corrupted']:.2f}"
                if name == "dot"
                else ""
            )
            print(f"{row['step']:>5} {name:>10} " + " ".join(f"{row[name][k]:>14.3f}" for k in kinds_sorted) + shares)
    if options.out:
        Path(options.out).write_text(json.dumps({"settings": vars(options), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
