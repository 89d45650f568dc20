"""Config and graph details beside the bad-input table (tests/test_bad_input.py)."""

import pytest
import torch

import scalemlo
from scalemlo import Engine, EngineConfig, Level, LevelConfig


class Counting(Level):
    calls = 0

    def training_step(self, batch):
        Counting.calls += 1
        return self.module(batch).sum()


def level(name, data="default", config=None):
    data = [torch.ones(2)] if data == "default" else data
    module = torch.nn.Linear(2, 1)
    return Counting(name, module, torch.optim.SGD(module.parameters(), lr=0.1), data=data, config=config)


@pytest.fixture(autouse=True)
def reset_calls():
    Counting.calls = 0
    yield
    assert Counting.calls == 0, "validation must fail before any training_step runs"


def test_empty_data_without_len_is_named_before_any_step():
    class Nothing:  # no len: found by run()'s first look at every level, before any step
        def __iter__(self):
            return iter(())

    engine = Engine(
        [level("b"), level("a", data=Nothing())], {"b": ["a"]}, EngineConfig(max_steps=1, progress_bar=False)
    )
    with pytest.raises(ValueError, match="level 'a': its data yielded no batches"):
        engine.run()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "darts"}, "method='darts' is not known; allowed values: cg, exact, finite_difference"),
        ({"neumann_iterations": -1}, "neumann_iterations must be >= 0"),
        ({"cg_iterations": 0}, "cg_iterations must be >= 1"),
        ({"cg_iterations": 2.5}, "cg_iterations must be an integer"),
        ({"unroll_steps": 0}, "unroll_steps must be >= 1"),
        ({"fd_radius": 0.0}, "fd_radius must be > 0"),
        ({"neumann_alpha": -0.1}, "neumann_alpha must be > 0"),
        ({"penalty_alpha": "big"}, "penalty_alpha must be a number"),
        ({"gradient_accumulation": 0}, "gradient_accumulation must be >= 1"),
        ({"gradient_clipping": -1.0}, "gradient_clipping must be >= 0"),
        ({"backend": "fsdp"}, "backend='fsdp' is not known; allowed values: deepspeed, torch"),
        ({"second_order": "forward"}, "second_order='forward' is not known"),
        ({"deepspeed_config": "/nonexistent/ds.json"}, "no such file"),
        ({"backend": "torch", "deepspeed_config": {}}, "backend is 'torch'"),
    ],
)
def test_level_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LevelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_steps": -1}, "max_steps must be >= 0"), ({"log_every": -1}, "log_every must be >= 0")],
)
def test_engine_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_unknown_config_keys_are_errors():
    with pytest.raises(ValueError, match="unknown LevelConfig keys \\['darts_alpha'\\]"):
        LevelConfig.from_dict({"method": "cg", "darts_alpha": 0.1})
    assert LevelConfig.from_dict({"method": "cg", "cg_iterations": 3}).cg_iterations == 3


def test_methods_registry_lists_all_six():
    assert set(scalemlo.METHODS) == {"finite_difference", "sama", "neumann", "cg", "penalty", "exact"}


def test_graph_order_and_descendants():
    from scalemlo.graph import LevelGraph

    g = LevelGraph(["c", "b", "a", "d"], {"a": ["b", "d"], "b": ["c"], "d": ["c"]})
    order = g.order
    assert order.index("a") < order.index("b") < order.index("c")
    assert order.index("d") < order.index("c")
    assert set(g.descendants("a")) == {"b", "c", "d"}
    assert g.uppers("c") == ("b", "d")
    assert g.leaves() == ("c",)


def zero(stage, **kwargs):
    return LevelConfig(deepspeed_config={"zero_optimization": {"stage": stage}}, **kwargs)


@pytest.mark.parametrize(
    "upper, lower, message",
    [
        (zero(3, method="exact"), zero(0), "'up' uses ZeRO-3 and has levels below it; .* asks for exact"),
        (zero(3, method="cg"), zero(0), "asks for method 'cg' with second_order='autograd'"),
        (zero(3, shared_forward=True), zero(0), "asks for shared_forward=True"),
        (zero(0, method="sama"), zero(1), "method 'sama', which needs per-parameter optimizer state"),
        (zero(0, method="sama"), zero(3), "use stage 0 for 'low'"),
        (zero(0, method="exact"), zero(3), "'exact' needs double backward .* use another method"),
        (zero(0, method="cg"), zero(3), "use second_order='finite_difference'"),
        (zero(0, method="neumann"), zero(3), "use second_order='finite_difference'"),
        (zero(0), zero(5), "stage must be 0, 1, 2 or 3, got 5"),
    ],
)
def test_zero_stage_a_role_cannot_use_is_refused_before_compute(upper, lower, message):
    with pytest.raises(ValueError, match=message):
        Engine([level("up", config=upper), level("low", config=lower)], {"up": ["low"]})


def test_zero_auto_bucket_sizes_come_from_the_hidden_size():
    from transformers import GPT2Config, GPT2LMHeadModel

    from scalemlo.backend.deepspeed_config import _fill_zero_auto

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    zero = {
        "stage": 3,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
    }
    _fill_zero_auto(zero, model, "lm")
    assert zero == {
        "stage": 3,
        "reduce_bucket_size": 256,
        "stage3_prefetch_bucket_size": 230,
        "stage3_param_persistence_threshold": 160,
    }
    with pytest.raises(ValueError, match="needs the model's config.hidden_size"):
        _fill_zero_auto({"reduce_bucket_size": "auto"}, torch.nn.Linear(2, 2), "lm")
