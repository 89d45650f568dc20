"""What a hypergradient method is given, and the products it may form.

A method answers one question about one lower level X and the levels Y
directly above it that the hypergradient flows into:

    response_Y = -(d^2 f_X / dp_Y dp_X) . H_X^{-1} v        for every Y

where v is the adjoint (the gradient of the owner's objective that has
reached X's parameters) and H_X = d^2 f_X / dp_X^2. Every method approximates
H_X^{-1} v its own way and uses the products below; none of them touches an
optimizer, and every evaluation of f_X leaves X's parameters bit-identical.

Vectors on X are shaped like ``lower.coords``: X's whole parameters, or at
ZeRO-3 this rank's partitions of them. Reductions over such vectors go
through ``problem.space`` (``dot``, ``norm``, ``max_abs``), which sums over
ranks when the vector is partitioned; a method that uses them stays correct
at every ZeRO stage and rank count. Every evaluation (and the coordinator's
first one) ends by re-partitioning anything ZeRO-3 gathered (``release``),
so a method may write ``coords`` between evaluations and the next forward
sees the write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from scalemlo.hypergrad import vectors as V
from scalemlo.level import Level, frozen


@dataclass
class ResponseProblem:
    """One lower level, the uppers to answer for, and the adjoint v.

    Attributes:
        lower: the level X whose Hessian is (approximately) inverted.
        uppers: the levels Y whose responses are wanted (directly above X).
        v: adjoint, shaped like ``lower.coords`` (same dtypes), the same on
            every rank (or this rank's slice); it belongs to the method, which
            may overwrite it to save a buffer.
        config: the LevelConfig of the level whose hypergradient is computed.
        state: the method's own memory for this (owner, lower) pair.
        everyone: every level of the program (to hold the others fixed).
        rng_state: CPU generator state replayed before each evaluation, so
            dropout and sampling are identical at every perturbed point.
    """

    lower: Level
    uppers: list[Level]
    v: V.Vector
    config: Any
    state: dict
    everyone: Sequence[Level]
    rng_state: torch.Tensor = field(repr=False)

    @property
    def space(self) -> V.Space:
        """Reductions over X's vectors (sums over ranks when they are partitioned)."""
        return self.lower.backend.space

    @property
    def coords(self) -> list[torch.Tensor]:
        """X's parameters as the vectors see them (whole, or this rank's ZeRO-3 partitions)."""
        return self.lower.backend.coords

    def release(self) -> None:
        """Re-partition what ZeRO-3 gathered, so writes into ``coords`` reach the next forward."""
        self.lower.backend.release_gathered()

    # ---- evaluations ------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluating(self, trainable: Sequence[Level]):
        others = [lv for lv in self.everyone if all(lv is not t for t in trainable)]
        try:
            with torch.random.fork_rng(devices=[]), frozen(others):
                torch.set_rng_state(self.rng_state)
                yield
        finally:
            self.release()

    def lower_loss(self) -> torch.Tensor:
        """f_X on X's current batch (the caller decides what requires grad)."""
        return self.lower.loss(self.lower.current_batch())

    def upper_grads(self) -> dict[str, V.Vector]:
        """dF_X/dp_Y at the current point, for every upper Y (one backward to the uppers only)."""
        with self._evaluating(self.uppers):
            params = [p for y in self.uppers for p in y.params]
            grads = V.grads_or_zeros(torch.autograd.grad(self.lower_loss(), params, allow_unused=True), params)
        return self._split(grads)

    def lower_grad(self, create_graph: bool = False) -> V.Vector:
        """d f_X / dp_X at the current point, in the layout of ``coords``, averaged over ranks."""
        with self._evaluating([self.lower]):
            if create_graph:
                self.require_autograd("a dense Hessian")
                params = self.lower.params
                grads = torch.autograd.grad(self.lower_loss(), params, allow_unused=True, create_graph=True)
                return V.grads_or_zeros(grads, params)
            return self.lower.backend.gradient(self.lower_loss())

    def require_autograd(self, what: str) -> None:
        if self.lower.backend.partitioned:
            raise ValueError(
                f"level {self.lower.name!r} is ZeRO-3 partitioned, where autograd cannot differentiate twice; "
                f"{what} needs double backward. Use second_order='finite_difference' (neumann, cg) or another "
                "method (finite_difference, penalty)"
            )

    # ---- second-order products ------------------------------------------------
    def hvp(self, w: Sequence[torch.Tensor]) -> V.Vector:
        """H_X w, by double backward or by a central difference of gradients (``config.second_order``)."""
        if self.config.second_order == "finite_difference":
            return self.central_difference(V.clone(w), self.config.fd_radius, lambda: [self.lower_grad()])[0]
        self.require_autograd("second_order='autograd'")
        with self._evaluating([self.lower]):
            params = self.lower.params
            grads = torch.autograd.grad(self.lower_loss(), params, create_graph=True, allow_unused=True)
            pairs = [(g, wi) for g, wi in zip(grads, w) if g is not None]
            if not pairs:
                return V.zeros_like(params)
            inner = sum((g * wi.detach()).sum() for g, wi in pairs)
            out = torch.autograd.grad(inner, params, allow_unused=True)
        out = V.grads_or_zeros(out, params)
        self.lower.backend.average(out)
        return out

    def mixed_autograd(self, w: Sequence[torch.Tensor]) -> dict[str, V.Vector]:
        """(d^2 f_X / dp_Y dp_X) w for every upper Y, by double backward."""
        self.require_autograd("second_order='autograd'")
        with self._evaluating([self.lower, *self.uppers]):
            params = self.lower.params
            upper_params = [p for y in self.uppers for p in y.params]
            grads = torch.autograd.grad(self.lower_loss(), params, create_graph=True, allow_unused=True)
            pairs = [(g, wi) for g, wi in zip(grads, w) if g is not None]
            if not pairs:
                return self._split(V.zeros_like(upper_params))
            inner = sum((g * wi.detach()).sum() for g, wi in pairs)
            out = torch.autograd.grad(inner, upper_params, allow_unused=True)
        return self._split(V.grads_or_zeros(out, upper_params))

    def mixed_difference(self, w: V.Vector, radius: float) -> dict[str, V.Vector]:
        """(d^2 f_X / dp_Y dp_X) w for every upper Y, by a central difference.

        Needs only gradients with respect to the uppers at X's parameters
        moved to p_X +- eps w (eps = radius / ||w||): for data reweighting that
        backward never enters X's model. ``w`` is overwritten.
        """
        (grads,) = self.central_difference(w, radius, lambda: [self._flat_upper_grads()])
        return self._split(grads)

    def mixed(self, w: V.Vector) -> dict[str, V.Vector]:
        """The mixed product by ``config.second_order``."""
        if self.config.second_order == "finite_difference":
            return self.mixed_difference(w, self.config.fd_radius)
        return self.mixed_autograd(w)

    def central_difference(self, w: V.Vector, radius: float, evaluate: Callable[[], list[V.Vector]]) -> list[V.Vector]:
        """[evaluate(p + eps w) - evaluate(p - eps w)] / 2 eps on X's parameters, exactly restored.

        ``w`` is overwritten (it holds the realized step afterwards).
        """
        size = float(self.space.norm(w))
        if size == 0.0:
            return [V.zeros_like(t) for t in evaluate()]
        eps = radius / size
        with V.perturbed(self.coords, w, eps):
            plus = evaluate()
        with V.perturbed(self.coords, w, -1.0):
            minus = evaluate()
        return [[(a - b) / (2 * eps) for a, b in zip(pa, pb)] for pa, pb in zip(plus, minus)]

    def _flat_upper_grads(self) -> V.Vector:
        grads = self.upper_grads()
        return [g for y in self.uppers for g in grads[y.name]]

    def _split(self, flat: Sequence[torch.Tensor]) -> dict[str, V.Vector]:
        out, i = {}, 0
        for y in self.uppers:
            out[y.name] = list(flat[i : i + len(y.params)])
            i += len(y.params)
        return out


def negate(responses: dict[str, V.Vector]) -> dict[str, V.Vector]:
    """-x for every vector of a response dict."""
    return {name: [-t for t in vec] for name, vec in responses.items()}
