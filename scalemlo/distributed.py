"""Ranks, process groups and launcher arguments, for scripts that run alone or under a launcher.

A scalemlo script is started in one of three ways, and the same code serves all three:

- ``python script.py``: one process; scalemlo starts a one-process gloo group itself;
- ``deepspeed --num_gpus N script.py``: the launcher sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
  and passes ``--local_rank=K`` on the command line (`add_launcher_arguments` accepts it);
- ``torchrun --nproc_per_node N script.py``: the same environment variables, no argument.

Data parallelism is the user's: each rank must read its own batches. `rank_share`
cuts a global batch into equal contiguous shares, so that N ranks together see
exactly the batch one process would, and a loss that is a mean over examples gives
the same gradient (up to float rounding) on any number of ranks.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def import_deepspeed():
    """Import DeepSpeed, choosing the CPU accelerator where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def launched() -> bool:
    """True when a launcher (deepspeed, torchrun) started this process.

    Launchers set all four of ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. accelerate's one-process CPU state writes ``RANK`` and
    ``WORLD_SIZE`` (not ``MASTER_ADDR``) into the environment, which a child
    process inherits: that is not a launch.
    """
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def ensure_distributed() -> None:
    """Start the process group: the launcher's, or a one-process gloo group without one.

    DeepSpeed needs ``torch.distributed`` and ``LOCAL_RANK``; a plain
    ``python script.py`` has neither. Idempotent.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if launched():
            import_deepspeed().init_distributed()
        else:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() == 1:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set
    release_shared_memory()
    _destroy_at_exit()


_EXIT_HOOK = False


def _destroy_at_exit() -> None:
    """Destroy the process group while the interpreter is still whole (registered once).

    Without it, gloo's worker threads can outlive the interpreter's
    finalisation and the rank aborts at exit ("terminate called without an
    active exception", exit code -6) after its work is done: seen here on a
    few 2-rank CPU launches in a hundred (pytorch/pytorch PR 179291 describes it).
    """
    global _EXIT_HOOK
    if _EXIT_HOOK:
        return
    _EXIT_HOOK = True
    import atexit

    def destroy() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - leaving anyway; never mask the program's own exit status
                pass

    atexit.register(destroy)


_SHM_RELEASED = False


def release_shared_memory() -> None:
    """Unlink the name of DeepSpeed's CPU all-reduce buffer once every rank has mapped it.

    On the CPU accelerator each rank creates ``/dev/shm/deepspeed_allreduce_buffer_*``
    (64 MiB) and DeepSpeed never unlinks it: every launch leaves its buffers in
    ``/dev/shm`` (memory, not disk) until the machine runs out. Every rank maps all
    peers' buffers inside ``init_distributed``; after a barrier the names are no
    longer needed and the memory is freed when the last rank exits, even on SIGKILL.
    Collective (call it on every rank); idempotent; nothing to do on a GPU. A one-rank launch
    (``deepspeed --num_gpus 1``) creates its buffer too.
    """
    global _SHM_RELEASED
    import torch.distributed as dist

    if _SHM_RELEASED or torch.cuda.is_available() or not (dist.is_available() and dist.is_initialized()):
        return
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    own = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    if not os.path.exists(own):  # DeepSpeed's communication backend has not started (yet)
        return
    dist.barrier()
    try:
        os.unlink(own)
    except FileNotFoundError:
        pass
    _SHM_RELEASED = True


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of ranks (1 without a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on rank 0: the one that prints and writes files."""
    return rank() == 0


def mean_over_ranks_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Average tensors over the ranks of ``group`` in place; one process: nothing.

    Args:
        tensors: each rank's own tensors, whole, on the device the group's backend needs (where the
            parameters are).
        group: the process group (None: all ranks).
    """
    if world_size() == 1:
        return
    import torch.distributed as dist

    n = dist.get_world_size(group)
    for t in tensors:
        dist.all_reduce(t, group=group)
        t.div_(n)


def collective_device() -> torch.device:
    """Where a scalar that scalemlo reduces over ranks must live.

    The current GPU under NCCL (which refuses CPU tensors), else the CPU (gloo). Vectors are reduced where
    they already are (the parameters' device).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduced_scalar_(value: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """All-reduce a 0-d tensor over the ranks of ``group`` on `collective_device`.

    Args:
        value: the 0-d tensor; the result, on the value's own device, is written into it.
        op: "sum", "min" or "max".
        group: the process group (None: all ranks).

    Returns:
        ``value``.
    """
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    moved = value.to(collective_device())
    dist.all_reduce(moved, op=ops[op], group=group)
    if moved is not value:
        value.copy_(moved)
    return value


def finite_on_every_rank(tensors: Sequence[torch.Tensor], group=None) -> bool:
    """True when every tensor is finite on every rank of ``group``: all ranks branch alike.

    Args:
        tensors: this rank's tensors.
        group: the process group (None: all ranks; a level's data-parallel group holds every rank, see
            ``scalemlo.backend``).
    """
    finite = all(bool(torch.isfinite(t.sum())) for t in tensors)  # one pass; inf/NaN survive the sum
    if world_size() > 1:
        finite = bool(reduced_scalar_(torch.tensor(1.0 if finite else 0.0), "min", group).item() == 1.0)
    return finite


def add_launcher_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept the ``--local_rank`` / ``--local-rank`` argument that launchers pass.

    The deepspeed launcher appends ``--local_rank=K`` to the script's
    arguments (torch.distributed.launch ``--local-rank=K``); a parser that does
    not know it stops with "unrecognized arguments". The value is also in
    ``LOCAL_RANK``, which is what scalemlo reads.

    Returns:
        ``parser``.
    """
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=int(os.environ.get("LOCAL_RANK", 0)),
        help="set by the deepspeed launcher; leave it alone",
    )
    return parser


def rank_share(batch: Any, what: str = "batch") -> Any:
    """This rank's contiguous share of a global batch.

    Rank r of N gets rows ``[r B/N, (r+1) B/N)``. One process gets the batch itself.

    Args:
        batch: a tensor, or a tuple / list / dict of tensors with the same
            first dimension B (other values are passed through).
        what: what the batch is (named in the errors).

    Raises:
        ValueError: the tensors differ in their first dimension, or B is not a multiple of the number of
            ranks (the shares would differ in size, and the ranks' averaged gradient would no longer be
            the gradient of the whole batch).
    """
    n = world_size()
    if n == 1:
        return batch
    sizes = {t.shape[0] for t in _tensors(batch)}
    if len(sizes) != 1:
        raise ValueError(f"rank_share: the tensors of the {what} differ in their first dimension: {sorted(sizes)}")
    (size,) = sizes
    if size % n:
        raise ValueError(
            f"rank_share: a {what} of {size} examples cannot be split evenly over {n} ranks; "
            f"use a {what} size that is a multiple of {n}"
        )
    share = size // n
    start = rank() * share
    return _slice(batch, start, start + share)


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return [t for v in batch for t in _tensors(v)]
    return []


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, tuple):
        return tuple(_slice(v, start, stop) for v in batch)
    if isinstance(batch, list):
        return [_slice(v, start, stop) for v in batch]
    return batch
