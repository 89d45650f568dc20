"""Random state, in one place: what a checkpoint saves of every generator a program draws from
(`rng_state`, `set_rng_state`; `rng_preserved` for a block whose draws must leave no
trace), and the state replayed before every evaluation of one
hypergradient (`RandomState`: the CPU generator and, when CUDA is in use, every CUDA generator;
GPU dropout masks come from those, and a difference of two evaluations with different masks is noise)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def rng_state(generators: list[torch.Generator] = (), cuda: bool = True) -> dict[str, Any]:
    """Every generator a program draws from: torch (CPU, CUDA), numpy, Python; plus ``generators``.

    Args:
        generators: further generators, whose states are kept in this order.
        cuda: whether to capture CUDA's generators where CUDA is available; capturing them initializes
            CUDA (a context on the current device), which code running before a launcher's device
            placement must avoid.

    Returns:
        The states, for `set_rng_state`.
    """
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = [g.get_state() for g in generators]
    return state


def set_rng_state(state: dict[str, Any], generators: list[torch.Generator] = ()) -> None:
    """Restore what `rng_state` captured (``generators`` in the same order)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(generators, state.get("generators", [])):
        generator.set_state(saved)


@contextlib.contextmanager
def rng_preserved(cuda: bool = True) -> Iterator[None]:
    """Python's, numpy's and torch's generators put back after the block, whatever it drew or raised.

    Args:
        cuda: whether CUDA's generators are put back too (see `rng_state`: capturing them
            initializes CUDA).
    """
    state = rng_state(cuda=cuda)
    try:
        yield
    finally:
        set_rng_state(state)


# ---- the program's signature -------------------------------------------------------


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@dataclass(frozen=True, eq=False)
class RandomState:
    """The state of torch's CPU and CUDA generators.

    Attributes:
        cpu: the CPU generator's state.
        cuda: every CUDA device's generator state (None when CUDA was not initialized).
    """

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def capture(cls) -> RandomState:
        """The generators' state now (CUDA's only when CUDA has been initialized)."""
        return cls(torch.get_rng_state(), tuple(torch.cuda.get_rng_state_all()) if _cuda_in_use() else None)

    @classmethod
    def of(cls, state: RandomState | torch.Tensor) -> RandomState:
        """``state`` as a RandomState (a bare tensor is a CPU generator state)."""
        return state if isinstance(state, RandomState) else cls(state)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RandomState):
            return NotImplemented
        mine, theirs = [self.cpu, *(self.cuda or ())], [other.cpu, *(other.cuda or ())]
        same_kind = (self.cuda is None) == (other.cuda is None) and len(mine) == len(theirs)
        return same_kind and all(torch.equal(a, b) for a, b in zip(mine, theirs))

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """The generators set to this state for a while; the caller's states are put back afterwards."""
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(list(self.cuda))
            yield
