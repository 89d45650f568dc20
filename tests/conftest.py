import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Undo what a test (or a module fixture it starts) writes to os.environ: RANK, MASTER_PORT, ...

    accelerate's one-process state writes launcher variables into the
    environment; later tests' subprocesses would inherit them.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
