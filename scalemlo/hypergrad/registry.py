"""The method registry (`scalemlo.methods`), importable from here as before."""

from scalemlo.methods import METHODS, Method, get_method, register, shared_forward_methods, unregister

__all__ = ["METHODS", "Method", "get_method", "register", "shared_forward_methods", "unregister"]
