#!/usr/bin/env bash
# The GPU check of issue 11, for a lent GPU machine (one H100: ~8 minutes). Prints one JSON line per
# measurement and writes benchmarks/results/gpu_check.json. See benchmarks/gpu_check.py for the parts.
#   bash benchmarks/gpu_check.sh            (from the repository root, with the project installed)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no GPU: run python benchmarks/gpu_check.py --smoke instead'"
timeout 470 python benchmarks/gpu_check.py --size 124m --steps 10 --ladder 774m 1.5b 2.7b 4b --fit-limit-s 75 "$@"
