"""What a hypergradient method is given, and the products it may form.

A method answers one question about one lower level X and the levels Y
directly above it that the hypergradient flows into:

    response_Y = -(d^2 f_X / dp_Y dp_X) . H_X^{-1} v        for every Y

where v is the adjoint (the gradient of the owner's objective that has
reached X's parameters) and H_X = d^2 f_X / dp_X^2. Every method approximates
H_X^{-1} v its own way and uses the products below; none of them touches an
optimizer, and every evaluation of f_X leaves X's parameters bit-identical.

f_X is X's objective as its last optimizer step saw it: the mean of its loss
over that step's micro-batches (``Level.objective_batches``; one batch
without gradient accumulation). Every evaluation replays the same random
state, so dropout masks agree between perturbed points.

Vectors on X are shaped like ``lower.backend.local_shards``: X's whole
parameters, or at ZeRO-3 this rank's partition of each. Reductions over such
vectors go through ``problem.across_ranks`` (``dot``, ``norm``, ``max_abs``),
which makes every rank agree; a method that uses them stays correct at every
ZeRO stage and rank count. Every evaluation (and the coordinator's first one)
ends by re-partitioning anything ZeRO-3 gathered, so a method may write
``local_shards`` between evaluations and the next forward sees the write.

Naming: a product whose name ends in ``_`` takes its vector argument's
storage (the caller must not use that vector afterwards); the others leave
their inputs alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from scalemlo import vectors
from scalemlo.level import Level, frozen
from scalemlo.methods import METHODS
from scalemlo.precision import autocast_outside
from scalemlo.rng import RandomState


@contextlib.contextmanager
def replayed_and_frozen(rng_state: RandomState | torch.Tensor, all_levels: Sequence[Level], trainable: Sequence[Level]):
    """Replay a random state (CPU and CUDA generators) and freeze every level but ``trainable`` for one evaluation.

    Every evaluation within one hypergradient starts from the same generator
    state, so dropout masks and sampling agree between perturbed points (a
    difference of two different masks is noise); the caller's generator is
    left as it was. Levels outside ``trainable`` get ``requires_grad=False``,
    so no backward writes into them or builds a graph for them.

    Args:
        rng_state: the state to replay (a bare tensor is a CPU generator state).
        all_levels: every level of the program.
        trainable: the levels left trainable.
    """
    others = [lv for lv in all_levels if all(lv is not t for t in trainable)]
    with RandomState.of(rng_state).replayed(), frozen(others):
        yield


@dataclass
class ResponseProblem:
    """One lower level, the uppers to answer for, and the adjoint v.

    Attributes:
        lower: the level X whose Hessian is (approximately) inverted.
        uppers: the levels Y whose responses are wanted (directly above X).
        v: adjoint, shaped like ``lower.backend.local_shards``, the same on
            every rank (or this rank's shard). Read it; a method that wants its
            storage for w takes it with `take_v`.
        config: the LevelConfig of the level whose hypergradient is computed.
        state: the method's own memory for this (owner, lower) pair.
        all_levels: every level of the program (to hold the others fixed).
        rng_state: the random state replayed before each evaluation (CPU and CUDA generators).
        shared: the lower level's forward on the batch of its step in progress
            (``LevelConfig.shared_forward``), or None. When set, that batch is X's
            objective, the mixed products come from the shared-forward estimator
            (`scalemlo.hypergrad.shared_forward`) and `step_lrs` are the
            coming step's.
    """

    lower: Level
    uppers: list[Level]
    v: vectors.Vector | None
    config: Any
    state: dict
    all_levels: Sequence[Level]
    rng_state: RandomState | torch.Tensor = field(repr=False)
    shared: Any = None

    @property
    def across_ranks(self) -> vectors.AcrossRanks:
        """Reductions over X's vectors that every rank agrees on."""
        return self.lower.backend.across_ranks

    @property
    def local_shards(self) -> list[torch.Tensor]:
        """X's parameters as its vectors see them (whole, or this rank's ZeRO-3 partitions)."""
        return self.lower.backend.local_shards

    def step_lrs(self) -> list[float]:
        """Per parameter of X, the learning rate of the step the hypergradient differentiates.

        That step is the last one, or with a shared forward the one in progress.
        """
        backend = self.lower.backend
        return backend.current_lrs() if self.shared is not None else backend.step_lrs()

    def objective_batches(self) -> list[Any]:
        """The batches of X's objective: those of its last step, or the shared forward's batch."""
        return [self.shared.batch] if self.shared is not None else self.lower.objective_batches()

    def take_v(self) -> vectors.Vector:
        """Hand the adjoint's storage to the method (``v`` is None afterwards), to build w in place."""
        v, self.v = self.v, None
        return v

    # ---- evaluations ------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluating(self, trainable: Sequence[Level]) -> Iterator[None]:
        try:
            with replayed_and_frozen(self.rng_state, self.all_levels, trainable):
                yield
        finally:
            self.lower.backend.release_gathered()

    def _summed_over_batches(self, per_loss: Callable[[torch.Tensor], vectors.Vector]) -> vectors.Vector:
        """sum over X's objective batches b of per_loss(loss_b / k): a linear map applied to f_X."""
        batches = self.objective_batches()
        total: vectors.Vector | None = None
        for i, batch in enumerate(batches):
            self.lower.evaluating_batch(i)
            part = per_loss(self.lower.loss(batch) / len(batches))
            total = part if total is None else [a.add_(b) for a, b in zip(total, part)]
        return total

    def evaluate_held(self) -> None:
        """X's loss on its objective batches at the current point, without gradient.

        The values its ``training_step`` passes to ``Level.held`` are then held from here (the coordinator
        calls it inside ``lower.holding()`` before the method, for a level that uses ``held``).
        """
        with self._evaluating([]), torch.no_grad():
            for i, batch in enumerate(self.objective_batches()):
                self.lower.evaluating_batch(i)
                self.lower.loss(batch)

    def _held_from_shared_forward(self) -> None:
        """With a shared forward, before the first product that evaluates X's objective (called at an
        unmoved point): run the step's forward and hold its losses, as ``training_step`` would."""
        if self.shared is not None and self.lower.held_inputs.empty:
            self.lower.prime_held(0, [self.shared.forward(self.all_levels)])

    def upper_grads(self) -> dict[str, vectors.Vector]:
        """dF_X/dp_Y at the current point, for every upper Y (one backward to the uppers only).

        A ZeRO-3 upper's gradient comes through its engine, in the layout of its ``local_shards`` and
        averaged over ranks (a rank average of the per-rank products is the product of the whole
        objective, ``w`` being the same on every rank); the others' are this rank's.
        """
        self._held_from_shared_forward()
        whole = [p for y in self.uppers if not y.backend.partitioned for p in y.params]
        partitioned = [y for y in self.uppers if y.backend.partitioned]

        def per_loss(loss: torch.Tensor) -> vectors.Vector:
            out = []
            if whole:
                grads = torch.autograd.grad(loss, whole, allow_unused=True, retain_graph=bool(partitioned))
                out = vectors.grads_or_zeros(grads, whole)
            parts = {
                y.name: y.backend.gradient(loss, retain_graph=k < len(partitioned) - 1)
                for k, y in enumerate(partitioned)
            }
            merged, i = [], 0
            for y in self.uppers:
                if y.backend.partitioned:
                    merged += parts[y.name]
                else:
                    merged += out[i : i + len(y.params)]
                    i += len(y.params)
            return merged

        with self._evaluating(self.uppers):
            grads = self._summed_over_batches(per_loss)
        for y in partitioned:
            y.backend.release_gathered()
        return self._split(grads)

    def lower_grad(self) -> vectors.Vector:
        """d f_X / dp_X at the current point, in the layout of ``local_shards``, averaged over ranks."""
        self._held_from_shared_forward()
        with self._evaluating([self.lower]):
            return self._summed_over_batches(self.lower.backend.gradient)

    def lower_grad_graph(self) -> vectors.Vector:
        """d f_X / dp_X with its graph kept (``create_graph``), for second derivatives; this rank's data only."""
        self.require_autograd("a dense Hessian")
        self._held_from_shared_forward()
        params = self.lower.params
        with self._evaluating([self.lower]):
            return self._summed_over_batches(
                lambda loss: vectors.grads_or_zeros(
                    torch.autograd.grad(loss, params, allow_unused=True, create_graph=True), params
                )
            )

    def require_autograd(self, what: str) -> None:
        """Refuse double backward on a ZeRO-3 partitioned X.

        Args:
            what: what needs double backward (named in the error).

        Raises:
            ValueError: X is ZeRO-3 partitioned.
        """
        if self.lower.backend.partitioned:
            # methods that reach a ZeRO-3 level with differences of gradients only, and those that always do
            first_order = [m.name for m in METHODS.values() if 3 in m.lower_zero_stages("autograd")]
            differences = [
                m.name
                for m in METHODS.values()
                if 3 in m.lower_zero_stages("finite_difference") and m.name not in first_order
            ]
            raise ValueError(
                f"level {self.lower.name!r} is ZeRO-3 partitioned, where autograd cannot differentiate twice; "
                f"{what} needs double backward. Use second_order='finite_difference' ({', '.join(differences)}) "
                f"or another method ({', '.join(first_order)})"
            )

    # ---- second-order products ------------------------------------------------
    def _double_backward(self, w: Sequence[torch.Tensor], wrt: list[torch.Tensor]) -> Callable:
        """loss -> d/d(wrt) <d loss/dp_X, w>: one Hessian-vector (wrt = p_X) or mixed (wrt = p_Y) product."""
        params = self.lower.params

        def product(loss: torch.Tensor) -> vectors.Vector:
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(g, wi) for g, wi in zip(grads, w) if g is not None]
            if not pairs:
                return vectors.zeros_like(wrt)
            inner = sum((g * wi.detach()).sum() for g, wi in pairs)
            return vectors.grads_or_zeros(torch.autograd.grad(inner, wrt, allow_unused=True), wrt)

        return product

    def hvp(self, w: Sequence[torch.Tensor]) -> vectors.Vector:
        """H_X w, averaged over ranks, by double backward or by a central difference of gradients."""
        self._held_from_shared_forward()
        if self.config.second_order == "finite_difference":
            step = vectors.clone(w)
            return self.central_difference_(step, self.config.fd_radius, lambda: [self.lower_grad()])[0]
        self.require_autograd("second_order='autograd'")
        with self._evaluating([self.lower]):
            out = self._summed_over_batches(self._double_backward(w, self.lower.params))
        self.lower.backend.average_over_ranks(out)
        return out

    def mixed_autograd(self, w: Sequence[torch.Tensor]) -> dict[str, vectors.Vector]:
        """(d^2 f_X / dp_Y dp_X) w for every upper Y, by double backward (this rank's data)."""
        self.require_autograd("second_order='autograd'")
        self._held_from_shared_forward()
        upper_params = [p for y in self.uppers for p in y.params]
        with self._evaluating([self.lower, *self.uppers]):
            out = self._summed_over_batches(self._double_backward(w, upper_params))
        return self._split(out)

    def mixed_difference_(self, w: vectors.Vector, radius: float) -> dict[str, vectors.Vector]:
        """(d^2 f_X / dp_Y dp_X) w for every upper Y, by a central difference; takes ``w``'s storage.

        Needs only gradients with respect to the uppers at X's parameters
        moved to p_X +- eps w (eps = radius / ||w||): for data reweighting that
        backward never enters X's model. With a shared forward: the one-sided
        estimator (`shared_mixed_`, the protocol in `scalemlo.hypergrad.shared_forward`) instead.

        Args:
            w: the vector, in the layout of ``local_shards``; its storage is taken.
            radius: how far X's parameters move (eps = radius / ||w||); a shared forward uses its own.
        """
        if self.shared is not None:
            return shared_mixed_(self, w)  # its own radius (LevelConfig.shared_forward_radius)
        (grads,) = self.central_difference_(w, radius, lambda: [self._flat_upper_grads()])
        return self._split(grads)

    def mixed_(self, w: vectors.Vector) -> dict[str, vectors.Vector]:
        """The mixed product by ``config.second_order`` (a shared forward's estimator when there is one).

        May take ``w``'s storage.
        """
        if self.config.second_order == "finite_difference" or self.shared is not None:
            return self.mixed_difference_(w, self.config.fd_radius)
        return self.mixed_autograd(w)

    def central_difference_(
        self, direction: vectors.Vector, radius: float, evaluate: Callable[[], list[vectors.Vector]]
    ) -> list[vectors.Vector]:
        """[evaluate(p + eps d) - evaluate(p - eps d)] / 2 eps on X's parameters, exactly restored.

        eps = radius / ||d||, so the parameters move by ``radius`` whatever the
        scale of d. Takes ``direction``'s storage: it holds the parameters'
        values meanwhile (no second parameter-sized buffer), nothing useful
        afterwards. The two points are p ± r, r = fl(p + eps d) - p
        (``vectors.mirrored_``).

        Args:
            direction: d, in the layout of ``local_shards``; its storage is taken.
            radius: how far the parameters move.
            evaluate: the function differenced, returning a list of vectors.

        Returns:
            The differences, one per vector ``evaluate`` returns.
        """
        size = float(self.across_ranks.norm(direction))
        if size == 0.0:
            return [vectors.zeros_like(t) for t in evaluate()]
        eps = radius / size
        with vectors.mirrored_(self.local_shards, direction, eps) as to_mirror:
            plus = evaluate()
            to_mirror()
            minus = evaluate()
        return [[(a - b) / (2 * eps) for a, b in zip(pa, pb)] for pa, pb in zip(plus, minus)]

    def _flat_upper_grads(self) -> vectors.Vector:
        grads = self.upper_grads()
        return [g for y in self.uppers for g in grads[y.name]]

    def _split(self, flat: Sequence[torch.Tensor]) -> dict[str, vectors.Vector]:
        out, i = {}, 0
        for y in self.uppers:
            out[y.name] = list(flat[i : i + len(y.params)])
            i += len(y.params)
        return out


def negate(responses: dict[str, vectors.Vector]) -> dict[str, vectors.Vector]:
    """-x for every vector of a response dict."""
    return {name: [-t for t in vec] for name, vec in responses.items()}


# ---- the shared forward's estimator of the mixed product (LevelConfig.shared_forward; see
# scalemlo.hypergrad.shared_forward for the protocol and its cost) ----------------------------------------

DEFAULT_RADIUS = {torch.float64: 1e-5}  # other dtypes: 1e-3
FALLBACK_RADIUS = 1e-3


def is_central(problem: ResponseProblem) -> bool:
    """Whether the shared forward's difference is central.

    It is when asked for, and always for a low-precision lower level (or one trained under autocast),
    whose step's forward (bf16) cannot be differenced against a float32 moved forward.
    """
    return (
        problem.config.shared_forward_difference == "central"
        or problem.lower.backend.precision.active
        or autocast_outside()
    )


def radius_for(problem: ResponseProblem) -> float:
    """The radius of the shared forward's difference.

    ``fd_radius`` for the central one; for the one-sided one ``shared_forward_radius``, or the default for
    the lower level's parameter dtype.
    """
    config = problem.config
    if is_central(problem):
        return config.fd_radius
    if config.shared_forward_radius is not None:
        return config.shared_forward_radius
    return DEFAULT_RADIUS.get(problem.local_shards[0].dtype, FALLBACK_RADIUS)


def shared_mixed_(problem: ResponseProblem, w: vectors.Vector) -> dict[str, vectors.Vector]:
    """(d²f / dλ dθ) w for every upper, from the shared forward and one moved forward.

    Two moved forwards with ``shared_forward_difference="central"``. Takes ``w``'s storage and frees it.
    The moved forward runs first, while the step's forward has not built its graph yet (unless
    a product of the method needed it already), and ``w`` is freed before that graph is built:
    the parameter-sized w and the kept activations are never held together.
    """
    shared = problem.shared
    params = [p for y in problem.uppers for p in y.params]
    size = float(problem.across_ranks.norm(w))
    if size == 0.0:
        return problem._split(vectors.zeros_like(params))
    eps = radius_for(problem) / size
    if shared.rng_state is None:  # the random state the step's forward will start from
        shared.rng_state = RandomState.capture()
    central = is_central(problem)
    if central:  # the coordinator's own exact central difference, of the per-example losses
        ((slopes,),) = problem.central_difference_(w, radius_for(problem), lambda: [[_moved_losses(problem)]])
    else:
        with vectors.moved_(problem.local_shards, w, eps):  # w's storage holds θ meanwhile
            plus = _moved_losses(problem)
    w.clear()  # its storage held θ for the exact restore; nothing of it is needed now
    base = shared.forward(problem.all_levels).detach()
    if not central:
        slopes = (plus - base) / eps  # c_i = (ℓ_i(θ + εw) − ℓ_i(θ)) / ε
    with problem._evaluating(problem.uppers):
        weights = problem.lower.example_weights(shared.batch, base)
        grads = torch.autograd.grad((slopes * weights).mean(), params, allow_unused=True)
    return problem._split(vectors.grads_or_zeros(grads, params))


def _moved_losses(problem: ResponseProblem) -> torch.Tensor:
    """ℓ_i at the (moved) parameters, without gradient, with the shared forward's random state."""
    lower, shared = problem.lower, problem.shared
    try:
        with torch.no_grad(), shared.rng_state.replayed(), frozen(problem.all_levels):  # the forward's masks
            return lower.per_example_losses(shared.batch).detach()
    finally:
        lower.backend.release_gathered()
