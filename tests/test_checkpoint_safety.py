"""Loading a checkpoint runs no code from it: a file whose pickle calls a function is refused, naming the file.

The planted payload is a class whose ``__reduce__`` makes the unpickler call ``os.system`` to create a
marker file; each test first shows that a plain ``torch.load(weights_only=False)`` of the planted file
does create the marker (the payload is live), then that scalemlo's loading refuses it and the marker
stays absent.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from hf_toy import collate
from test_checkpoint import assert_same, program, snapshot
from test_hf_trainer import ds, fresh_trainer_state, trainer  # noqa: F401 (fixture)
from transformers import BatchEncoding

from scalemlo.checkpoint import MANIFEST, CheckpointError, check_files, read_plain
from scalemlo.hf import reset_trainer_state


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant(file: Path, marker: Path) -> None:
    """Rewrite ``file`` (a torch.save dict) with a payload inside, keeping everything else; a checkpoint
    manifest beside it is updated to the new size, as a forger would."""
    state = torch.load(file, weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, file)
    for parent in file.parents:
        manifest = parent / MANIFEST
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            data["files"][str(file.relative_to(parent))] = file.stat().st_size
            manifest.write_text(json.dumps(data))
            break
    torch.load(file, weights_only=False)  # the payload is live: an unchecked load runs it
    assert marker.exists()
    marker.unlink()


def saved_engine(tmp_path, backend):
    engine = program(tmp_path / "run", backend=backend, max_steps=2, save_every=2)
    engine.run()
    return tmp_path / "run" / "checkpoint-2"


@pytest.mark.parametrize(
    "backend, victim",
    [
        ("torch", "rank-00000.pt"),
        ("torch", "levels/lower/torch_state.pt"),
        ("deepspeed", "rank-00000.pt"),
        ("deepspeed", "levels/upper/state/mp_rank_00_model_states.pt"),
    ],
)
def test_a_planted_payload_is_refused_and_nothing_runs(tmp_path, backend, victim):
    checkpoint = saved_engine(tmp_path, backend)
    marker = tmp_path / "payload-ran"
    plant(checkpoint / victim, marker)
    other = program(tmp_path / "other", backend=backend)
    before = snapshot(other)
    with pytest.raises(CheckpointError) as refused:
        other.load_checkpoint(checkpoint)
    message = str(refused.value)
    assert str(checkpoint / victim) in message
    assert "holds objects other than tensors and plain data" in message and "was not loaded" in message
    assert "posix.system" in message or "nt.system" in message
    assert not marker.exists()
    assert_same(snapshot(other), before)  # refused before any level was loaded


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_an_untouched_checkpoint_still_resumes(tmp_path, backend):
    checkpoint = saved_engine(tmp_path, backend)
    saved = program(tmp_path / "again", backend=backend, max_steps=2)
    saved.run()
    resumed = program(tmp_path / "other", backend=backend, max_steps=2)
    assert resumed.load_checkpoint(checkpoint).name == "checkpoint-2"
    assert_same(snapshot(resumed), snapshot(saved))


def test_read_plain_reads_numpy_rng_and_types_the_user_allowed(tmp_path):
    import numpy as np

    file = tmp_path / "state.pt"
    torch.save({"numpy": np.random.get_state(), "batch": BatchEncoding({"input_ids": torch.ones(2, 3)})}, file)
    with pytest.raises(CheckpointError, match=r"state\.pt holds objects .*BatchEncoding.*add_safe_globals"):
        read_plain(file)
    with torch.serialization.safe_globals([BatchEncoding]):
        state = read_plain(file)
        assert BatchEncoding in torch.serialization.get_safe_globals()  # left as the user set it
    assert isinstance(state["batch"], BatchEncoding) and torch.equal(state["batch"]["input_ids"], torch.ones(2, 3))
    assert state["numpy"][0] == "MT19937" and np.array_equal(state["numpy"][1], np.random.get_state()[1])


def test_a_torch_without_pickle_inspection_loads_plain_files_and_refuses_the_rest(tmp_path, monkeypatch):
    """torch 2.4 and 2.5 lack get_unsafe_globals_in_checkpoint (and 2.4 the safe_globals context), simulated by
    taking them away: plain files and numpy's RNG state still load with weights_only=True, a payload is refused
    with nothing run, and a check before a library that unpickles everything refuses, naming torch 2.6.0."""
    import numpy as np

    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    monkeypatch.delattr(torch.serialization, "safe_globals")
    registered = lambda: sorted(map(repr, torch.serialization.get_safe_globals()))  # noqa: E731 (torch keeps no order)
    before = registered()
    plain = tmp_path / "plain.pt"
    torch.save({"numpy": np.random.get_state(), "t": torch.ones(3)}, plain)
    state = read_plain(plain)
    assert state["numpy"][0] == "MT19937" and torch.equal(state["t"], torch.ones(3))
    assert registered() == before  # the allowed entries removed again, the others kept

    planted = tmp_path / "planted.pt"
    torch.save({"t": torch.ones(3)}, planted)
    marker = tmp_path / "payload-ran"
    plant(planted, marker)
    with pytest.raises(CheckpointError, match=r"planted\.pt holds objects other than tensors and plain data"):
        read_plain(planted)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"plain\.pt was not loaded: .*in torch >= 2\.6\.0"):
        check_files(tmp_path)
    assert not marker.exists()


def batch_encoding(items):
    return BatchEncoding(collate(items))


@pytest.mark.parametrize("deepspeed", [False, True], ids=["torch", "deepspeed"])
def test_a_trainer_checkpoint_with_a_payload_is_refused(tmp_path, deepspeed):
    """Batches of transformers' collators (BatchEncoding) resume; a payload in the model's DeepSpeed state or
    in scalemlo's files is refused before transformers or DeepSpeed reads anything."""
    config = {"deepspeed": ds(0)} if deepspeed else {}
    run = tmp_path / "run"
    first = trainer(run, max_steps=2, save_strategy="steps", save_steps=2, collator=batch_encoding, **config)
    first.train()
    checkpoint = run / "checkpoint-2"
    reset_trainer_state()
    resumed = trainer(run, max_steps=3, save_strategy="no", collator=batch_encoding, **config)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3

    victims = [checkpoint / "scalemlo" / "rank-00000.pt"]
    if deepspeed:
        victims += sorted(checkpoint.glob("global_step*/mp_rank_00_model_states.pt"))
        assert len(victims) == 2
    marker = tmp_path / "payload-ran"
    manifest = checkpoint / "scalemlo" / MANIFEST
    for victim in victims:
        backup, manifest_backup = victim.read_bytes(), manifest.read_bytes()
        plant(victim, marker)
        reset_trainer_state()
        again = trainer(run, max_steps=3, save_strategy="no", collator=batch_encoding, **config)
        with pytest.raises(CheckpointError, match="holds objects other than tensors and plain data") as refused:
            again.train(resume_from_checkpoint=str(checkpoint))
        assert str(victim) in str(refused.value) and not marker.exists()
        victim.write_bytes(backup)
        manifest.write_bytes(manifest_backup)
