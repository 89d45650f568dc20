"""Command-line programs, installed as console scripts (``[project.scripts]`` in ``pyproject.toml``).

- ``scalemlo-reweight`` (`scalemlo.cli.reweight`): fine-tune a causal LM while an upper level learns
  which training data to trust, against a clean meta set, beside uniform baselines on the same budget.
"""
