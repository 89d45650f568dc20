"""Whole-program checkpoints: every level's DeepSpeed state, data positions, RNGs and method state.

Layout of one checkpoint (a directory, e.g. ``<checkpoint_dir>/checkpoint-120``)::

    scalemlo_checkpoint.json   manifest: format, global step, the program's signature, every file and its size
    levels/<name>/...          each level's DeepSpeed checkpoint (ZeRO partitions, optimizer, scheduler,
                               loss scaler), or its torch state (torch backend)
    rank-00000.pt ...          per rank: data positions and epochs, the batches of the last steps, step
                               counters, the methods' state (penalty's copy), every RNG (torch, CUDA,
                               numpy, Python), the engine's step and history

A checkpoint is written under a hidden temporary name (``.checkpoint-120.partial``)
by every rank, and made visible by one rename on rank 0 after every rank has
finished and the manifest (written last) lists every file; ``latest`` (a
one-line file in the parent naming the newest checkpoint) moves after that. A
crash mid-save therefore never leaves a directory that looks complete, and
loading checks that every file the manifest lists is there, at its size.

Loading runs no code from the checkpoint: a checkpoint may come from someone
else (a Trainer checkpoint pulled from the Hub), and unpickling arbitrary
objects can call any function the file names. scalemlo's own files are read
with ``torch.load(weights_only=True)``, which rebuilds only tensors and plain
data (plus numpy's RNG state, allowed by name); DeepSpeed reads its files with
``weights_only=False``, so before handing a level's DeepSpeed checkpoint over,
every file in it is inspected without unpickling and refused if its pickle
names a callable outside that set and the few plain classes DeepSpeed saves.
A refused file is a `CheckpointError` naming it and what it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalemlo.distributed import rank, world_size
from scalemlo.rng import rng_state, set_rng_state

# The functions below take the Engine (scalemlo.engine, which imports this module) as ``engine: Any``.
Engine = Any

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "scalemlo_checkpoint.json"
LATEST = "latest"
PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used.

    It is missing, incomplete, corrupt, of another program, or holds objects other than tensors and plain data.
    """


# ---- reading files without running code from them -----------------------------------

# What torch.serialization offers for this, by release (read in each wheel's torch/serialization.py):
# add_safe_globals, get_safe_globals and clear_safe_globals in 2.4.0, the oldest torch scalemlo supports; the
# safe_globals context in 2.5.1, not in 2.4.0; get_unsafe_globals_in_checkpoint (a pickle's globals read
# without unpickling) and safe globals named by (callable, "module.name") pairs in 2.6.0, neither in 2.5.1.
INSPECTING_TORCH = "2.6.0"


def _torch_inspects_pickles() -> bool:
    """Whether this torch reads a pickle's globals statically and takes (callable, name) safe globals."""
    return hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _numpy_rng_globals() -> list[Any]:
    """What ``np.random.get_state()`` pickles as: an array of uint32 with its dtype (numpy 2 reads a file
    written under numpy 1, which names ``numpy.core``, too)."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    found = [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    renamed = _qualified(multiarray._reconstruct) != "numpy.core.multiarray._reconstruct"
    if renamed and _torch_inspects_pickles():  # an older torch reads only the files of the numpy it runs with
        found.append((multiarray._reconstruct, "numpy.core.multiarray._reconstruct"))
    return found


def _names(safe_globals: Iterable[Any]) -> set[str]:
    """The names under which ``torch.serialization.safe_globals`` entries are allowed."""
    return {g[1] if isinstance(g, tuple) else _qualified(g) for g in safe_globals}


# The classes DeepSpeed 0.19 pickles into its checkpoints besides tensors and plain data: the fp16 loss
# scaler objects, the ZeRO stage enum, and the fragment records of a ZeRO/bf16 optimizer's state.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def _not_plain(file: Path, allowed: Iterable[str]) -> list[str]:
    """The callables ``file``'s pickle names beyond torch's ``weights_only`` set and ``allowed``, read
    statically (nothing is unpickled).

    Raises:
        CheckpointError: ``file`` is not a ``torch.save`` zip file, or its pickle uses an opcode torch's
            reader does not follow (one that could reach a callable another way), or this torch cannot read a
            pickle's globals (older than ``INSPECTING_TORCH``).
    """
    if not _torch_inspects_pickles():
        raise CheckpointError(
            f"{file} was not loaded: checking that it holds only tensors and plain data, before a library that "
            "unpickles it without torch's weights_only reader does, needs "
            f"torch.serialization.get_unsafe_globals_in_checkpoint, in torch >= {INSPECTING_TORCH} (this is "
            f"torch {torch.__version__})"
        )
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise CheckpointError(
            f"{file} was not loaded: it cannot be checked to hold only tensors and plain data ({exc})"
        ) from None
    allowed = set(allowed) | _names(_numpy_rng_globals()) | _names(torch.serialization.get_safe_globals())
    return sorted(set(named) - allowed)


def _refusal(file: Path, names: Sequence[str], how: str) -> CheckpointError:
    return CheckpointError(
        f"{file} holds objects other than tensors and plain data ({', '.join(names)}) and was not loaded: "
        f"{how} could run code the file carries. If you wrote this checkpoint yourself and trust it, allow those "
        "types with torch.serialization.add_safe_globals([...]) before loading"
    )


@contextlib.contextmanager
def allowing(safe_globals: Sequence[Any]):
    """``torch.serialization.safe_globals(safe_globals)`` that leaves the user's own entries in place on exit.

    Entries the user added beforehand stay registered (torch's context removes every entry it was given).

    Args:
        safe_globals: the globals to allow for a while.
    """
    already = _names(torch.serialization.get_safe_globals())
    missing = [g for g in safe_globals if not _names([g]) <= already]
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(missing):
            yield
        return
    torch.serialization.add_safe_globals(missing)  # torch 2.4 has no such context: the same, by hand
    try:
        yield
    finally:
        kept = [g for g in torch.serialization.get_safe_globals() if g not in missing]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(kept)


def read_plain(file: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load`` a file of tensors and plain data, running no code from it.

    Plain data: dicts, lists, tuples, numbers, strings; numpy's RNG state. Types a user registered with
    ``torch.serialization.add_safe_globals`` (a batch class of their own, say) are read too.

    Args:
        file: a file written by ``torch.save``.
        map_location: as for ``torch.load``.

    Returns:
        The object saved in ``file``.

    Raises:
        CheckpointError: the file holds other objects (naming the file and their types); nothing of it was
            unpickled.
    """
    file = Path(file)
    try:
        with allowing(_numpy_rng_globals()):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _torch_inspects_pickles():  # refused by torch's weights_only reader, which names what it met
            raise CheckpointError(
                f"{file} holds objects other than tensors and plain data and was not loaded ({exc})"
            ) from None
        names = _not_plain(file, ())  # a CheckpointError itself when the pickle cannot be followed
        if not names:
            raise  # refused for another reason than what it holds (a damaged file)
        raise _refusal(file, names, "unpickling them") from None


def check_files(directory: str | os.PathLike, allowed: Iterable[str] = DEEPSPEED_GLOBALS) -> None:
    """Refuse the ``torch.save`` files under ``directory`` whose pickles name other callables than those allowed.

    Allowed are tensors, plain data and ``allowed``; nothing is unpickled. For files another library unpickles
    with ``weights_only=False`` (DeepSpeed's checkpoints), before it does.

    Args:
        directory: where to look (``*.pt`` files, at any depth).
        allowed: the qualified names of the further callables the pickles may name (default: the few
            classes DeepSpeed saves).

    Raises:
        CheckpointError: naming the first such file and what it names.
    """
    for file in sorted(Path(directory).rglob("*.pt")):
        names = _not_plain(file, allowed)
        if names:
            raise _refusal(file, names, "unpickling them (DeepSpeed loads with torch.load(weights_only=False))")


def signature(engine: Engine) -> dict[str, Any]:
    """What must match for a checkpoint to belong to this program."""
    levels = {}
    for name, lv in engine.levels.items():
        levels[name] = {
            "params": [
                [n, list(getattr(p, "ds_shape", p.shape)), str(p.dtype)]  # ds_shape: ZeRO-3
                for n, p in lv.module.named_parameters()
                if p.requires_grad
            ],
            "backend": lv.config.backend,
            "zero_stage": lv.zero_stage,
        }
    edges = {name: list(engine.graph.lowers(name)) for name in engine.graph.names if engine.graph.lowers(name)}
    return {"levels": levels, "edges": edges, "world_size": world_size()}


def _settings(engine: Engine) -> dict[str, Any]:
    """LevelConfig fields that change the trajectory but not the checkpoint's shape: a mismatch warns."""
    skip = {"deepspeed_config"}
    return {
        name: {k: v for k, v in vars(lv.config).items() if k not in skip and not k.startswith("_")}
        for name, lv in engine.levels.items()
    }


def _signature_differences(saved: dict, current: dict) -> list[str]:
    out = []
    if saved["world_size"] != current["world_size"]:
        out.append(f"saved on {saved['world_size']} rank(s), loading on {current['world_size']}")
    if sorted(saved["levels"]) != sorted(current["levels"]):
        out.append(f"levels {sorted(saved['levels'])} in the checkpoint, {sorted(current['levels'])} here")
    if saved["edges"] != current["edges"]:
        out.append(f"edges {saved['edges']} in the checkpoint, {current['edges']} here")
    for name in sorted(set(saved["levels"]) & set(current["levels"])):
        a, b = saved["levels"][name], current["levels"][name]
        if a["params"] != b["params"]:
            diff = [f"{x} vs {y}" for x, y in zip(a["params"], b["params"]) if x != y][:3]
            if len(a["params"]) != len(b["params"]):
                diff.append(f"{len(a['params'])} trainable tensors vs {len(b['params'])}")
            out.append(f"level {name!r}: parameters differ ({'; '.join(diff)})")
        for key in ("backend", "zero_stage"):
            if a[key] != b[key]:
                out.append(f"level {name!r}: {key} {a[key]!r} in the checkpoint, {b[key]!r} here")
    return out


# ---- finding checkpoints -----------------------------------------------------------


def _verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError naming what is wrong otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete scalemlo checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: its manifest {MANIFEST} cannot be read ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')!r}, this scalemlo reads {FORMAT}")
    for rel, size in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete or corrupt: {rel} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path} is incomplete or corrupt: {rel} has {file.stat().st_size} bytes, not {size}")
    return manifest


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first (by global step)."""
    root = Path(root)
    found = []
    for child in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        try:
            manifest = _verify(child)
        except CheckpointError:
            continue
        found.append((manifest["global_step"], child))
    return [p for _, p in sorted(found)]


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a directory of checkpoints (its ``latest``); verified complete."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: it does not exist")
    if not (path / MANIFEST).exists() and (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    elif not (path / MANIFEST).exists() and complete_checkpoints(path):
        path = complete_checkpoints(path)[-1]
    try:
        _verify(path)
    except CheckpointError as exc:
        last = complete_checkpoints(path.parent)
        hint = f"; the last complete checkpoint there is {last[-1]}" if last else "; there is no complete one there"
        raise CheckpointError(f"{exc}{hint}") from None
    return path


def saved_world_size(path: str | os.PathLike) -> int:
    """How many ranks wrote the complete checkpoint ``path`` (a `resolve` result); read before loading."""
    return int(json.loads((Path(path) / MANIFEST).read_text())["signature"]["world_size"])


def check_writable(root: str | os.PathLike) -> None:
    """Raise ValueError now if checkpoints cannot be written under ``root`` (before any compute)."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"EngineConfig.checkpoint_dir={str(root)!r} cannot be written ({exc.strerror or exc}); "
            "choose a directory this process can create files in"
        ) from None


# ---- saving --------------------------------------------------------------------------


def barrier() -> None:
    """Wait for every rank (nothing to do on one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(
    engine: Engine, path: str | os.PathLike, levels: Iterable[str] | None = None, write_latest: bool = True
) -> Path:
    """Write ``engine``'s whole state to the checkpoint directory ``path`` (all ranks call this).

    The directory appears complete or not at all. An existing checkpoint at ``path`` is replaced only
    once the new one is complete. Every level's progress (data position, last batches, counters) is saved.

    Args:
        engine: the program.
        path: the checkpoint's directory.
        levels: whose parameters and optimizer state to save (default: all); a driver that saves a level's
            engine itself (the Trainer, its model) leaves it out.
        write_latest: afterwards, ``latest`` in the parent directory names this checkpoint.

    Returns:
        The checkpoint's directory.
    """
    backends = list(engine.levels) if levels is None else list(levels)
    final = Path(path)
    parent = final.parent
    partial = parent / f".{final.name}.partial"
    if rank() == 0:
        parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a crash mid-save
            shutil.rmtree(partial)
        (partial / "levels").mkdir(parents=True)
    barrier()
    for name in backends:
        engine.levels[name].backend.save(partial / "levels" / name)
    state = {
        "global_step": engine.global_step,
        "history": engine.history,
        "levels": {name: lv.state_dict() for name, lv in engine.levels.items()},
        "methods": engine.coordinator.method_state,
        "last_loss": engine.coordinator.last_loss,
        "rng": rng_state(),
    }
    rank_file = partial / f"rank-{rank():05d}.pt"
    with open(rank_file, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    barrier()
    if rank() == 0:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "global_step": engine.global_step,
            "signature": signature(engine),
            "settings": _settings(engine),
            "files": files,
            "levels_saved": backends,
        }
        _write_atomically(partial / MANIFEST, json.dumps(manifest, indent=1, default=str))
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old one
            old = parent / f".{final.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old)
        else:
            os.replace(partial, final)
        _fsync_dir(parent)
        if write_latest:
            _write_atomically(parent / LATEST, final.name + "\n")
            _fsync_dir(parent)
    barrier()
    return final


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints under ``root`` (rank 0; others wait)."""
    if keep_last > 0 and rank() == 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            doomed = old.parent / f".{old.name}.deleting"  # no longer looks like a checkpoint while it goes
            os.replace(old, doomed)
            shutil.rmtree(doomed)
    barrier()


# ---- loading -------------------------------------------------------------------------


def load(engine: Engine, path: str | os.PathLike, levels: Iterable[str] | None = None) -> Path:
    """Restore ``engine`` from a checkpoint (or the latest one in a directory of them); all ranks call this.

    Args:
        engine: the program.
        path: a checkpoint directory, or a directory of them (its ``latest`` is loaded).
        levels: whose parameters and optimizer state to load (default: those the checkpoint saved); a
            driver that loads a level's engine itself (the Trainer, its model) leaves it out.

    Returns:
        The checkpoint directory loaded.

    Raises:
        CheckpointError: the checkpoint is missing, incomplete or corrupt (naming the last complete
            one), belongs to another program (naming the differences), or a file of it holds objects
            other than tensors and plain data (naming it); raised before anything is loaded.
    """
    path = resolve(path)
    manifest = json.loads((path / MANIFEST).read_text())
    differences = _signature_differences(manifest["signature"], signature(engine))
    if differences:
        raise CheckpointError(f"{path} belongs to another program: " + "; ".join(differences))
    current = json.loads(json.dumps(_settings(engine), default=str))
    if manifest.get("settings") != current:
        changed = [
            f"{name}.{key}: {manifest['settings'].get(name, {}).get(key)!r} -> {value!r}"
            for name, fields in current.items()
            for key, value in fields.items()
            if manifest.get("settings", {}).get(name, {}).get(key) != value
        ]
        log.warning("resuming %s with changed level settings (the run will not replay exactly): %s", path, changed)
    rank_file = path / f"rank-{rank():05d}.pt"
    try:
        state = read_plain(rank_file)
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged file of the right size
        raise CheckpointError(f"{path}: {rank_file.name} cannot be read ({exc})") from None
    to_load = manifest.get("levels_saved", list(engine.levels)) if levels is None else list(levels)
    for name in to_load:
        check_files(path / "levels" / name)
    for name in to_load:
        engine.levels[name].backend.load(path / "levels" / name)
    for name, lv in engine.levels.items():
        lv.load_state_dict(state["levels"][name])
    engine.global_step = state["global_step"]
    engine.history = list(state["history"])
    engine.coordinator.method_state = state["methods"]
    engine.coordinator.last_loss = dict(state["last_loss"])
    set_rng_state(state["rng"])  # last: restoring data positions above drew from the generators
    barrier()
    return path
