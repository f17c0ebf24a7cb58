"""The value-changing ops' arithmetic (mapper.ops.arith): fast, and the same bits as float64.

Specification: an affine map gives exactly the bits that computing in float64 and rounding once
gives (the way it was computed before it ran in the tensor's own dtype), for every value a bf16
or fp16 tensor can hold, NaN payloads, infinities and subnormals included; the one deliberate
difference is that a zero offset is not added, so ``-0.0`` keeps its sign. The exactness flag
says the truth: True exactly when the opposite map gives every input back bit for bit. Sums and
means are the old formulas' bits; blocks never change a result.
"""

from __future__ import annotations

import pytest
import torch

from mapper.ops import arith

POWERS_OF_TWO = [2, 4, 8.0, 0.5, 0.25, -2, 1]


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 bit patterns of a 16-bit float format."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def float64_way(x: torch.Tensor, scale: float, offset: float, invert: bool) -> torch.Tensor:
    """How affine computed before: in float64, rounded once (without adding a zero offset)."""
    w = x.to(torch.float64)
    if invert:
        w = (w - offset) / scale
    else:
        w = w * scale + offset if offset else w * scale
    return w.to(x.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def round_trips(x: torch.Tensor, scale: float, offset: float, invert: bool) -> torch.Tensor:
    """Per element: does the opposite map, float64 way, give the input back bit for bit?"""
    y = float64_way(x, scale, offset, invert)
    return bits(float64_way(y, scale, offset, not invert)) == bits(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", POWERS_OF_TWO)
@pytest.mark.parametrize("invert", [False, True])
def test_a_power_of_two_scale_gives_the_float64_bits_for_every_16_bit_value(
    dtype: torch.dtype, scale: float, invert: bool
) -> None:
    x = every_value(dtype)
    y, _ = arith.affine(x, scale, 0.0, invert=invert)
    assert torch.equal(bits(y), bits(float64_way(x, scale, 0.0, invert)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [2, 0.5, -2, 1])
@pytest.mark.parametrize("invert", [False, True])
def test_the_exactness_flag_is_true_exactly_when_every_value_comes_back(
    dtype: torch.dtype, scale: float, invert: bool
) -> None:
    x = every_value(dtype)
    y, exact = arith.affine(x, scale, 0.0, invert=invert, check=True)
    back, _ = arith.affine(y, scale, 0.0, invert=not invert)
    assert exact == torch.equal(bits(back), bits(x))  # the whole tensor, NaNs included
    # Element by element (a NaN's payload depends on whether torch converts it in a vector or
    # alone, so NaNs are left to the whole-tensor statement above):
    numbers = x[~torch.isnan(x)]
    fine = round_trips(numbers, scale, 0.0, invert)
    assert arith.affine(numbers[fine], scale, 0.0, invert=invert, check=True)[1]
    lost = numbers[~fine]
    assert lost.numel() > 0 or scale == 1  # overflow or subnormals losing bits: there are some
    for value in lost[:: max(1, lost.numel() // 300)]:  # each one alone is caught
        assert not arith.affine(value.reshape(1), scale, 0.0, invert=invert, check=True)[1], value


def test_float32_specials_and_subnormals_match_the_float64_way() -> None:
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45,
                             1.1754942e-38, 3.4028235e38, -3.4028235e38], dtype=torch.float32)
    x = torch.cat([patterns.view(torch.float32), specials])
    for scale in (2, 0.5, 1024, 2.0**-20):
        for invert in (False, True):
            y, exact = arith.affine(x, scale, 0.0, invert=invert, check=True)
            assert torch.equal(bits(y), bits(float64_way(x, scale, 0.0, invert)))
            fine = round_trips(x, scale, 0.0, invert)
            assert exact == bool(fine.all())
            assert arith.affine(x[fine], scale, 0.0, invert=invert, check=True)[1]


def test_a_zero_offset_keeps_the_sign_of_zero_and_the_round_trip_exact() -> None:
    x = torch.tensor([-0.0, 0.0, -1.5], dtype=torch.bfloat16)
    for scale in (2, 3):
        y, exact = arith.affine(x, scale, 0.0, check=True)
        assert torch.signbit(y).tolist() == [True, False, True]
        assert exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("scale", "offset"), [(3, 0.0), (1.0, 1.0), (-3.0, 0.25), (0.1, 1e-3)])
def test_other_scales_and_offsets_give_the_float64_bits_a_block_at_a_time(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, scale: float, offset: float
) -> None:
    monkeypatch.setattr(arith, "BLOCK", 1000)  # many blocks, the last one short
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 1001, generator=gen) * 100).to(dtype)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0]).to(dtype)
    for invert in (False, True):
        y, exact = arith.affine(x, scale, offset, invert=invert, check=True)
        assert torch.equal(bits(y), bits(float64_way(x, scale, offset, invert)))
        assert exact == bool(round_trips(x, scale, offset, invert).all())


@pytest.mark.parametrize("block", [2, 7, 1 << 18])  # smaller than a row, a few rows, all of it
def test_a_strided_input_gives_a_contiguous_result_of_its_shape(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    monkeypatch.setattr(arith, "BLOCK", block)
    x = torch.randn(6, 8).to(torch.bfloat16)
    x[5, 4] = torch.finfo(torch.bfloat16).max
    for scale, offset in ((2, 0.0), (0.5, 0.0), (3, 1.0)):
        for invert in (False, True):
            y, exact = arith.affine(x[:, 2:5], scale, offset, invert=invert, check=True)
            assert y.is_contiguous() and y.shape == (6, 3)
            assert torch.equal(bits(y), bits(float64_way(x[:, 2:5], scale, offset, invert)))
            assert exact == bool(round_trips(x[:, 2:5], scale, offset, invert).all())


def test_the_inexact_block_is_found_whichever_block_it_is_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arith, "BLOCK", 16)
    x = torch.ones(100, dtype=torch.bfloat16)
    assert arith.affine(x, 2, 0.0, check=True)[1]
    x[77] = torch.finfo(torch.bfloat16).max  # doubles to inf
    y, exact = arith.affine(x, 2, 0.0, check=True)
    assert not exact and torch.isinf(y[77])


def test_tree_sum_adds_pairwise_in_the_dtype_like_a_balanced_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arith, "BLOCK", 7)
    gen = torch.Generator().manual_seed(2)
    parts = [torch.randn(5, 9, generator=gen).to(torch.bfloat16) for _ in range(3)]
    expected = (parts[0] + parts[1]) + parts[2]
    assert torch.equal(bits(arith.tree_sum(parts)), bits(expected))
    four = parts + [parts[0]]
    assert torch.equal(bits(arith.tree_sum(four)), bits((four[0] + four[1]) + (four[2] + four[3])))


def test_mean_is_the_float64_mean_rounded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arith, "BLOCK", 10)
    gen = torch.Generator().manual_seed(3)
    for count in (2, 3, 4):
        parts = [torch.randn(3, 11, generator=gen).to(torch.float16) for _ in range(count)]
        expected = torch.stack([p.to(torch.float64) for p in parts]).mean(0).to(torch.float16)
        assert torch.equal(bits(arith.mean(parts)), bits(expected))


def test_powers_of_two_are_told_apart() -> None:
    assert all(arith.power_of_two(v) for v in (1, 2, 4.0, 0.5, -8, 2.0**-30))
    assert not any(arith.power_of_two(v) for v in (0, 3, -3, 0.1, float("inf"), float("nan")))
