"""``python -m scalemlo.cli.reweight``: the ``scalemlo-reweight`` console script."""

from scalemlo.cli.reweight.run import console_main

if __name__ == "__main__":
    console_main()
