"""float8e5m2 block scales in the numpy spec: stored as ONNX FLOAT8E5M2, rounded away from zero."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bct_onnx.block_format import (
    BlockFormat,
    ScaleKind,
    dequantize,
    float8e5m2_at_least,
    quantize,
    scale_kind_of,
    scales_to_float32,
)
from bct_onnx.weight_quantizer import quantize_tensor

E5M2 = np.dtype(ml_dtypes.float8_e5m2)


def test_float8e5m2_is_the_upper_byte_of_a_float16():
    every = np.arange(256, dtype=np.uint8).view(E5M2)
    as_half = (np.arange(256, dtype=np.uint16) << 8).view(np.float16)
    np.testing.assert_array_equal(scales_to_float32(every, ScaleKind.FLOAT8E5M2), as_half.astype(np.float32))


def test_rounding_away_from_zero_never_shrinks_a_magnitude():
    values = np.array([0.3, -0.3, 0.25, -0.25, 1e-6, 2.0**-16, 0.0, 57344.0, 1e5], np.float32)
    got = float8e5m2_at_least(values).astype(np.float32)
    np.testing.assert_array_equal(got[:4], [0.3125, -0.3125, 0.25, -0.25])  # exact values stay
    assert got[4] == got[5] == 2.0**-16  # the smallest subnormal
    assert got[6] == 0.0 and got[7] == 57344.0 and np.isinf(got[8])
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * np.exp(rng.uniform(-10, 5, 10_000))).astype(np.float32)
    stored = float8e5m2_at_least(x).astype(np.float32)
    assert np.all(np.abs(stored) >= np.abs(x)) and np.all(np.sign(stored) == np.sign(x))
    assert np.all(np.abs(stored) <= np.abs(x) * 1.25 + 2.0**-16)  # at most one step (2 mantissa bits) up


@pytest.mark.parametrize("symmetric,zero_points", [(True, "integer"), (False, "integer"), (False, "float")])
def test_codes_stay_in_range_and_error_is_close_to_float16(symmetric, zero_points):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 96)).astype(np.float32)
    fp8 = quantize(x, BlockFormat(4, 32, symmetric, ScaleKind.FLOAT8E5M2, zero_points))
    assert fp8.scales.dtype == E5M2 and scale_kind_of(fp8.scales) is ScaleKind.FLOAT8E5M2
    half = quantize(x, BlockFormat(4, 32, symmetric, ScaleKind.FLOAT16, zero_points))
    err_fp8 = np.sqrt(np.mean((dequantize(fp8) - x) ** 2))
    err_half = np.sqrt(np.mean((dequantize(half) - x) ** 2))
    if symmetric:  # the scale is rounded up, so each block's largest magnitude is never clipped
        blocks = x.reshape(256, 3, 32)
        first = np.argmax(np.abs(blocks), axis=-1)[..., None]
        err = np.take_along_axis(np.abs(dequantize(fp8).reshape(256, 3, 32) - blocks), first, axis=-1)[..., 0]
        assert np.all(err <= np.abs(scales_to_float32(fp8.scales, "float8e5m2")) / 2)
    assert err_fp8 < 1.3 * err_half


def test_scale_search_recovers_most_of_float16s_accuracy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    err = {
        kind: np.sqrt(np.mean((dequantize(quantize_tensor(x, BlockFormat(4, 32, True, kind))) - x) ** 2))
        for kind in (ScaleKind.FLOAT16, ScaleKind.FLOAT8E5M2, ScaleKind.POW2)
    }
    assert err[ScaleKind.FLOAT16] < err[ScaleKind.FLOAT8E5M2] < err[ScaleKind.POW2]
    assert err[ScaleKind.FLOAT8E5M2] < 1.12 * err[ScaleKind.FLOAT16]  # pow2 is ~1.4x


def test_scale_kind_of_names_an_unknown_dtype():
    with pytest.raises(ValueError, match="int32"):
        scale_kind_of(np.zeros(3, np.int32))
