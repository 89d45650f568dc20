"""The hypergradient of one level, chained through every level below it.

For an owner level U with objective F = f_U, every level X below U has a
best response p_X*(its uppers). With partial Hessians H_X (as every practical
MLO implementation, Betty included), the total derivative is

    dF/dp_U = dF/dp_U (direct) + sum over downward paths U -> ... -> X of
              J_{path}^T dF/dp_X,   J_{Y<-X}^T v = -(d^2 f_X/dp_Y dp_X) H_X^{-1} v

Instead of walking paths one by one, adjoints are propagated bottom-up: each
X (lowest first) receives v_X = dF/dp_X plus what its own lowers sent up, asks
the method once for its responses, and adds them to the adjoints of its
uppers. Only vector products are formed, once per level, whatever the number
of paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from scalemlo import vectors
from scalemlo.graph import LevelGraph
from scalemlo.hypergrad.problem import ResponseProblem, replayed_and_frozen
from scalemlo.level import Level
from scalemlo.methods import get_method
from scalemlo.precision import without_autocast
from scalemlo.rng import RandomState


class Coordinator:
    """Owns the perturb / evaluate / restore cycle and the methods' memory."""

    def __init__(self, levels: Mapping[str, Level], graph: LevelGraph):
        self.levels = levels
        self.graph = graph
        self.method_state: dict[tuple[str, str], dict] = {}
        self.last_loss: dict[str, float] = {}  # the owner's objective at its last hypergradient

    def hypergradient(self, owner_name: str, batch=None, shared=None) -> vectors.Vector:
        """dF_U/dp_U for the owner U on this rank's batches, shaped like ``levels[U].params``.

        Leaves every level's parameters, buffers and optimizer state as they
        were (a stateful method, penalty, advances its own auxiliary copy).
        Vectors on the levels below U are averaged over ranks; U's own result
        is this rank's, for U's engine to average when it steps.

        Args:
            owner_name: the level whose hypergradient is wanted.
            batch: the owner's batch (default: its current batch).
            shared: a `scalemlo.hypergrad.shared_forward.SharedForward` of the level
                below (``LevelConfig.shared_forward``): its step in progress is the objective
                differentiated, and its forward is shared.
        """
        owner = self.levels[owner_name]
        below = self.graph.descendants(owner_name)
        if not below:
            raise ValueError(f"level {owner_name!r} has no level below it, so it has no hypergradient")
        method = get_method(owner.config.method)
        owner_and_below = [owner] + [self.levels[n] for n in below]
        all_levels = list(self.levels.values())
        rng_state = RandomState.capture()
        with contextlib.ExitStack() as stack:
            stack.enter_context(without_autocast([lv.module for lv in all_levels]))
            for lv in all_levels:
                # a bf16 level is evaluated in float32 at its own parameters (scalemlo.precision)
                stack.enter_context(lv.backend.precision.float32())
                stack.enter_context(lv.preserved_buffers())
            loss, adjoint = self._direct_gradients(owner, owner_and_below, all_levels, batch, rng_state)
            self.last_loss[owner_name] = loss
            for name in reversed(below):
                lower = self.levels[name]
                v = adjoint.pop(name)  # the problem owns it from here (a method may take its storage)
                # Per-rank pieces (this rank's batches) become one vector, the same on
                # every rank: the data-parallel gradient of the whole objective.
                lower.backend.average_over_ranks(v)
                if lower.backend.across_ranks.is_zero(v):
                    continue
                targets = [u for u in self.graph.uppers(name) if u == owner_name or u in below]
                problem = ResponseProblem(
                    lower=lower,
                    uppers=[self.levels[u] for u in targets],
                    v=v,
                    config=owner.config,
                    state=self.method_state.setdefault((owner_name, name), {}),
                    all_levels=all_levels,
                    rng_state=rng_state,
                    shared=shared if shared is not None and shared.lower is lower else None,
                )
                with lower.holding():  # the inputs the lower step holds fixed (Level.held) stay fixed
                    if problem.shared is not None:
                        pass  # the step's own forward gives the held losses when a product needs them
                    elif lower.uses_held is not False:  # True, or not known yet (the evaluation tells)
                        problem.evaluate_held()
                        lower.uses_held = bool(lower.uses_held)
                    responses = method(problem)
                for upper, response in responses.items():
                    vectors.axpy_(adjoint[upper], response)
        return [g.detach() for g in adjoint[owner_name]]

    @staticmethod
    def _direct_gradients(
        owner: Level, owner_and_below: list[Level], all_levels: list[Level], batch, rng_state: torch.Tensor
    ) -> tuple[float, dict[str, vectors.Vector]]:
        """The owner's loss and dF/dp for the owner and every level below it, from one forward.

        Whole-parameter levels get their gradients from one autograd pass;
        each ZeRO-3 level (partitioned, so autograd cannot see it) from a
        backward through its engine that reaches its own parameters only, in
        the layout of its ``local_shards``.
        """
        whole = [lv for lv in owner_and_below if not lv.backend.partitioned]
        partitioned = [lv for lv in owner_and_below if lv.backend.partitioned]
        params = [p for lv in whole for p in lv.params]
        out: dict[str, vectors.Vector] = {}
        with replayed_and_frozen(rng_state, all_levels, owner_and_below):
            loss = owner.loss(owner.current_batch() if batch is None else batch)
            if params:
                grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=bool(partitioned))
                grads = vectors.grads_or_zeros(grads, params)
                i = 0
                for lv in whole:
                    out[lv.name] = grads[i : i + len(lv.params)]  # own tensors (grads_or_zeros)
                    i += len(lv.params)
            for k, lv in enumerate(partitioned):
                out[lv.name] = lv.backend.gradient(loss, retain_graph=k < len(partitioned) - 1)
        for lv in owner_and_below:
            lv.backend.release_gathered()
        return float(loss.detach()), out
