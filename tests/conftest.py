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

# Single cases of one-process matrices, several seconds each, in the slow tier: the quick tier keeps every
# method of the bf16/fp16 hypergradient matrices at ZeRO-0 and finite_difference at ZeRO-3; the second-order
# methods at ZeRO-3 and the shipped offload config run in the full suite.
SLOW_CASES = {
    "test_low_precision.py": {
        "test_bf16_hypergradients_match_float32[neumann-zero3]",
        "test_bf16_hypergradients_match_float32[cg-zero3]",
        "test_bf16_hypergradients_match_float32[penalty-zero3]",
    },
    "test_deepspeed_fp16.py": {
        "test_deepspeed_fp16_hypergradients_match_float32[neumann-zero3]",
        "test_deepspeed_fp16_hypergradients_match_float32[cg-zero3]",
        "test_deepspeed_fp16_hypergradients_match_float32[penalty-zero3]",
    },
    "test_hf_trainer_bf16.py": {
        "test_the_shipped_offload_config_gives_the_hypergradients_of_zero3[fp32]",
        "test_the_shipped_offload_config_gives_the_hypergradients_of_zero3[bf16]",
    },
}


MARKERS = {
    "distributed": "launches several ranks (deepspeed, torchrun, accelerate launch)",
    "slow": "minutes of one process (examples, benchmarks, resume matrices, the slowest matrix cases)",
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
        if name in SLOW or name.startswith("test_example_") or item.name in SLOW_CASES.get(name, ()):
            item.add_marker(pytest.mark.slow)
