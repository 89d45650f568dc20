"""The method registry: name -> response function, one signature for all.

A method is ``fn(problem: ResponseProblem) -> dict[upper name, Vector]``
returning ``-(d^2 f_X / dp_Y dp_X) . H_X^{-1} v`` for every upper Y of the
problem. Adding a method is one file with a decorated function and one import
line in ``scalemlo/hypergrad/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable

METHODS: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the method called ``name``."""

    def add(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"hypergradient method {name!r} is registered twice")
        METHODS[name] = fn
        return fn

    return add


def get_method(name: str) -> Callable:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown hypergradient method {name!r}; known: {sorted(METHODS)}") from None
