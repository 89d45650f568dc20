"""What a perfect weighting of some corruption kinds could reach: the default run with those kinds removed.

Builds the default corpus of ``--corpus_seed`` (as ``run_reweighting.py`` does, under ``--output_dir``), writes
its training set without the documents of ``--kinds`` to ``corpus/train_without_<kinds>.jsonl`` and runs the
default flags on it with ``--baselines uniform_plus_meta``. Its ``heldout_loss_uniform_plus_meta`` is uniform
training on training + meta with those kinds gone: set beside the default run's ``uniform_plus_meta`` and
``clean_only``, it says how much of the clean-only headroom those kinds hold. (The learned run also runs, on
the reduced set; its number is not the comparison.) Other flags go to ``run_reweighting.py``.

    python examples/llm_reweighting/drop_kinds.py --seed 1 --model_seed 1 --corpus_seed 1 --output_dir runs/drop1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
import run_reweighting  # noqa: E402

VISIBLE = run_reweighting.VISIBLE_KINDS  # the kinds a model can see at this budget


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    kinds = run_reweighting.flag_value(argv, "kinds", ",".join(VISIBLE)).split(",")
    unknown = sorted(set(kinds) - set(corpus.CORRUPTIONS))
    if unknown:
        raise ValueError(f"--kinds: unknown {unknown}; choose from {list(corpus.CORRUPTIONS)}")
    argv = [a for i, a in enumerate(argv) if not a.startswith("--kinds") and (i == 0 or argv[i - 1] != "--kinds")]
    flags = run_reweighting.default_run_argv(argv)
    data = Path(run_reweighting.flag_value(flags, "output_dir", "runs/llm_reweighting")) / "corpus"
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    kept = [row for row in rows if row["corruption"] not in kinds]
    path = data / f"train_without_{'_'.join(sorted(kinds))}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    print(f"training set without {kinds}: {len(kept)} of {len(rows)} documents ({path})", flush=True)
    flags = [a for a in flags if not a.startswith("--train_file=")] + [f"--train_file={path}"]
    return run_reweighting.main(flags + argv + ["--baselines", "uniform_plus_meta"])


if __name__ == "__main__":
    main()
