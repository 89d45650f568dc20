"""``scalemlo-reweight``'s report: held-out losses, how well the weights find bad data, versions, a figure."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from scalemlo.cli.reweight.arguments import DataArguments
from scalemlo.hf.losses import per_example_causal_lm_loss

log = logging.getLogger(__name__)
PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "deepspeed", "scalemlo")


@torch.no_grad()
def heldout_loss(model, dataset, collate) -> float:
    """Token-level mean loss of ``model`` on a tokenized set (clean held-out text), batches of 32."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), 32):
        batch = collate([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, counts = per_example_causal_lm_loss(logits, batch["labels"], batch["attention_mask"])
        total += float((losses * counts).sum())
        tokens += int(counts.sum())
    return total / max(tokens, 1)


def make_report(results: dict, weights: torch.Tensor, train, data: DataArguments, names, trainer, start) -> dict:
    """The run's report: ``results`` (held-out losses, seconds), perplexities, the share of the clean-only
    headroom recovered, with ground truth the weights' ROC-AUCs (all, ``--visible_corruptions``, per kind) and
    mean weights, the mean weight per source, and `versions`.

    Args:
        weights: float (n,), the learned weight of each row of ``train`` (the learned run's data).
        start: ``time.perf_counter()`` at the start of the run.
    """
    report = {"steps": trainer.state.global_step, "seconds": time.perf_counter() - start, **results}
    for key in [k for k in report if k.startswith("heldout_loss_")]:
        report[key.replace("loss", "perplexity")] = math.exp(report[key])
    # the share of what removing the corrupted documents is worth that the learned weights recover, against
    # the uniform run on the learned run's own data (the training set, with the meta set under --train_on_meta)
    base = "heldout_loss_uniform_plus_meta" if report["train_on_meta"] else "heldout_loss_uniform"
    if {base, "heldout_loss_clean_only", "heldout_loss_learned"} <= set(report):
        headroom = report[base] - report["heldout_loss_clean_only"]
        gained = report[base] - report["heldout_loss_learned"]
        report["oracle_gap_recovered"] = gained / headroom if headroom > 0 else float("nan")
    if data.corrupted_column in train.column_names:
        report.update(weight_aucs(weights, train, data))
    if names:
        column = list(train[data.source_column])
        report["source_weights"] = {
            n: float(weights[[i for i, s in enumerate(column) if s == n]].mean()) for n in names
        }
    report["versions"] = versions()
    return report


def weight_aucs(weights: torch.Tensor, train, data: DataArguments) -> dict:
    """ROC-AUCs of ``weights`` separating clean (positive) from corrupted rows, and mean weights of each;
    empty without scikit-learn (with a warning) or when every row is clean or every row corrupted."""
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        log.warning("the weights' AUCs need scikit-learn: pip install scikit-learn (or scalemlo[examples])")
        return {}
    report: dict = {}
    corrupted = torch.tensor([bool(x) for x in list(train[data.corrupted_column])])
    if not corrupted.any() or corrupted.all():
        return report
    report["weight_auc"] = float(roc_auc_score((~corrupted).numpy(), weights.numpy()))
    kinds = list(train[data.corruption_column]) if data.corruption_column in train.column_names else None
    visible_kinds = [k.strip() for k in data.visible_corruptions.split(",") if k.strip()]
    if kinds is not None and visible_kinds:
        visible = torch.tensor([not bad or k in visible_kinds for k, bad in zip(kinds, corrupted.tolist())])
        if bool((corrupted & visible).any()):
            report["weight_auc_visible"] = float(roc_auc_score((~corrupted[visible]).numpy(), weights[visible].numpy()))
    report["mean_weight_clean"] = float(weights[~corrupted].mean())
    report["mean_weight_corrupted"] = float(weights[corrupted].mean())
    if kinds is not None:
        report["weight_auc_by_corruption"] = {}
        for kind in sorted({k for k, bad in zip(kinds, corrupted.tolist()) if bad}):
            chosen = torch.tensor([not bad or k == kind for k, bad in zip(kinds, corrupted.tolist())])
            report["weight_auc_by_corruption"][kind] = float(
                roc_auc_score((~corrupted[chosen]).numpy(), weights[chosen].numpy())
            )
    return report


def versions() -> dict:
    """What the numbers depend on beyond the seeds: the Python (its pydoc_data is the example's corpus), the
    CPU (its float kernels: the same packages gave other digits on a slower machine of the same kind) and the
    packages; printed in report.json."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version(), "torch_threads": torch.get_num_threads(), "cpu": cpu_model()}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_report(report: dict) -> None:
    """The report's numbers, one a line, on stdout (the command's result)."""
    lines = [
        f"{k:>32}: {v:.4f}" if isinstance(v, float) else f"{k:>32}: {v}"
        for k, v in report.items()
        if not isinstance(v, dict)
    ]
    for kind, auc in report.get("weight_auc_by_corruption", {}).items():
        lines.append(f"{'weight auc, ' + kind:>32}: {auc:.3f}")
    for name, w in report.get("source_weights", {}).items():
        lines.append(f"{'weight of ' + name:>32}: {w:.3f}")
    print("\n".join(lines))


def plot(report, trainer, weights, train, data: DataArguments, path: Path) -> None:
    """``weights.png``: the held-out losses, the mean weight per source over training, the final weights'
    histogram (clean against corrupted with ground truth). Skipped, with a warning, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.warning("no %s: it needs matplotlib (pip install matplotlib, or scalemlo[examples])", path.name)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (losses, over_time, histogram) = plt.subplots(1, 3, figsize=(15, 4))
    runs = [k[len("heldout_loss_") :] for k in report if k.startswith("heldout_loss_")]
    values = [report[f"heldout_loss_{name}"] for name in runs]
    bars = losses.bar(range(len(runs)), values, color=["C3" if name == "learned" else "C0" for name in runs])
    losses.bar_label(bars, fmt="%.3f", fontsize=7)
    losses.set_xticks(range(len(runs)), [name.replace("_", "\n") for name in runs], fontsize=7)
    if values:
        spread = max(values) - min(values)
        losses.set_ylim(min(values) - max(spread, 0.01), max(values) + 0.5 * max(spread, 0.01))
    gap = report.get("oracle_gap_recovered")
    losses.set(title="held-out loss" + (f" (gap recovered {gap:.2f})" if gap is not None else ""))
    history = [h for h in trainer.state.log_history if any(k.startswith("weight/source/") for k in h)]
    for key in sorted({k for h in history for k in h if k.startswith("weight/source/")}):
        over_time.plot([h["step"] for h in history], [h.get(key, float("nan")) for h in history], label=key[14:])
    over_time.set(title="mean weight per source (training batches)", xlabel="step", ylabel="weight")
    over_time.legend(fontsize=7)
    if data.corrupted_column in train.column_names:
        corrupted = torch.tensor([bool(x) for x in list(train[data.corrupted_column])])
        histogram.hist([weights[~corrupted].numpy(), weights[corrupted].numpy()], bins=40, label=["clean", "corrupted"])
        histogram.legend()
    histogram.set(title=f"final weights (AUC {report.get('weight_auc', float('nan')):.3f})", xlabel="weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
