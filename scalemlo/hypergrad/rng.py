"""The random state replayed between evaluations: moved to `scalemlo.rng`; this name stays for code written
against it (it is the same module)."""

import sys

from scalemlo import rng as _moved

sys.modules[__name__] = _moved
