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

from scalemlo.graph import LevelGraph
from scalemlo.hypergrad import vectors as V
from scalemlo.hypergrad.problem import ResponseProblem
from scalemlo.hypergrad.registry import get_method
from scalemlo.level import Level, frozen


class Coordinator:
    """Owns the perturb / evaluate / restore cycle and the methods' memory."""

    def __init__(self, levels: Mapping[str, Level], graph: LevelGraph):
        self.levels = levels
        self.graph = graph
        self.method_state: dict[tuple[str, str], dict] = {}
        self.last_loss: dict[str, float] = {}  # the owner's objective at its last hypergradient

    def hypergradient(self, owner_name: str, batch=None) -> V.Vector:
        """dF_U/dp_U for the owner U, shaped like ``levels[U].params``.

        Leaves every level's parameters, buffers and optimizer state as they
        were (a stateful method, penalty, advances its own auxiliary copy).

        Args:
            owner_name: the level whose hypergradient is wanted.
            batch: the owner's batch (default: its current batch).
        """
        owner = self.levels[owner_name]
        below = self.graph.descendants(owner_name)
        if not below:
            raise ValueError(f"level {owner_name!r} has no level below it, so it has no hypergradient")
        method = get_method(owner.config.method)
        in_play = [owner] + [self.levels[n] for n in below]
        everyone = list(self.levels.values())
        rng_state = torch.get_rng_state()
        with contextlib.ExitStack() as stack:
            for lv in everyone:
                stack.enter_context(lv.preserved_buffers())
            loss, adjoint = self._direct_gradients(owner, in_play, everyone, batch, rng_state)
            self.last_loss[owner_name] = loss
            for name in reversed(below):
                v = adjoint[name]
                lower = self.levels[name]
                # Per-rank pieces (this rank's batches) become one vector, the same on
                # every rank: the data-parallel gradient of the whole objective.
                lower.backend.average(v)
                if lower.backend.space.is_zero(v):
                    continue
                targets = [u for u in self.graph.uppers(name) if u == owner_name or u in below]
                problem = ResponseProblem(
                    lower=lower,
                    uppers=[self.levels[u] for u in targets],
                    v=v,
                    config=owner.config,
                    state=self.method_state.setdefault((owner_name, name), {}),
                    everyone=everyone,
                    rng_state=rng_state,
                )
                for upper, response in method(problem).items():
                    V.axpy_(adjoint[upper], response)
        return [g.detach() for g in adjoint[owner_name]]

    @staticmethod
    def _direct_gradients(owner, in_play, everyone, batch, rng_state) -> tuple[float, dict[str, V.Vector]]:
        """The owner's loss and dF/dp for the owner and every level below it, from one forward.

        Whole-parameter levels get their gradients from one autograd pass;
        each ZeRO-3 level (partitioned, so autograd cannot see it) from a
        backward through its engine, in the layout of its ``coords``.
        """
        others = [lv for lv in everyone if all(lv is not p for p in in_play)]
        whole = [lv for lv in in_play if not lv.backend.partitioned]
        partitioned = [lv for lv in in_play if lv.backend.partitioned]
        params = [p for lv in whole for p in lv.params]
        out: dict[str, V.Vector] = {}
        with torch.random.fork_rng(devices=[]), frozen(others):
            torch.set_rng_state(rng_state)
            loss = owner.loss(owner.current_batch() if batch is None else batch)
            if params:
                grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=bool(partitioned))
                grads = V.grads_or_zeros(grads, params)
                i = 0
                for lv in whole:
                    out[lv.name] = grads[i : i + len(lv.params)]  # own tensors (grads_or_zeros)
                    i += len(lv.params)
            for k, lv in enumerate(partitioned):
                # The backward also reaches the other levels in play; keep their .grad
                # (e.g. mid-accumulation) out of it.
                bystanders = [p for other in in_play if other is not lv for p in other.params]
                stash = [p.grad for p in bystanders]
                for p in bystanders:
                    p.grad = None
                out[lv.name] = lv.backend.gradient(loss, retain_graph=k < len(partitioned) - 1)
                for p, g in zip(bystanders, stash):
                    p.grad = g
        for lv in in_play:
            lv.backend.release_gathered()
        return float(loss.detach()), out
