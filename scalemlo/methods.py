"""The hypergradient methods' registry: each method's response function and what it needs, declared once.

A method is ``fn(problem: ResponseProblem) -> dict[upper name, Vector]`` returning
``-(d^2 f_X / dp_Y dp_X) . H_X^{-1} v`` for every upper Y of the problem, registered with what it needs
of the levels (`Method`). Every check that depends on the method (``LevelConfig``, ``Engine``'s
ZeRO-stage refusals, ``ReweightingTrainer``) and the table of needs in docs/methods.md read these
declarations; none names a method. Adding a method is one file with a decorated function, imported
once (``scalemlo/hypergrad/__init__.py`` imports the built-in ones; a method of your own is registered
when its module is imported)::

    from scalemlo import register

    @register("mine", shared_forward=False)
    def mine(problem):
        ...

This module imports nothing of scalemlo's, so the configuration can check a method's name and needs
without importing the methods' machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

DOUBLE_BACKWARD = ("never", "always", "second_order")


@dataclass(frozen=True)
class Method:
    """A registered method and what it needs (a call runs ``fn``).

    Attributes:
        name: the name ``LevelConfig.method`` takes.
        fn: the response function.
        shared_forward: whether it can take its step on the lower level's next forward
            (``LevelConfig.shared_forward``): it forms its products from one backward of that forward.
        reads_last_step: whether it reads each lower level's last optimizer step (its gradients, learning
            rates and per-parameter optimizer state), as sama does: the levels below keep their last
            gradients, must run at ZeRO stage 0 (ZeRO 1-3 keep that state in flat partitions) and with a
            torch optimizer, and a checkpoint taken while its step waits for the next forward keeps it.
        double_backward: whether it differentiates through the lower level's gradient with autograd
            ("always"; "second_order" when ``LevelConfig.second_order == "autograd"``; "never"): such a
            method cannot reach a ZeRO-3 partitioned level, above or below.
    """

    name: str
    fn: Callable[[Any], dict]
    shared_forward: bool = True
    reads_last_step: bool = False
    double_backward: str = "never"

    def __post_init__(self) -> None:
        if self.double_backward not in DOUBLE_BACKWARD:
            raise ValueError(
                f"method {self.name!r}: double_backward={self.double_backward!r} is not known; allowed values: "
                f"{', '.join(DOUBLE_BACKWARD)}"
            )

    def __call__(self, problem: Any) -> dict:
        return self.fn(problem)

    def needs_double_backward(self, second_order: str) -> bool:
        """Whether, under ``LevelConfig.second_order``, it needs autograd through a gradient."""
        return self.double_backward == "always" or (
            self.double_backward == "second_order" and second_order == "autograd"
        )


_REGISTRY: dict[str, Method] = {}
METHODS: Mapping[str, Method] = MappingProxyType(_REGISTRY)
"""Name -> `Method`, read-only (``register`` adds to it)."""


def register(
    name: str, *, shared_forward: bool = True, reads_last_step: bool = False, double_backward: str = "never"
) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the method called ``name``, with what it needs (see `Method`).

    Args:
        name: the name ``LevelConfig.method`` takes.
        shared_forward: whether it can take its step on the lower level's next forward
            (`Method.shared_forward`).
        reads_last_step: whether it reads each lower level's last optimizer step
            (`Method.reads_last_step`).
        double_backward: ``"always"``, ``"second_order"`` or ``"never"`` (`Method.double_backward`).

    Returns:
        The decorator; it returns ``fn`` unchanged.

    Raises:
        ValueError: (when decorating) a method called ``name`` is registered already.
    """

    def add(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"hypergradient method {name!r} is registered twice")
        _REGISTRY[name] = Method(name, fn, shared_forward, reads_last_step, double_backward)
        return fn

    return add


def unregister(name: str) -> None:
    """Remove the method called ``name`` (a method registered for a while, by a test say).

    Raises:
        ValueError: no method is called ``name``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown hypergradient method {name!r}; known: {sorted(_REGISTRY)}")
    del _REGISTRY[name]


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ValueError: an unknown name (listing the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown hypergradient method {name!r}; known: {sorted(_REGISTRY)}") from None


def shared_forward_methods() -> tuple[str, ...]:
    """The names of the methods that can take their step on the lower level's next forward."""
    return tuple(name for name, method in _REGISTRY.items() if method.shared_forward)
