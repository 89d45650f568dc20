"""Load an example's train.py as a module (examples are folders, not packages), and flip hypergradients."""

import contextlib
import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_file(path: Path, name: str):
    """Import a script as module ``name`` (registered in sys.modules: dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    return load_file(EXAMPLES / name / "train.py", f"example_{name}")


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
