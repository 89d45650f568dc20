"""What batches chosen by fixed weights reach: the default run with the selection pool's weights replaced.

The learned run's batches are chosen from its selection pool by the scorer's weights (``--selection_pool``).
Here they are chosen by fixed weights instead, from the first step to the last: the ground truth's (``--truth
W``: every document of the visible corruption kinds at weight W, every other at 1) or the final weights of an
earlier run (``--weights_from DIR``: its ``weights.json``). The scorer still learns beside them and the report
is the default run's (its AUCs are the scorer's, not the fixed weights'); the held-out loss is what such a
weighting is worth, against the default run's baselines (``--baselines none`` skips retraining them).

    python examples/llm_reweighting/fixed_weights.py --truth 0.1 --seed 1 --model_seed 1 --corpus_seed 1 \\
        --baselines none --output_dir runs/truth01_1
    python examples/llm_reweighting/fixed_weights.py --weights_from runs/seed1 --seed 1 --model_seed 1 \\
        --corpus_seed 1 --baselines none --output_dir runs/fixed_1

Other flags go to ``run_reweighting.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_reweighting  # noqa: E402

from scalemlo.hf import selection  # noqa: E402

VISIBLE = run_reweighting.VISIBLE_KINDS  # the kinds a model can see at this budget


def fixed_table(corpus: Path, truth: float | None, weights_from: str | None) -> torch.Tensor:
    """The weight of every row of the learned run's training set (the training documents, then the meta set's:
    ``--train_on_meta``), in row order."""
    train = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    meta = [json.loads(line) for line in (corpus / "meta.jsonl").read_text().splitlines()]
    if truth is not None:
        return torch.tensor([truth if row["corruption"] in VISIBLE else 1.0 for row in train] + [1.0] * len(meta))
    examples = json.loads((Path(weights_from) / "weights.json").read_text())["examples"]
    ids = [row["id"] for row in train] + [f"meta/{row['id']}" for row in meta]
    missing = [i for i in ids if i not in examples]
    if missing:
        raise ValueError(
            f"--weights_from {weights_from}: no weight for {len(missing)} rows (e.g. {missing[0]}); "
            "give the output directory of a run on the same corpus seed with --train_on_meta"
        )
    return torch.tensor([examples[i] for i in ids])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    truth = run_reweighting.flag_value(argv, "truth", None)
    weights_from = run_reweighting.flag_value(argv, "weights_from", None)
    if (truth is None) == (weights_from is None):
        raise ValueError("give one of --truth W (the visible kinds at weight W, the rest 1) or --weights_from DIR")
    if truth is not None and not float(truth) >= 0:
        raise ValueError(f"--truth must be a weight >= 0; got {truth}")
    own = ("--truth", "--weights_from")
    argv = [a for i, a in enumerate(argv) if not a.startswith(own) and (i == 0 or argv[i - 1] not in own)]
    out = Path(run_reweighting.flag_value(argv, "output_dir", run_reweighting.default_flags()["output_dir"]))
    table: list[torch.Tensor] = []
    choose = selection.Selector.choose

    def choose_by_table(self, raw, ids, size, generator):
        if not table:
            table.append(fixed_table(out / "corpus", None if truth is None else float(truth), weights_from))
            if len(table[0]) != len(self.ages):
                raise ValueError(f"{len(table[0])} fixed weights for a training set of {len(self.ages)} rows")
        return choose(self, table[0][torch.as_tensor(ids).long()], ids, size, generator)

    selection.Selector.choose = choose_by_table
    try:
        return run_reweighting.main(argv)
    finally:
        selection.Selector.choose = choose


if __name__ == "__main__":
    main()
