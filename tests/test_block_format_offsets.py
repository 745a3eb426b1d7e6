"""The float-offset ("min") asymmetric variant of the block format spec (bct_onnx/block_format.py).

value = u * scale + offset, offsets float16 (float16 / pow2 scales) or float32 (float32 scales).
"""

from __future__ import annotations

import numpy as np
import pytest

from bct_onnx.block_format import (
    BlockFormat,
    ScaleKind,
    ZeroPointKind,
    default_scale_factor,
    dequantize,
    fake_quantize,
    quantize,
    quantize_codes,
    scales_to_float32,
)


def q4_1_like(rng: np.random.Generator, rows: int, nb: int, block_size: int = 32) -> tuple[np.ndarray, ...]:
    """float32 rows of blocks d * q + m (float16 d > 0 and m, q in 0..15 with 0 and 15 both present),
    computed as gguf-py dequantizes Q4_1: float32(d) * float32(q) + float32(m)."""
    d = rng.uniform(1e-3, 5e-2, (rows, nb)).astype(np.float16)
    m = (-(8 + rng.normal(0, 2, (rows, nb))) * d.astype(np.float32)).astype(np.float16)
    q = rng.integers(0, 16, (rows, nb, block_size))
    q[..., 3] = 0
    q[..., 17 % block_size] = 15
    x = d.astype(np.float32)[..., None] * q.astype(np.float32) + m.astype(np.float32)[..., None]
    return x.astype(np.float32).reshape(rows, nb * block_size), d, m, q


def test_format_fields_and_storage() -> None:
    f16 = BlockFormat(4, 32, False, ScaleKind.FLOAT16, ZeroPointKind.FLOAT)
    assert f16.float_offsets and f16.zero_point_dtype == np.float16
    assert f16.storage_bits_per_value() == 4 + 32 / 32  # 16-bit scale + 16-bit offset per 32 values
    pow2 = BlockFormat(4, 32, False, ScaleKind.POW2, "float")
    assert pow2.zero_point_dtype == np.float16 and pow2.storage_bits_per_value() == 4 + 24 / 32
    f32 = BlockFormat(4, 32, False, ScaleKind.FLOAT32, "float")
    assert f32.zero_point_dtype == np.float32 and f32.storage_bits_per_value() == 4 + 64 / 32
    integer = BlockFormat(4, 32, False, ScaleKind.FLOAT16)
    assert not integer.float_offsets and integer.zero_point_dtype == np.uint8
    assert integer.storage_bits_per_value() == 4 + 24 / 32
    assert BlockFormat(4, 32, True).zero_point_dtype is None
    with pytest.raises(ValueError, match="needs symmetric=False"):
        BlockFormat(4, 32, True, ScaleKind.FLOAT16, "float")
    with pytest.raises(ValueError):
        BlockFormat(4, 32, False, ScaleKind.FLOAT16, "fractional")
    x = np.random.default_rng(0).standard_normal((3, 70)).astype(np.float32)
    q = quantize(x, f16)
    assert q.zero_points is not None and q.zero_points.dtype == np.float16 and q.zero_points.shape == (3, 3)
    assert q.nbytes == q.codes.nbytes + 3 * 3 * 2 + 3 * 3 * 2


@pytest.mark.parametrize("kind", [ScaleKind.FLOAT16, ScaleKind.FLOAT32], ids=lambda k: k.value)
def test_q4_1_grid_round_trips_exactly(kind: ScaleKind) -> None:
    """Data already of the form d * q + m (float16 d and m) comes back bit for bit, codes q, scale d, offset m."""
    x, d, m, q = q4_1_like(np.random.default_rng(1), 300, 6)
    fmt = BlockFormat(4, 32, False, kind, "float")
    codes, scales, offsets = quantize_codes(x, fmt)
    np.testing.assert_array_equal(codes.reshape(q.shape), q)
    np.testing.assert_array_equal(scales.astype(np.float32), d.astype(np.float32))
    assert offsets is not None
    np.testing.assert_array_equal(offsets.astype(np.float32), m.astype(np.float32))
    y = dequantize(quantize(x, fmt))
    assert np.array_equal(y.view(np.uint32), x.view(np.uint32))


def test_value_is_product_then_sum_without_fma() -> None:
    """u * scale rounds to float32 before the offset is added (an FMA would differ here)."""
    fmt = BlockFormat(8, 4, False, ScaleKind.FLOAT32, "float")
    scale = np.float32(1 + 2**-23)
    codes = np.array([[255, 3, 0, 1]], np.uint8)
    offset = np.float32(-255.0)
    from bct_onnx.block_format import dequantize_codes

    y = dequantize_codes(codes, np.array([[scale]], np.float32), np.array([[offset]], np.float32), fmt)
    expect = (codes.astype(np.float32) * scale).astype(np.float32) + offset
    np.testing.assert_array_equal(y, expect)
    fused = np.float32(np.float64(255) * np.float64(scale) + np.float64(offset))
    assert y[0, 0] != fused  # the test data tells the two apart


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", list(ScaleKind), ids=lambda k: k.value)
def test_codes_rule_and_error_bound(bits: int, kind: ScaleKind) -> None:
    """codes = clamp(rne((x - offset) / scale)); the block minimum is the offset; errors within half a step."""
    fmt = BlockFormat(bits, 16, False, kind, "float")
    x = np.random.default_rng(bits).standard_normal((5, 16 * 4 + 7)).astype(np.float32) + 3.0  # one-signed
    factor = default_scale_factor(x, fmt)
    codes, scales, offsets = quantize_codes(x, fmt, factor)
    assert offsets is not None
    y = fake_quantize(x, fmt)
    step = np.repeat(scales_to_float32(scales, kind, factor), 16, axis=-1)[:, : x.shape[1]]
    off = np.repeat(offsets.astype(np.float32), 16, axis=-1)[:, : x.shape[1]]
    half_ulp = np.abs(off) * 2.0**-11 if fmt.zero_point_dtype == np.float16 else np.abs(off) * 2.0**-24
    # within half a step inside the range; an offset rounded up may clip the minimum by < half an ulp
    assert np.all(np.abs(y - x) <= step / 2 * (1 + 1e-5) + half_ulp + 1e-6)
    inv = np.where(step == 0, 0, 1 / step).astype(np.float32)
    want = np.clip(np.rint((x - off).astype(np.float32) * inv), 0, fmt.qmax)
    np.testing.assert_array_equal(codes, want.astype(np.uint8))


def test_partial_block_min_max_are_the_real_elements() -> None:
    """A partial last block is not padded with zeros: its offset is its own minimum (here 5, not 0)."""
    fmt = BlockFormat(2, 4, False, ScaleKind.FLOAT16, "float")
    x = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 5.75]], np.float32)
    q = quantize(x, fmt)
    assert q.zero_points is not None
    np.testing.assert_array_equal(q.zero_points.astype(np.float32), [[1.0, 5.0]])
    np.testing.assert_array_equal(scales_to_float32(q.scales, fmt.scale_kind), [[1.0, 0.25]])
    np.testing.assert_array_equal(dequantize(q)[0, 4:], [5.0, 5.75])


@pytest.mark.parametrize("kind", list(ScaleKind), ids=lambda k: k.value)
def test_constant_block(kind: ScaleKind) -> None:
    """A constant block: offset = the value (rounded), scale 0 (pow2: exponent 0), codes 0."""
    fmt = BlockFormat(3, 4, False, kind, "float")
    x = np.full((2, 4), 3.3, np.float32)
    q = quantize(x, fmt)
    codes, _, _ = quantize_codes(x, fmt, q.scale_factor)
    assert np.all(codes == 0)
    expect_scale = 1.0 if kind is ScaleKind.POW2 else 0.0
    np.testing.assert_array_equal(
        scales_to_float32(q.scales, kind, q.scale_factor), np.full((2, 1), expect_scale, np.float32)
    )
    np.testing.assert_array_equal(dequantize(q), np.full((2, 4), np.float32(q.zero_points[0, 0]), np.float32))


def test_offsets_beat_integer_zero_points_on_one_signed_blocks() -> None:
    """Blocks far from 0: an integer zero point must keep 0 in range, a float offset need not."""
    x = np.random.default_rng(3).uniform(5.0, 6.0, (64, 256)).astype(np.float32)
    err_int = np.mean((fake_quantize(x, BlockFormat(4, 32, False)) - x) ** 2)
    err_float = np.mean((fake_quantize(x, BlockFormat(4, 32, False, "float16", "float")) - x) ** 2)
    assert err_float < err_int / 20
