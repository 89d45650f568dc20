"""scalemlo: gradient-based multilevel optimization of large models, one DeepSpeed engine per level.

What a program needs: ``Level`` (subclass it: ``training_step``), ``LevelConfig`` and ``EngineConfig``,
``Engine``; to write a hypergradient method, ``register`` and the ``ResponseProblem`` it receives
(``METHODS``: the registered ones, read-only); ``CheckpointError`` for a checkpoint that cannot be
loaded; ``zero_init`` to build a ZeRO-3 level's model partitioned.
"""

from scalemlo.checkpoint import CheckpointError
from scalemlo.config import EngineConfig, LevelConfig
from scalemlo.engine import Engine
from scalemlo.hypergrad import METHODS, Method, get_method, register, unregister
from scalemlo.hypergrad.problem import ResponseProblem
from scalemlo.level import Level
from scalemlo.zero_init import zero_init

__all__ = [
    "METHODS",
    "CheckpointError",
    "Engine",
    "EngineConfig",
    "Level",
    "LevelConfig",
    "Method",
    "ResponseProblem",
    "get_method",
    "register",
    "unregister",
    "zero_init",
]
__version__ = "0.1.0"
