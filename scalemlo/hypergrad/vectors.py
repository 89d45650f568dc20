"""Vector algebra on lists of parameter-shaped tensors, and exact perturbation.

A "vector" is a list of tensors shaped like a level's trainable parameters.
Everything here is elementwise or a local reduction, so it runs unchanged on
the local partitions of ZeRO-sharded parameters; the one place a reduction
across ranks is needed is marked by ``reduce_sum``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

Vector = list[torch.Tensor]


def reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a per-rank partial reduction over the ranks that share a partition.

    With ZeRO-0 every rank holds whole parameters, so nothing is summed; ZeRO-3
    will all-reduce here.
    """
    return value


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """<a, b> accumulated in float64 (a 0-d tensor)."""
    local = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    return reduce_sum(torch.as_tensor(local, dtype=torch.float64))


def norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of the whole vector, in float64."""
    return dot(a, a).sqrt()


def clone(a: Sequence[torch.Tensor]) -> Vector:
    return [x.detach().clone() for x in a]


def zeros_like(a: Sequence[torch.Tensor]) -> Vector:
    return [torch.zeros_like(x) for x in a]


def scale(a: Sequence[torch.Tensor], alpha: float) -> Vector:
    return [x * alpha for x in a]


def add(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], alpha: float = 1.0) -> Vector:
    """a + alpha * b (new tensors)."""
    return [x + alpha * y for x, y in zip(a, b)]


def axpy_(y: Sequence[torch.Tensor], x: Sequence[torch.Tensor], alpha: float = 1.0) -> None:
    """y += alpha * x, in place (outside autograd: y may be parameters)."""
    with torch.no_grad():
        for yi, xi in zip(y, x):
            yi.add_(xi.to(yi.dtype), alpha=alpha)


def is_zero(a: Sequence[torch.Tensor]) -> bool:
    return all(not bool(x.any()) for x in a)


def grads_or_zeros(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> Vector:
    """autograd.grad(..., allow_unused=True) output with None replaced by zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


@contextlib.contextmanager
def perturbed(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], eps: float):
    """Move ``params`` to ``params + eps * direction`` and back, bit for bit.

    ``p + eps*d - eps*d`` is not ``p`` in floating point (Betty leaves lower
    levels perturbed this way). Here the realized step ``r = fl(p + eps*d) - p``
    is kept in place of ``direction`` (so ``direction`` is overwritten, and no
    second parameter-sized buffer is needed); restoring subtracts ``r`` and
    patches the few elements where that is not exact (tiny ``p`` next to a
    large step) from a sparse record. Peak extra memory: one parameter tensor.

    Yields nothing; while inside, ``direction`` holds the realized step.
    """
    fixes: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    with torch.no_grad():
        for p, d in zip(params, direction):
            before = p.detach().clone()
            p.add_(d.to(p.dtype), alpha=eps)
            d.copy_(p - before)
            wrong = (p - d) != before
            fixes.append((wrong.nonzero(as_tuple=True), before[wrong]) if bool(wrong.any()) else None)
            del before
    try:
        yield
    finally:
        with torch.no_grad():
            for p, d, fix in zip(params, direction, fixes):
                p.sub_(d.to(p.dtype))
                if fix is not None:
                    p[fix[0]] = fix[1]


@contextlib.contextmanager
def swapped(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """Exchange the contents of ``params`` and ``values`` in place for a while (exact)."""

    def swap() -> None:
        with torch.no_grad():
            for p, v in zip(params, values):
                tmp = p.detach().clone()
                p.copy_(v)
                v.copy_(tmp)

    swap()
    try:
        yield
    finally:
        swap()
