"""The hypergradient methods' registry: each method's response function and what it needs, declared once.

A method is ``fn(problem: ResponseProblem) -> dict[upper name, Vector]`` returning
``-(d^2 f_X / dp_Y dp_X) . H_X^{-1} v`` for every upper Y of the problem, registered with what it needs
of the levels (`Method`). Every check that depends on the method (``LevelConfig``, ``Engine``'s
ZeRO-stage refusals, ``ReweightingTrainer``) and the table of needs in docs/methods.md read these
declarations; none names a method. `which_method_table` renders the README's "Which method" table
from them. Adding a method is one file with a decorated function, imported
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
PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)


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
        dense_hessian: whether it builds the lower level's dense Hessian (memory quadratic in its parameter
            count): for small levels only, so it is left out where a method for a large model is suggested.
        precisions: the precisions (of ``PRECISIONS``) its levels may train in, checked when the ``Engine``
            is built. All three by default: every hypergradient is evaluated in float32 at a low-precision
            level's own parameters (`scalemlo.precision`), whatever the method.
        cost: what one hypergradient costs beyond the upper level's meta gradient, in a few words (the
            "Which method" table shows it).
    """

    name: str
    fn: Callable[[Any], dict]
    shared_forward: bool = True
    reads_last_step: bool = False
    double_backward: str = "never"
    dense_hessian: bool = False
    precisions: tuple[str, ...] = PRECISIONS
    cost: str = ""

    def __post_init__(self) -> None:
        if self.double_backward not in DOUBLE_BACKWARD:
            raise ValueError(
                f"method {self.name!r}: double_backward={self.double_backward!r} is not known; allowed values: "
                f"{', '.join(DOUBLE_BACKWARD)}"
            )
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise ValueError(
                f"method {self.name!r}: precisions={self.precisions!r} must be a non-empty tuple of "
                f"{', '.join(PRECISIONS)}"
            )

    def __call__(self, problem: Any) -> dict:
        return self.fn(problem)

    def needs_double_backward(self, second_order: str) -> bool:
        """Whether, under ``LevelConfig.second_order``, it needs autograd through a gradient."""
        return self.double_backward == "always" or (
            self.double_backward == "second_order" and second_order == "autograd"
        )

    def lower_zero_stages(self, second_order: str) -> tuple[int, ...]:
        """The ZeRO stages a level below it may run at, under ``LevelConfig.second_order``.

        Stage 0 only for a method that reads the last step (ZeRO 1-3 keep the optimizer state in flat
        partitions); 0-2 for one that needs autograd through a gradient (ZeRO-3 parameters are partitioned).
        """
        if self.reads_last_step:
            return (0,)
        if self.needs_double_backward(second_order):
            return (0, 1, 2)
        return ZERO_STAGES

    def upper_zero_stages(self, second_order: str, shared_forward: bool = False) -> tuple[int, ...]:
        """The ZeRO stages the level it computes the hypergradient of may run at.

        0-2 where autograd must reach that level's parameters (double backward, or the shared forward's
        backward into it); any stage otherwise.
        """
        if self.needs_double_backward(second_order) or shared_forward:
            return (0, 1, 2)
        return ZERO_STAGES


_REGISTRY: dict[str, Method] = {}
METHODS: Mapping[str, Method] = MappingProxyType(_REGISTRY)
"""Name -> `Method`, read-only (``register`` adds to it)."""


def register(
    name: str,
    *,
    shared_forward: bool = True,
    reads_last_step: bool = False,
    double_backward: str = "never",
    dense_hessian: bool = False,
    precisions: tuple[str, ...] = PRECISIONS,
    cost: str = "",
) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the method called ``name``, with what it needs (see `Method`).

    Args:
        name: the name ``LevelConfig.method`` takes.
        shared_forward: whether it can take its step on the lower level's next forward
            (`Method.shared_forward`).
        reads_last_step: whether it reads each lower level's last optimizer step
            (`Method.reads_last_step`).
        double_backward: ``"always"``, ``"second_order"`` or ``"never"`` (`Method.double_backward`).
        dense_hessian: whether it builds the lower level's dense Hessian (`Method.dense_hessian`).
        precisions: the precisions its levels may train in (`Method.precisions`).
        cost: what a hypergradient costs beyond the meta gradient (`Method.cost`).

    Returns:
        The decorator; it returns ``fn`` unchanged.

    Raises:
        ValueError: (when decorating) a method called ``name`` is registered already.
    """

    def add(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"hypergradient method {name!r} is registered twice")
        _REGISTRY[name] = Method(
            name, fn, shared_forward, reads_last_step, double_backward, dense_hessian, tuple(precisions), cost
        )
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


def large_model_methods() -> tuple[str, ...]:
    """The names of the methods that do not build a dense Hessian (any model size)."""
    return tuple(name for name, method in _REGISTRY.items() if not method.dense_hessian)


def methods_help() -> str:
    """The registered methods in a few words, for a command line's help: those for any model size, then
    those for small models only (a dense Hessian)."""
    small = [name for name, method in _REGISTRY.items() if method.dense_hessian]
    text = ", ".join(large_model_methods())
    return f"{text} ({', '.join(small)}: small models only, a dense Hessian)" if small else text


def _stages(stages: tuple[int, ...]) -> str:
    return str(stages[0]) if len(stages) == 1 else f"{stages[0]}-{stages[-1]}"


def _zero_cell(method: Method, stages: Callable[[str], tuple[int, ...]]) -> str:
    plain, autograd = stages("finite_difference"), stages("autograd")
    if plain == autograd:
        return _stages(plain)
    return f'{_stages(plain)} ({_stages(autograd)} with `second_order="autograd"`)'


def which_method_table() -> str:
    """The "Which method" table of the README and docs/methods.md, rendered from the declarations.

    One row per registered method, sorted by name: the ZeRO stages allowed for the levels below it and
    for the level above (the one whose hypergradient it computes), the precisions, whether it can share
    the lower level's forward (an upper level at ZeRO 0-2 then), and its cost.

    Returns:
        The markdown table, one line per row, ending in a newline.
    """
    lines = [
        "| method | ZeRO below | ZeRO above | precision | shared forward | cost beyond the meta gradient |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(_REGISTRY):
        method = _REGISTRY[name]
        below = _zero_cell(method, method.lower_zero_stages)
        above = _zero_cell(method, method.upper_zero_stages)
        shared = f"yes (above: ZeRO {_stages(method.upper_zero_stages('finite_difference', True))})"
        lines.append(
            f"| `{name}` | {below} | {above} | {', '.join(method.precisions)} | "
            f"{shared if method.shared_forward else 'no'} | {method.cost} |"
        )
    return "\n".join(lines) + "\n"
