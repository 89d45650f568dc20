"""Wrong inputs, as one table: each raises its error, naming the problem, before any compute or write.

Every row builds (and where needed runs, or loads into) a two-level program
with one thing wrong. After the error, the row's program must show that
nothing happened: no level stepped, every parameter is as it was built, and
no checkpoint file was written. Errors a program can only show when its
``training_step`` runs are found by ``Engine.run()``'s first look at every
level, before any level steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from scalemlo import Engine, EngineConfig, Level, LevelConfig
from scalemlo.checkpoint import CheckpointError


class Lower(Level):
    def training_step(self, batch):
        return (self.module(batch) * self.uppers["upper"].module.weight.sum()).pow(2).mean()


class Upper(Level):
    def training_step(self, batch):
        return self.lowers["lower"](batch).pow(2).mean()


@dataclass
class Program:
    """Everything a row may change; ``build()`` makes the engine."""

    tmp: Path
    lower_cls: type = Lower
    upper_cls: type = Upper
    lower_config: LevelConfig = field(default_factory=LevelConfig)
    upper_config: LevelConfig = field(default_factory=LevelConfig)
    engine_config: dict = field(default_factory=dict)
    edges: object = None
    lower_data: object = "default"
    lower_module: torch.nn.Module | None = None
    lower_optimizer: object = None
    extra_levels: list = field(default_factory=list)
    names: tuple = ("lower", "upper")
    levels: list = field(default_factory=list)

    def build(self) -> Engine:
        torch.manual_seed(0)
        data = [torch.ones(4, 3)] * 3 if self.lower_data == "default" else self.lower_data
        lower_module = self.lower_module if self.lower_module is not None else torch.nn.Linear(3, 2)
        upper_module = torch.nn.Linear(2, 1)
        optimizer = self.lower_optimizer or (lambda params: torch.optim.SGD(params, lr=0.1))
        lower = self.lower_cls(self.names[0], lower_module, optimizer, data, config=self.lower_config)
        upper = self.upper_cls(
            self.names[1],
            upper_module,
            torch.optim.SGD(upper_module.parameters(), lr=0.1),
            [torch.ones(4, 3)],
            config=self.upper_config,
        )
        self.levels = [lower, upper, *self.extra_levels]
        self.before = {id(p): p.detach().clone() for lv in self.levels for p in lv.params}
        config = EngineConfig(**{"max_steps": 2, "progress_bar": False, **self.engine_config})
        edges = {"upper": ["lower"]} if self.edges is None else self.edges
        return Engine(self.levels, edges, config)

    def assert_nothing_happened(self) -> None:
        for lv in self.levels:
            assert lv.steps == 0, f"level {lv.name!r} stepped"
            for p in lv.params:
                if p.numel():  # ZeRO-3 partitions are empty placeholders
                    assert torch.equal(p.detach(), self.before[id(p)]), f"a parameter of {lv.name!r} changed"
        written = [p for p in self.tmp.rglob("*") if p.is_file() and not {"good", "fixtures"} & set(p.parts)]
        assert not written, f"files were written: {written}"


def run(program: Program) -> None:
    program.build().run()


def level(cls=Lower, name="lower", **kwargs):
    module = torch.nn.Linear(3, 2)
    return cls(name, module, torch.optim.SGD(module.parameters(), lr=0.1), [torch.ones(4, 3)], **kwargs)


# ---- losses that are wrong, found before any level steps ------------------------------------
class VectorLoss(Lower):
    def training_step(self, batch):
        return self.module(batch).pow(2)


class NoGradLoss(Upper):
    def training_step(self, batch):
        with torch.no_grad():
            return self.lowers["lower"](batch).pow(2).mean()


class FloatLoss(Upper):
    def training_step(self, batch):
        return float(self.lowers["lower"](batch).pow(2).mean().detach())


class IntegerLoss(Lower):
    def training_step(self, batch):
        return self.module(batch).argmax()


class NoTrainingStep(Level):
    pass


def saved_checkpoint(tmp: Path, **program_kwargs) -> Path:
    """A complete checkpoint of the default program (or a variant), in tmp/good."""
    program = Program(tmp / "good", engine_config={"checkpoint_dir": str(tmp / "good")}, **program_kwargs)
    engine = program.build()
    engine.run()
    return engine.save_checkpoint()


def load_into(program: Program, path: Path) -> None:
    program.build().load_checkpoint(path)


def fixture_dir(tmp: Path) -> Path:
    """Files a row prepares for itself (not counted as written by the program)."""
    (tmp / "fixtures").mkdir(exist_ok=True)
    return tmp / "fixtures"


def not_writable(tmp: Path) -> str:
    blocker = fixture_dir(tmp) / "a-file"
    blocker.write_text("not a directory")
    return str(blocker / "checkpoints")


def conflicting_batch(tmp: Path) -> str:
    path = fixture_dir(tmp) / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2}))
    return str(path)


# Each row: id, what the row does (tmp, program) -> None, exception type, words the message must contain.
CASES = [
    # the graph
    (
        "cycle",
        lambda t, p: Program(t, edges={"upper": ["lower"], "lower": ["upper"]}).build(),
        ValueError,
        "the level graph has a cycle: (upper -> lower -> upper|lower -> upper -> lower)",
    ),
    (
        "unknown level in edges",
        lambda t, p: Program(t, edges={"upper": ["lowr"]}).build(),
        ValueError,
        "unknown level 'lowr'",
    ),
    ("self-edge", lambda t, p: Program(t, edges={"upper": ["upper"]}).build(), ValueError, "self-edge"),
    ("duplicate names", lambda t, p: Program(t, names=("x", "x")).build(), ValueError, "unique; repeated"),
    (
        "edges not a mapping",
        lambda t, p: Program(t, edges=["upper", "lower"]).build(),
        ValueError,
        "edges must be a mapping",
    ),
    ("not a Level", lambda t, p: Engine([torch.nn.Linear(1, 1)], {}), ValueError, "must be scalemlo.Level objects"),
    ("parameter in two levels", None, ValueError, "trainable in both"),
    # data
    ("no data", lambda t, p: Program(t, lower_data=None).build(), ValueError, "'lower' has no data"),
    ("empty data", lambda t, p: Program(t, lower_data=[]).build(), ValueError, "'lower': its data is empty"),
    # LevelConfig / EngineConfig
    (
        "unknown method",
        lambda t, p: LevelConfig(method="darts"),
        ValueError,
        "method='darts' is not known; allowed values: cg, exact, finite_difference",
    ),
    ("negative fd_radius", lambda t, p: LevelConfig(fd_radius=-1e-2), ValueError, "fd_radius must be > 0"),
    ("unroll_steps=0", lambda t, p: LevelConfig(unroll_steps=0), ValueError, "unroll_steps must be >= 1"),
    (
        "unknown second_order",
        lambda t, p: LevelConfig(second_order="forward"),
        ValueError,
        "second_order='forward' is not known",
    ),
    (
        "unknown LevelConfig key",
        lambda t, p: LevelConfig.from_dict({"darts_alpha": 1.0}),
        ValueError,
        "unknown LevelConfig keys \\['darts_alpha'\\]",
    ),
    (
        "missing deepspeed_config file",
        lambda t, p: LevelConfig(deepspeed_config=str(t / "no.json")),
        ValueError,
        "no such file",
    ),
    ("negative max_steps", lambda t, p: EngineConfig(max_steps=-1), ValueError, "max_steps must be >= 0"),
    (
        "unknown EngineConfig key",
        lambda t, p: EngineConfig.from_dict({"train_iters": 5}),
        ValueError,
        "unknown EngineConfig keys \\['train_iters'\\]",
    ),
    (
        "save_every without checkpoint_dir",
        lambda t, p: EngineConfig(save_every=10),
        ValueError,
        "need EngineConfig.checkpoint_dir",
    ),
    (
        "unknown nonfinite policy",
        lambda t, p: EngineConfig(nonfinite="ignore"),
        ValueError,
        "nonfinite='ignore' is not known; allowed values: raise, skip",
    ),
    # modules and optimizers
    (
        "module not a Module",
        lambda t, p: Lower("lower", lambda x: x, None, [1]),
        ValueError,
        "module must be a torch.nn.Module",
    ),
    (
        "no trainable parameters",
        lambda t, p: Program(t, lower_module=torch.nn.ReLU()).build(),
        ValueError,
        "no parameters with requires_grad=True",
    ),
    (
        "optimizer over another level's parameters",
        None,
        ValueError,
        "optimizer holds a parameter that is not a trainable parameter of this level",
    ),
    (
        "trainable parameter missing from the optimizer",
        lambda t, p: Program(t, lower_optimizer=lambda params: torch.optim.SGD(params[:1], lr=0.1)).build(),
        ValueError,
        "trainable parameters \\['bias'\\] are not in the optimizer",
    ),
    (
        "optimizer factory returns something else",
        lambda t, p: Program(t, lower_optimizer=lambda params: 0.1).build(),
        ValueError,
        "the optimizer factory returned float",
    ),
    # DeepSpeed configs
    (
        "unknown DeepSpeed key",
        lambda t, p: Program(t, lower_config=LevelConfig(deepspeed_config={"zero_optimisation": {"stage": 2}})).build(),
        ValueError,
        "keys DeepSpeed does not know: \\['zero_optimisation'\\].*did you mean 'zero_optimization'",
    ),
    (
        "conflicting batch size",
        lambda t, p: Program(t, lower_config=LevelConfig(deepspeed_config=conflicting_batch(t))).build(),
        ValueError,
        "train_batch_size=7 conflicts with train_micro_batch_size_per_gpu=2 x gradient_accumulation_steps=1",
    ),
    (
        "gradient accumulation disagrees",
        lambda t, p: Program(t, lower_config=LevelConfig(deepspeed_config={"gradient_accumulation_steps": 4})).build(),
        ValueError,
        "gradient_accumulation_steps=4 but LevelConfig.gradient_accumulation=1",
    ),
    (
        "ZeRO stage 5",
        lambda t, p: Program(t, lower_config=LevelConfig(deepspeed_config={"zero_optimization": {"stage": 5}})).build(),
        ValueError,
        "stage must be 0, 1, 2 or 3",
    ),
    (
        "float64 in DeepSpeed",
        lambda t, p: Program(t, lower_module=torch.nn.Linear(3, 2).double()).build(),
        ValueError,
        "cannot reduce float64 gradients; use LevelConfig\\(backend='torch'\\)",
    ),
    (
        "ZeRO stage the method cannot use",
        lambda t, p: Program(
            t,
            upper_config=LevelConfig(method="sama"),
            lower_config=LevelConfig(deepspeed_config={"zero_optimization": {"stage": 2}}),
        ).build(),
        ValueError,
        "method 'sama', which needs per-parameter optimizer state",
    ),
    (
        "ZeRO-3 level with levels below, double backward",
        lambda t, p: Program(
            t, upper_config=LevelConfig(method="neumann", deepspeed_config={"zero_optimization": {"stage": 3}})
        ).build(),
        ValueError,
        "'upper' uses ZeRO-3 and has levels below it; its LevelConfig asks for method 'neumann' with second_order",
    ),
    # training_step
    (
        "training_step not written",
        lambda t, p: run(Program(t, lower_cls=NoTrainingStep)),
        NotImplementedError,
        "subclass Level and write training_step",
    ),
    (
        "non-scalar loss",
        lambda t, p: run(Program(t, lower_cls=VectorLoss)),
        ValueError,
        "'lower': training_step must return a scalar tensor, got Tensor\\(4, 2\\)",
    ),
    (
        "loss without grad",
        lambda t, p: run(Program(t, upper_cls=NoGradLoss)),
        ValueError,
        "'upper': training_step returned a loss that does not require grad",
    ),
    (
        "loss not a tensor",
        lambda t, p: run(Program(t, upper_cls=FloatLoss)),
        ValueError,
        "must return a scalar tensor, got float",
    ),
    (
        "integer loss",
        lambda t, p: run(Program(t, lower_cls=IntegerLoss)),
        ValueError,
        "'lower': training_step returned a loss of dtype torch.int64; it must be a floating-point tensor",
    ),
    # checkpoints
    (
        "checkpoint directory not writable",
        lambda t, p: Program(t, engine_config={"checkpoint_dir": not_writable(t)}).build(),
        ValueError,
        "cannot be written",
    ),
    (
        "checkpoint of another program (shapes)",
        lambda t, p: load_into(Program(t, lower_module=torch.nn.Linear(3, 5)), saved_checkpoint(t)),
        CheckpointError,
        "belongs to another program: level 'lower': parameters differ",
    ),
    (
        "checkpoint of another program (levels)",
        lambda t, p: load_into(
            Program(t, names=("lower", "upper"), extra_levels=[level(name="third")]), saved_checkpoint(t)
        ),
        CheckpointError,
        "levels \\['lower', 'upper'\\] in the checkpoint, \\['lower', 'third', 'upper'\\] here",
    ),
    (
        "checkpoint that is not one",
        lambda t, p: load_into(Program(t), t),
        CheckpointError,
        "is not a complete scalemlo checkpoint",
    ),
]


def shared_parameter(tmp: Path, program: Program) -> None:
    shared = torch.nn.Linear(3, 2)
    a = Lower("lower", shared, torch.optim.SGD(shared.parameters(), lr=0.1), [1])
    b = Upper("upper", shared, torch.optim.SGD(shared.parameters(), lr=0.1), [1])
    program.levels = [a, b]
    Engine([a, b], {"upper": ["lower"]})


def foreign_optimizer(tmp: Path, program: Program) -> None:
    other = torch.nn.Linear(2, 1)
    Program(
        tmp, lower_optimizer=lambda params: torch.optim.SGD(list(params) + list(other.parameters()), lr=0.1)
    ).build()


ACTIONS = {"parameter in two levels": shared_parameter, "optimizer over another level's parameters": foreign_optimizer}


def test_the_table_is_large():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name, action, error, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, monkeypatch, name, action, error, words):
    built: list[Program] = []
    original_build = Program.build

    def recording_build(self):
        built.append(self)
        return original_build(self)

    monkeypatch.setattr(Program, "build", recording_build)
    action = action or ACTIONS[name]
    with pytest.raises(error, match=words):
        action(tmp_path, Program(tmp_path))
    for program in built:
        if program.tmp == tmp_path / "good":
            continue
        if program.levels:
            program.assert_nothing_happened()
