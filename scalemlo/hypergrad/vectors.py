"""The methods' vector algebra: moved to `scalemlo.vectors`; this name stays for code written
against it (it is the same module)."""

import sys

from scalemlo import vectors as _moved

sys.modules[__name__] = _moved
