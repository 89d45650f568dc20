"""Vector algebra on lists of parameter-shaped tensors, and exact perturbation.

A "vector" is a list of tensors shaped like a level's trainable parameters.
Everything here is elementwise or a local reduction, so it runs unchanged on
the local shards of ZeRO-3-partitioned parameters. Reductions that must see
the whole vector (dot products, norms, the largest entry) go through
`AcrossRanks`, which knows whether a level's vectors are whole on every
rank or one shard per rank, and makes every rank agree on the result.

Naming: a function whose name ends in ``_`` writes one of its vector
arguments (as in torch); every other function leaves its inputs alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

Vector = list[torch.Tensor]


_CHUNK = 1 << 20  # elements per slice of a reduction (4 MB in float32: reused by the allocator)


def _local_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum(x * y) as a float64 0-d tensor, on x's device.

    torch.dot / vector_norm accumulate float32 sums with visible error on 10^7
    elements (2e-4 and 3e-3 relative, measured); an elementwise product and
    sum() (cascade summation) is accurate, and avoids a float64 copy. Taken
    slice by slice, so no parameter-sized temporary is allocated (a fresh
    500 MB product per tensor made a norm at 124M cost 0.2 s instead of 0.03 s).
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    fx, fy = x.reshape(-1), y.reshape(-1)
    if fx.numel() <= _CHUNK:
        return (fx * fy).sum().double()
    parts = [(fx[i : i + _CHUNK] * fy[i : i + _CHUNK]).sum() for i in range(0, fx.numel(), _CHUNK)]
    return torch.stack(parts).double().sum()


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """<a, b> as a float64 0-d tensor (per-tensor sums accumulated in float64)."""
    local = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        local = local + _local_dot(x, y).cpu()
    return local


def max_abs(a: Sequence[torch.Tensor]) -> float:
    """Largest absolute entry of the whole vector (NaN if an entry is NaN).

    From each tensor's smallest and largest entry (one pass, no temporary:
    abs() would allocate a parameter-sized copy, 15x slower).
    """
    top = 0.0
    for x in a:
        if x.numel():
            lo, hi = torch.aminmax(x)
            value = float(torch.maximum(-lo, hi))
            if value != value:
                return value
            top = max(top, value)
    return top


def norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of the whole vector, as a float64 0-d tensor."""
    return squared_norm(a).sqrt()


def squared_norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of the whole vector, as a float64 0-d tensor.

    A tensor whose squares would underflow or overflow its dtype (a 1e-22
    gradient in float32 has a squared norm below the smallest subnormal) is
    scaled by its largest entry first; the others are summed directly.
    """
    total = torch.zeros((), dtype=torch.float64)
    for x in a:
        if not x.numel():
            continue
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        direct = _local_dot(x, x).cpu()
        # finite and with a mean square well above the dtype's smallest normal: no square was lost
        if torch.isfinite(direct) and float(direct) > torch.finfo(x.dtype).tiny * 1e6 * x.numel():
            total = total + direct
            continue
        top = max_abs([x])  # NaN or inf entries give a NaN total below, as they should
        if top == 0.0:
            continue
        scaled = x / top
        total = total + _local_dot(scaled, scaled).cpu() * top * top
    return total


class AcrossRanks:
    """Reductions over a level's vectors that every rank agrees on.

    A level's vectors are either whole on every rank (ZeRO 0-2: each rank holds
    the same vector) or sharded (ZeRO-3: each rank holds its slice of every
    parameter). Dot products, norms and the largest entry are first taken
    locally, then, when there are several ranks, all-reduced: summed over
    shards, or averaged for whole vectors (which are equal on every rank, so
    the average is the value). Either way every rank gets the same number and
    takes the same branch: a method that stopped early on one rank only would
    leave the others waiting in the next collective, and a vector that was
    wrongly left unequal across ranks shows up as a wrong number instead of a
    hang.

    Args:
        world_size: the size of ``group``.
        sharded: whether the vectors are ZeRO-3 shards (summed over ranks) rather than whole (averaged).
        group: the level's data-parallel process group (None: all ranks).
    """

    def __init__(self, world_size: int = 1, sharded: bool = False, group=None):
        self.world_size = world_size  # the size of ``group``
        self.sharded = sharded
        self.group = group  # the level's data-parallel process group (None: all ranks)

    def _agree(self, local: torch.Tensor, op: str = "sum") -> torch.Tensor:
        # ``local`` is always a fresh local result (a CPU float64 scalar): reduced in place, on the
        # device the process group needs (scalemlo.distributed.collective_device: a GPU under NCCL).
        if self.world_size > 1:
            from scalemlo.distributed import reduced_scalar_

            reduced_scalar_(local, "max" if op == "max" else "sum", self.group)
            if op != "max" and not self.sharded:
                local /= self.world_size
        return local

    def dot(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
        """<a, b> over the whole vector (float64 0-d tensor)."""
        return self._agree(dot(a, b))

    def norm(self, a: Sequence[torch.Tensor]) -> torch.Tensor:
        """||a|| over the whole vector (float64 0-d tensor)."""
        return self._agree(squared_norm(a)).sqrt()

    def max_abs(self, a: Sequence[torch.Tensor]) -> float:
        """Largest absolute entry over the whole vector."""
        return float(self._agree(torch.tensor(max_abs(a), dtype=torch.float64), op="max"))

    def is_zero(self, a: Sequence[torch.Tensor]) -> bool:
        """True when every entry of the whole vector is zero."""
        return self.max_abs(a) == 0.0


def clone(a: Sequence[torch.Tensor]) -> Vector:
    """A detached copy."""
    return [x.detach().clone() for x in a]


def zeros_like(a: Sequence[torch.Tensor]) -> Vector:
    """Zeros shaped like ``a``."""
    return [torch.zeros_like(x) for x in a]


def scale(a: Sequence[torch.Tensor], alpha: float) -> Vector:
    """alpha * a (new tensors)."""
    return [x * alpha for x in a]


def add(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], alpha: float = 1.0) -> Vector:
    """a + alpha * b (new tensors)."""
    return [x + alpha * y for x, y in zip(a, b)]


def axpy_(y: Sequence[torch.Tensor], x: Sequence[torch.Tensor], alpha: float = 1.0) -> None:
    """y += alpha * x, in place (outside autograd: y may be parameters)."""
    with torch.no_grad():
        for yi, xi in zip(y, x):
            yi.add_(xi.to(yi.dtype), alpha=alpha)


def grads_or_zeros(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> Vector:
    """autograd.grad(..., allow_unused=True) output with None replaced by zeros.

    Every tensor returned is a contiguous tensor of its own, safe to modify
    in place: autograd may hand back a view or an expansion (the gradient of
    ``p.sum()`` is a stride-0 expansion) or one tensor for two inputs (the
    gradient of ``x + y``); those are copied, the usual fresh gradient is not.
    """
    out, seen = [], set()
    for g, p in zip(grads, like):
        if g is None:
            g = torch.zeros_like(p)
        elif g._is_view() or not g.is_contiguous() or g.data_ptr() in seen:
            g = g.clone(memory_format=torch.contiguous_format)
        seen.add(g.data_ptr())
        out.append(g)
    return out


# Perturbation works on pieces of at most this many elements, so its two
# scratch buffers stay small (16 MB in float32) even for a 38M-element embedding.
_CHUNK = 1 << 22


def _pieces(p: torch.Tensor, d: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if p.numel() > _CHUNK and p.is_contiguous() and d.is_contiguous():
        return list(zip(p.view(-1).split(_CHUNK), d.view(-1).split(_CHUNK)))
    return [(p, d)]


@contextlib.contextmanager
def moved_(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], eps: float):
    """Move ``params`` to ``fl(params + eps * direction)`` and back, bit for bit; consumes ``direction``.

    For a caller that needs no realized step afterwards (the shared forward's one-sided difference):
    ``direction``'s storage keeps the parameters' values while they are moved (a swap through one
    scratch buffer of at most ``_CHUNK`` elements), and the restore copies them back. About a fifth
    of the cost of keeping the realized step and patching the inexact elements on the way back
    (``perturbed_`` in ``benchmarks/cost_units.py``; 124M parameters, one thread: 0.15 s against 0.66 s).
    Writes through ``p.data``: the writes do not bump the parameters' version counters, so a graph that
    saved them before the move (the shared forward's) stays usable after the exact restore. Afterwards
    ``direction`` holds the parameters' values, not the direction.

    Args:
        params: the parameters (or their partitions) to move.
        direction: the direction, in the parameters' dtype or wider; its storage is consumed.
        eps: the step size.

    Raises:
        ValueError: a direction narrower than its parameter's dtype (it could not keep the values exactly).
    """
    params = [p.data for p in params]
    for p, d in zip(params, direction):
        if torch.promote_types(p.dtype, d.dtype) != d.dtype:  # d would not hold p's values exactly
            raise ValueError(
                f"moved_: a {d.dtype} direction cannot keep a {p.dtype} parameter's values for the exact "
                "restore; pass the direction in the parameter's dtype (or wider)"
            )
    pieces = [piece for p, d in zip(params, direction) for piece in _pieces(p, d)]
    largest = max((p.numel() for p, _ in pieces), default=0)
    with torch.no_grad():
        scratch_buf = pieces[0][0].new_empty(largest) if largest else None
        for p, d in pieces:
            scratch = scratch_buf[: p.numel()].view_as(p)
            torch.add(p, d.to(p.dtype), alpha=eps, out=scratch)
            d.copy_(p)
            p.copy_(scratch)
        del scratch_buf
    try:
        yield
    finally:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.copy_(d)


@contextlib.contextmanager
def mirrored_(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], eps: float):
    """Central-difference points: ``params`` at ``p+``, then at its mirror point, then back bit for bit.

    ``params`` move to ``p+ = fl(p + eps * direction)``, then (on the yielded call) to the mirror point
    ``fl(p - (p+ - p))``, then back to ``p`` bit for bit; consumes ``direction``.

    The two points are p ± r with r = p+ - p the realized step (r is exact where p and p+ are within a
    factor 2, and the mirror point is rounded once), at about three passes over the parameters in all
    (`moved_` keeps p in ``direction``'s storage; the mirror point is one ``lerp``: p+ + 2 (p - p+);
    the restore one copy) where recording r and patching the restore takes about twelve.
    Writes through ``p.data`` (no version-counter change). Afterwards ``direction`` holds the
    parameters' values, not the direction.

    Args:
        params: the parameters (or their partitions) to move.
        direction: the direction, in the parameters' dtype or wider; its storage is consumed.
        eps: the step size.

    Yields:
        A function that moves the parameters to the mirror point.
    """
    with moved_(params, direction, eps):

        def to_mirror() -> None:
            with torch.no_grad():
                for p, d in zip(params, direction):  # d holds p's values (same dtype or wider)
                    p.data.lerp_(d.to(p.dtype), 2.0)  # p+ + 2 (p - p+) = p - r

        yield to_mirror


@contextlib.contextmanager
def swapped_(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """Exchange the contents of ``params`` and ``values`` in place for a while (exact); writes both."""

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
