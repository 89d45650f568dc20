"""Metric logging: the ``logging`` module always; JSONL, TensorBoard and W&B files on rank 0 when asked.

``EngineConfig(report_to=("jsonl", "tensorboard"), logging_dir="runs/x")`` makes
every logged iteration of ``Engine.run()`` also a line of
``runs/x/metrics.jsonl`` and a TensorBoard scalar set, so any program can show
its curves without a hand-written logger. Backends are imported lazily, when
the engine is built (a missing one is an error then, with its install hint),
and only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from scalemlo.distributed import is_main_process

log = logging.getLogger("scalemlo")

T = TypeVar("T")

SINKS = ("jsonl", "tensorboard", "wandb")


class _JsonlSink:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "metrics.jsonl"

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        pass


class _TensorBoardSink:
    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module needs the tensorboard package
            raise ValueError(
                "report_to has 'tensorboard', which needs the tensorboard package: pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandbSink:
    def __init__(self, directory: Path):
        try:
            import wandb
        except ImportError:
            raise ValueError("report_to has 'wandb', which needs the wandb package: pip install wandb") from None
        self.run = wandb.run or wandb.init(dir=str(directory))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        pass


_SINK_CLASSES = {"jsonl": _JsonlSink, "tensorboard": _TensorBoardSink, "wandb": _WandbSink}


class MetricLogger:
    """Logs a metrics dict every ``every`` global iterations (0: never) to ``logging`` and the sinks.

    Args:
        every: log every N global iterations (0: never; validation iterations are always logged).
        report_to: any of ``SINKS``; written on rank 0 only.
        directory: where the sinks write (``metrics.jsonl``, TensorBoard event files).
    """

    def __init__(self, every: int, report_to: Iterable[str] = (), directory: str | os.PathLike | None = None):
        self.every = every
        self.sinks = []
        if is_main_process():
            for name in report_to:
                self.sinks.append(_SINK_CLASSES[name](Path(directory)))

    def wants(self, step: int) -> bool:
        """Whether ``step`` is one to log (every ``every``-th)."""
        return self.every > 0 and step % self.every == 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log ``metrics`` of global iteration ``step`` to ``logging`` and every sink."""
        text = " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))
        log.info("step %d %s", step, text)
        for sink in self.sinks:
            sink.write(step, metrics)

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()


def progress(items: Iterable[T], enabled: bool, description: str) -> Iterator[T]:
    """``tqdm`` over ``items`` when enabled and installed and stderr is a terminal."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with transformers; without it, no bar
            return iter(items)
        return iter(tqdm(items, desc=description, dynamic_ncols=True))
    return iter(items)
