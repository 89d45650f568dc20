"""Load an example's train.py as a module (examples are folders, not packages), and flip hypergradients."""

import contextlib
import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / name / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def negated_hypergradients():
    """Every hypergradient the coordinator hands to an optimizer comes out negated.

    The control run for a direction check: a program whose upper objective
    falls with the true hypergradient must do worse with this one. A smoke test
    that only checks that something moved passes a sign-flipped hypergradient.
    """
    from scalemlo.hypergrad.coordinator import Coordinator

    original = Coordinator.hypergradient

    def flipped(self, *args, **kwargs):
        return [-g for g in original(self, *args, **kwargs)]

    Coordinator.hypergradient = flipped
    try:
        yield
    finally:
        Coordinator.hypergradient = original
