"""Metric logging through the ``logging`` module, and an optional progress bar."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("scalemlo")

T = TypeVar("T")


class MetricLogger:
    """Logs a metrics dict every ``every`` global iterations (0: never)."""

    def __init__(self, every: int):
        self.every = every

    def wants(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))
        log.info("step %d %s", step, text)


def progress(items: Iterable[T], enabled: bool, description: str) -> Iterator[T]:
    """``tqdm`` over ``items`` when enabled and installed and stderr is a terminal."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with transformers; without it, no bar
            return iter(items)
        return iter(tqdm(items, desc=description, dynamic_ncols=True))
    return iter(items)
