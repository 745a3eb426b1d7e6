"""float8e4m3 block scales with one float32 factor per tensor in the numpy spec:
scale = e4m3fn(byte) * scale_factor, the byte rounded away from zero."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bct_onnx.block_format import (
    FLOAT8E4M3_MAX,
    BlockFormat,
    QuantizedTensor,
    ScaleKind,
    dequantize,
    fake_quantize,
    float8e4m3_at_least,
    float8e4m3_scale_factor,
    quantize,
    scale_kind_of,
    scales_to_float32,
)
from bct_onnx.weight_quantizer import quantize_tensor

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def test_rounding_away_from_zero_saturates_at_448():
    values = np.array([0.3, -0.3, 0.3125, 448.0, 460.0, 1e9, -1e9, 0.0, 2.0**-12], np.float32)
    got = float8e4m3_at_least(values).astype(np.float32)
    np.testing.assert_array_equal(got[:8], [0.3125, -0.3125, 0.3125, 448.0, 448.0, 448.0, -448.0, 0.0])
    assert got[8] == 2.0**-9  # the smallest subnormal
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * np.exp(rng.uniform(-4, 5, 10_000))).astype(np.float32)
    x = x[np.abs(x) <= FLOAT8E4M3_MAX]
    stored = float8e4m3_at_least(x).astype(np.float32)
    assert np.all(np.abs(stored) >= np.abs(x)) and np.all(np.sign(stored) == np.sign(x))
    normal = np.abs(x) >= 2.0**-6
    assert np.all(np.abs(stored[normal]) <= np.abs(x[normal]) * 1.125)  # at most one step (3 mantissa bits) up


def test_scale_is_the_byte_times_the_factor():
    every = np.arange(256, dtype=np.uint8).view(E4M3)
    finite = ~np.isnan(every.astype(np.float32))
    got = scales_to_float32(every[finite], ScaleKind.FLOAT8E4M3, 0.01)
    np.testing.assert_array_equal(got, every[finite].astype(np.float32) * np.float32(0.01))


@pytest.mark.parametrize("symmetric,zero_points", [(True, "integer"), (False, "packed"), (False, "float")])
def test_round_trip_and_error_between_float16_and_float8e5m2(symmetric, zero_points):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((256, 96)) * 0.02).astype(np.float32)
    err = {}
    for kind in (ScaleKind.FLOAT16, ScaleKind.FLOAT8E4M3, ScaleKind.FLOAT8E5M2):
        q = quantize_tensor(x, BlockFormat(4, 32, symmetric, kind, zero_points))
        err[kind] = float(np.mean((dequantize(q) - x) ** 2))
        if kind is ScaleKind.FLOAT8E4M3:
            assert q.scales.dtype == E4M3 and scale_kind_of(q.scales) is ScaleKind.FLOAT8E4M3
            assert q.scale_factor == float8e4m3_scale_factor(x, q.fmt)
            assert not np.isnan(q.scales.astype(np.float32)).any()
            # the largest scale lands on e4m3's top: no scale of a non-zero block is subnormal
            assert np.abs(q.scales.astype(np.float32)).max() >= 256
            assert np.abs(q.scales.astype(np.float32)).min() >= 2.0**-6
    assert err[ScaleKind.FLOAT16] < err[ScaleKind.FLOAT8E4M3] < err[ScaleKind.FLOAT8E5M2]
    plain = quantize(x, BlockFormat(4, 32, symmetric, ScaleKind.FLOAT8E4M3, zero_points))
    np.testing.assert_array_equal(dequantize(plain), fake_quantize(x, plain.fmt))


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_symmetric_scale_factor_is_the_largest_block_scale_over_448(bits):
    """float8e4m3_scale_factor of a symmetric format takes max |x| instead of every block's scale: the
    same factor as the blocks' float32 spec scales (choose_scales) give, also for subnormal, huge,
    NaN, infinite, float16, zero and empty inputs and a partial last block."""
    import dataclasses

    from bct_onnx.block_format import choose_scales, pad_to_blocks

    fmt = BlockFormat(bits, 32, True, ScaleKind.FLOAT8E4M3)
    plain = dataclasses.replace(fmt, scale_kind=ScaleKind.FLOAT32)

    def from_blocks(x):
        scales, _ = choose_scales(pad_to_blocks(np.asarray(x, dtype=np.float32), plain), plain)
        factor = np.float32(np.float32(np.abs(scales).max() if scales.size else 0.0) / np.float32(FLOAT8E4M3_MAX))
        return float(factor) if np.isfinite(factor) and factor > 0 else 1.0

    rng = np.random.default_rng(bits)
    inputs = [
        (rng.standard_normal((64, 96)) * 0.02).astype(np.float32),
        rng.standard_normal((7, 33)).astype(np.float32),  # a partial last block
        np.float32([[1e-44, -3e-45, 0.0]]),  # subnormal: the division rounds
        np.float32([[-3.4e38, 3e38]]),
        np.float32([[np.nan, 1.0]]),
        np.float32([[-np.inf, 1.0]]),
        (rng.standard_normal((5, 40)) * 1e-3).astype(np.float16),
        np.zeros((3, 32), np.float32),
        np.zeros((0, 32), np.float32),
    ]
    for x in inputs:
        assert float8e4m3_scale_factor(x, fmt) == from_blocks(x)


def test_symmetric_largest_magnitude_is_never_clipped():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 64)) * np.exp(rng.uniform(-3, 3, (64, 1)))).astype(np.float32)
    q = quantize(x, BlockFormat(4, 32, True, ScaleKind.FLOAT8E4M3))
    blocks = x.reshape(64, 2, 32)
    first = np.argmax(np.abs(blocks), axis=-1)[..., None]
    err = np.take_along_axis(np.abs(dequantize(q).reshape(64, 2, 32) - blocks), first, axis=-1)[..., 0]
    scale = np.abs(scales_to_float32(q.scales, ScaleKind.FLOAT8E4M3, q.scale_factor))
    assert np.all(err <= scale * (0.5 + 1e-5))


def test_all_zero_tensor_gets_factor_one():
    q = quantize(np.zeros((2, 40), np.float32), BlockFormat(4, 32, True, ScaleKind.FLOAT8E4M3))
    assert q.scale_factor == 1.0
    np.testing.assert_array_equal(dequantize(q), 0.0)


@pytest.mark.parametrize("factor", [None, 0.0, -1.0, float("nan"), float("inf"), 1e39])
def test_missing_or_bad_factor_is_a_clear_error(factor):
    q = quantize(np.ones((1, 32), np.float32), BlockFormat(4, 32, True, ScaleKind.FLOAT8E4M3))
    bad = QuantizedTensor(q.codes, q.scales, None, 32, q.fmt, factor)
    with pytest.raises(ValueError, match="scale_factor"):
        dequantize(bad)


def test_factor_on_another_kind_is_an_error():
    with pytest.raises(ValueError, match="float8e4m3 scales only"):
        scales_to_float32(np.ones(2, np.float16), ScaleKind.FLOAT16, 2.0)
