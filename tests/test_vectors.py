"""Exact perturbation (moved_, mirrored_) and the vector algebra the methods share."""

import pytest
import torch

from scalemlo import vectors as V  # short alias: these tests are about this module alone


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_moved_goes_to_the_rounded_point_and_restores_bit_for_bit(monkeypatch, chunk):
    monkeypatch.setattr(V, "_CHUNK", chunk)  # 7: a 5x9 tensor in 7 pieces
    g = torch.Generator().manual_seed(2)
    values = torch.randn(5, 9, generator=g)
    values[3, 4] = 1e-30  # where subtracting the step back would be inexact
    param = torch.nn.Parameter(values.clone())
    saved = torch.ones(5, 9, requires_grad=True) * param  # a graph that saved the parameter
    step = [torch.randn(5, 9, generator=g)]
    expected = torch.add(values, step[0], alpha=0.3)
    with V.moved_([param], step, 0.3):
        assert torch.equal(param.detach(), expected)  # fl(p + eps d) itself
    assert torch.equal(param.detach(), values)
    saved.sum().backward()  # no version change: the graph is still usable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_mirrored_visits_both_central_points_and_restores_bit_for_bit(monkeypatch, dtype, chunk):
    monkeypatch.setattr(V, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(40, generator=g) * 1e-7, torch.randn(5, generator=g)]).reshape(5, 9).to(dtype)
    values[3, 4] = 1e-30  # next to a large step
    direction = torch.randn(5, 9, generator=g).to(dtype)
    param = torch.nn.Parameter(values.clone())
    saved = torch.ones(5, 9, dtype=dtype, requires_grad=True) * param  # a graph that saved the parameter
    step = [direction.clone()]
    with V.mirrored_([param], step, 0.3) as to_mirror:
        plus = param.detach().clone()
        realized = plus - values
        to_mirror()
        minus = param.detach().clone()
    assert torch.equal(param.detach(), values)
    saved.sum().backward()  # writes through .data: the graph that saved the parameter is still usable
    if dtype == torch.bfloat16:  # bf16 arithmetic may round in float32 first, by kernel: within an ulp
        assert torch.allclose(plus.float(), values.float() + 0.3 * direction.float(), rtol=1e-2, atol=1e-2)
        assert torch.allclose(minus.float(), values.float() - realized.float(), rtol=1e-2, atol=1e-2)
        return
    assert torch.equal(plus, torch.add(values, direction, alpha=0.3))  # fl(p + eps d) itself
    assert torch.equal(minus, values - realized)  # p - r, the realized step reversed, rounded once


def test_moved_refuses_a_direction_too_narrow_to_keep_the_values():
    param = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="cannot keep a torch.float32 parameter's values"):
        with V.moved_([param], [torch.randn(4).bfloat16()], 0.1):
            pass


def test_grads_or_zeros_copies_expansions_and_shared_tensors():
    x = torch.nn.Parameter(torch.ones(3))
    y = torch.nn.Parameter(torch.ones(3))
    gx, gy = V.grads_or_zeros(torch.autograd.grad((x + y).sum(), [x, y]), [x, y])
    gx.mul_(2.0)
    assert torch.equal(gy, torch.ones(3)) and torch.equal(gx, torch.full((3,), 2.0))
    assert gx.is_contiguous() and gx.stride() == (1,)


def test_swapped_exchanges_and_restores():
    p = torch.nn.Parameter(torch.arange(4.0))
    other = [torch.ones(4)]
    with V.swapped_([p], other):
        assert torch.equal(p.detach(), torch.ones(4))
        assert torch.equal(other[0], torch.arange(4.0))
    assert torch.equal(p.detach(), torch.arange(4.0)) and torch.equal(other[0], torch.ones(4))


def test_dot_and_norm_accumulate_in_float64():
    a = [torch.full((10,), 1e4, dtype=torch.float32), torch.ones(3, dtype=torch.float32)]
    assert V.dot(a, a).dtype == torch.float64
    assert float(V.dot(a, a)) == 10 * 1e8 + 3
    assert float(V.norm([torch.tensor([3.0, 4.0])])) == 5.0


def test_grads_or_zeros_and_is_zero():
    like = [torch.ones(2), torch.ones(3)]
    out = V.grads_or_zeros([None, torch.ones(3)], like)
    one_process = V.AcrossRanks()
    assert torch.equal(out[0], torch.zeros(2)) and not one_process.is_zero(out) and one_process.is_zero([out[0]])


@pytest.mark.parametrize("magnitude", [1e-22, 1.0, 1e25])
def test_norm_neither_underflows_nor_overflows_in_float32(magnitude):
    a = [torch.full((1000,), magnitude, dtype=torch.float32), torch.full((10,), -magnitude, dtype=torch.float32)]
    expected = magnitude * 1010**0.5
    assert float(V.norm(a)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("magnitude", [1e-22, 1e-3, 1e25])
def test_norm_and_dot_of_tensors_taken_slice_by_slice_match_float64(magnitude):
    # 3.5M entries: reduced in slices of 2^20 (no parameter-sized temporary); float32 sums per slice
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3_500_000, generator=g) * magnitude, torch.randn(7, generator=g) * magnitude]
    b = [torch.randn(3_500_000, generator=g), torch.randn(7, generator=g)]
    norm64 = sum(float((x.double() ** 2).sum()) for x in a) ** 0.5
    dot64 = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    assert float(V.norm(a)) == pytest.approx(norm64, rel=1e-6)
    if magnitude < 1e20:  # a . b of 1e25-sized a overflows float32 products: not a case dot() scales
        assert float(V.dot(a, b)) == pytest.approx(dot64, rel=1e-5, abs=1e-6 * norm64 * 3_500_000**0.5)


def test_max_abs_sees_negative_entries_inf_and_nan():
    assert V.max_abs([torch.zeros(3), torch.tensor([-5.0, 2.0])]) == 5.0
    assert V.max_abs([torch.tensor([1.0, -float("inf")])]) == float("inf")
    with_nan = torch.ones(2_000_000)
    with_nan[77] = float("nan")
    assert V.max_abs([with_nan]) != V.max_abs([with_nan])  # NaN
    assert V.max_abs([]) == 0.0 and V.max_abs([torch.zeros(0)]) == 0.0
    assert V.max_abs([torch.tensor([1.0, -3.0], dtype=torch.bfloat16)]) == 3.0


def test_norm_of_a_vector_with_inf_or_nan_is_not_finite():
    for bad in (float("inf"), float("nan")):
        x = torch.ones(2_000_000)
        x[123_456] = bad
        assert not torch.isfinite(V.norm([x, torch.ones(3)]))


def test_the_replayed_random_state_puts_the_generators_back_and_compares_by_value():
    from scalemlo.rng import RandomState

    torch.manual_seed(3)
    state = RandomState.capture()
    first = torch.rand(3)
    with state.replayed():
        again = torch.rand(3)
    assert torch.equal(first, again)  # replayed from the captured state
    after = torch.rand(3)
    torch.manual_seed(3)
    torch.rand(3)
    assert torch.equal(after, torch.rand(3))  # the caller's generator went on as if nothing had run
    assert RandomState.of(state.cpu) == state  # a bare tensor is a CPU state
    torch.manual_seed(5)
    assert RandomState.capture() == RandomState.capture() and state != RandomState.capture()
