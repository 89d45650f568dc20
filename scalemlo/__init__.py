"""scalemlo: gradient-based multilevel optimization of large models, one DeepSpeed engine per level."""

from scalemlo.config import EngineConfig, LevelConfig
from scalemlo.engine import Engine
from scalemlo.hypergrad import METHODS, register
from scalemlo.level import FED, Level
from scalemlo.zero_init import zero_init

__all__ = ["Engine", "EngineConfig", "FED", "Level", "LevelConfig", "METHODS", "register", "zero_init"]
__version__ = "0.1.0"
