"""The random state replayed before every evaluation of one hypergradient: the CPU generator and, when
CUDA is in use, every CUDA generator (GPU dropout masks come from those; a difference of two evaluations
with different masks is noise)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@dataclass(frozen=True, eq=False)
class RandomState:
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
