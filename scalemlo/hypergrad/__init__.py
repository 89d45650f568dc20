"""Hypergradient methods behind one registry, and the coordinator that chains them."""

from scalemlo.hypergrad import cg, exact, finite_difference, neumann, penalty, sama  # noqa: F401  (register)
from scalemlo.hypergrad.registry import METHODS, get_method, register

__all__ = ["METHODS", "get_method", "register"]
