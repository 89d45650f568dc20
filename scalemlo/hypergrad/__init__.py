"""Hypergradient methods behind one registry, and the coordinator that chains them."""

from scalemlo.hypergrad import cg, exact, finite_difference, neumann, penalty, sama  # noqa: F401  (register)
from scalemlo.methods import METHODS, Method, get_method, register, shared_forward_methods, unregister

__all__ = ["METHODS", "Method", "get_method", "register", "shared_forward_methods", "unregister"]
