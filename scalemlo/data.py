"""A level's position in its data: cycled epochs that a checkpoint can resume exactly.

A level reads any iterable of batches (a list, a ``DataLoader``, a generator
class of the user's), cycling it: when one pass ends the next begins and
``epoch`` counts them. At the start of every pass the cursor

- calls ``set_epoch(epoch)`` on the data, or on its ``sampler`` (a
  ``DistributedSampler`` shuffles differently each epoch only when told), and
- records the random generators the pass's order can depend on (torch,
  numpy, Python, and a ``generator`` attribute of the data or of its
  ``sampler``, as a ``DataLoader`` built with ``generator=`` or a
  ``RandomSampler(generator=...)`` has).

To resume, it restores those generators, starts the same pass again and skips
the batches already drawn, so the next batch is the one the interrupted run
would have drawn next. An iterable that has ``state_dict()`` and
``load_state_dict()`` (torchdata's ``StatefulDataLoader``) is restored from its
own state instead, without skipping.

What a user's own iterable must provide: iterating it again after the same
generator states (and the same ``set_epoch``, if it has one) yields the same
batches. Order drawn from the global generators or from a ``generator``
attribute (of the iterable or of its ``sampler``) is covered; order drawn from anything else (the clock, a private
``random.Random``) is not, unless the iterable is stateful as above.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from scalemlo.rng import rng_state, set_rng_state


def _own_generators(data: Any) -> list[torch.Generator]:
    """The generators a pass's order can come from besides the global ones: the data's, its sampler's."""
    holders = [data, getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    found: dict[int, torch.Generator] = {}
    for holder in holders:
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator):
            found.setdefault(id(generator), generator)
    return list(found.values())


def _stateful(data: Any) -> bool:
    return callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))


def _set_epoch(data: Any, epoch: int) -> None:
    for holder in (data, getattr(data, "sampler", None)):
        if holder is not None and callable(getattr(holder, "set_epoch", None)):
            holder.set_epoch(epoch)
            return


class DataCursor:
    """Cycles ``data`` and knows where it is (epoch, batches drawn in it).

    Args:
        data: any iterable or DataLoader of batches.
        owner: the name of the level it feeds (named in errors).
    """

    def __init__(self, data: Iterable, owner: str):
        self.data = data
        self.owner = owner
        self.epoch = 0
        self.drawn = 0  # batches drawn in this epoch
        self._iterator: Iterator | None = None
        self._epoch_rng: dict | None = None
        self._peeked: tuple[Any] | None = None  # drawn by peek(), handed out by the next next()

    def _start_epoch(self) -> None:
        _set_epoch(self.data, self.epoch)
        self._epoch_rng = rng_state(_own_generators(self.data))
        self._iterator = iter(self.data)
        self.drawn = 0

    def peek(self) -> Any:
        """The batch ``next()`` will return, without moving past it."""
        if self._peeked is None:
            self._peeked = (self._draw(),)
        return self._peeked[0]

    def next(self) -> Any:
        """The next batch; a new epoch starts when the data runs out."""
        if self._peeked is not None:
            (batch,), self._peeked = self._peeked, None
            return batch
        return self._draw()

    def _draw(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"level {self.owner!r}: its data yielded no batches") from None
        self.drawn += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "drawn": self.drawn,
            "started": self._iterator is not None,
            "epoch_rng": self._epoch_rng,
            "data_state": self.data.state_dict() if _stateful(self.data) else None,
            "peeked": self._peeked,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken: the next batch is the one that would have come next.

        Draws from the global generators (restoring a pass's start); the
        caller restores them afterwards.
        """
        self.epoch, self.drawn, self._epoch_rng = state["epoch"], state["drawn"], state["epoch_rng"]
        self._iterator, self._peeked = None, state["peeked"]
        if not state["started"]:
            return
        if state["data_state"] is not None:
            self.data.load_state_dict(state["data_state"])
            self._iterator = iter(self.data)
            return
        set_rng_state(self._epoch_rng, _own_generators(self.data))
        _set_epoch(self.data, self.epoch)
        self._iterator = iter(self.data)
        for i in range(self.drawn):
            try:
                next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"level {self.owner!r}: resuming needs batch {self.drawn} of epoch {self.epoch}, but the data "
                    f"now ends after {i}; give the level the same data as the run that was saved"
                ) from None
