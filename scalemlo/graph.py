"""The level graph: upper -> lower edges, validated into a DAG.

Edges point from an upper level to the levels directly below it. A level's
objective may read the parameters of the levels directly above it (its
hyperparameters) and of any level below it (what it learns through).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class LevelGraph:
    """A validated DAG over level names.

    Args:
        names: every level's name, in the order the user gave them.
        edges: upper name -> names of the levels directly below it.

    Raises:
        ValueError: unknown names, self-edges, duplicate names or a cycle.
    """

    def __init__(self, names: Iterable[str], edges: Mapping[str, Iterable[str]]):
        self.names: tuple[str, ...] = tuple(names)
        if len(set(self.names)) != len(self.names):
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"level names must be unique; repeated: {dupes}")
        if not isinstance(edges, Mapping):
            raise ValueError(f"edges must be a mapping upper name -> list of lower names, got {type(edges).__name__}")
        known = set(self.names)
        self._lowers: dict[str, tuple[str, ...]] = {n: () for n in self.names}
        self._uppers: dict[str, list[str]] = {n: [] for n in self.names}
        for upper, lowers in edges.items():
            if isinstance(lowers, str):
                lowers = [lowers]
            lowers = tuple(lowers)
            if upper not in known:
                raise ValueError(f"edges name an unknown level {upper!r}; known levels: {sorted(known)}")
            for lower in lowers:
                if lower not in known:
                    raise ValueError(
                        f"edge {upper!r} -> {lower!r} names an unknown level {lower!r}; known levels: {sorted(known)}"
                    )
                if lower == upper:
                    raise ValueError(f"self-edge {upper!r} -> {upper!r}: a level cannot be its own lower level")
            if len(set(lowers)) != len(lowers):
                raise ValueError(f"edges of {upper!r} repeat a lower level: {list(lowers)}")
            self._lowers[upper] = lowers
            for lower in lowers:
                self._uppers[lower].append(upper)
        self.order: tuple[str, ...] = self._topological_order()

    def _topological_order(self) -> tuple[str, ...]:
        """Upper levels before lower ones; raises on a cycle, naming it."""
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        order: list[str] = []

        def visit(name: str, stack: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = stack[stack.index(name) :] + [name]
                raise ValueError(f"the level graph has a cycle: {' -> '.join(cycle)}")
            state[name] = 1
            stack.append(name)
            for lower in self._lowers[name]:
                visit(lower, stack)
            stack.pop()
            state[name] = 2
            order.append(name)

        for name in self.names:
            visit(name, [])
        return tuple(reversed(order))

    def lowers(self, name: str) -> tuple[str, ...]:
        """Levels directly below ``name``."""
        return self._lowers[name]

    def uppers(self, name: str) -> tuple[str, ...]:
        """Levels directly above ``name``."""
        return tuple(self._uppers[name])

    def descendants(self, name: str) -> tuple[str, ...]:
        """Every level reachable downwards from ``name``, upper ones first."""
        seen: set[str] = set()
        stack = list(self._lowers[name])
        while stack:
            lower = stack.pop()
            if lower not in seen:
                seen.add(lower)
                stack.extend(self._lowers[lower])
        return tuple(n for n in self.order if n in seen)

    def leaves(self) -> tuple[str, ...]:
        """Levels with nothing below them."""
        return tuple(n for n in self.order if not self._lowers[n])
