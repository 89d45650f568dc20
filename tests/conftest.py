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


# Test tiers: `python -m pytest -m "not slow"` is the quick tier (the library's own checks, one process:
# every distributed test is slow too); the README's full command runs everything.
DISTRIBUTED = {  # files that launch several ranks themselves (deepspeed, torchrun, accelerate launch)
    "test_accelerate_launch.py",
    "test_distributed_zero.py",
    "test_example_two_ranks.py",
    "test_failing_rank.py",
    "test_kill_and_resume.py",
}
SLOW = {  # files of one process whose tests take minutes together: examples, benchmarks, matrices
    "test_cli_reweight.py",
    "test_gpu_check.py",
    "test_hf_resume_matrix.py",
    "test_hf_trainer_peft_zero2_resume.py",
    "test_llm_corpus.py",
    "test_reweighting_quality_benchmark.py",
    "test_trainer_overhead_benchmark.py",
    "test_unroll_interleaved_benchmark.py",
}


MARKERS = {
    "distributed": "launches several ranks (deepspeed, torchrun, accelerate launch)",
    "slow": "minutes of one process (examples, benchmarks, resume matrices)",
}


def pytest_configure(config):
    # pyproject.toml's [tool.pytest.ini_options] declares them; registered here where a run reads no such file
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, text in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if name in DISTRIBUTED:
            item.add_marker(pytest.mark.distributed)
            item.add_marker(pytest.mark.slow)
        if name in SLOW or name.startswith("test_example_"):
            item.add_marker(pytest.mark.slow)
