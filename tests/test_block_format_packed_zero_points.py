"""Integer zero points packed at the code width (ZeroPointKind.PACKED) in the block format spec."""

from __future__ import annotations

import numpy as np
import pytest

from bct_onnx.block_format import (
    BlockFormat,
    ScaleKind,
    ZeroPointKind,
    dequantize,
    pack_codes,
    pack_zero_points,
    quantize,
    unpack_zero_points,
)
from bct_onnx.weight_quantizer import quantize_tensor


@pytest.mark.parametrize("bits,num_blocks", [(2, 7), (3, 5), (4, 1), (4, 3), (4, 24), (5, 9), (7, 4), (8, 6)])
def test_round_trip(bits, num_blocks):
    zp = np.random.default_rng(bits).integers(0, 1 << bits, (3, 4, num_blocks)).astype(np.uint8)
    packed = pack_zero_points(zp, bits)
    assert packed.shape == (-(-zp.size * bits // 8),) and packed.dtype == np.uint8  # no padding between rows
    np.testing.assert_array_equal(packed, pack_codes(zp.reshape(1, -1), bits)[0])  # laid out like one row of codes
    np.testing.assert_array_equal(unpack_zero_points(packed, bits, zp.shape), zp)


def test_4_bit_zero_points_are_two_a_byte_first_block_in_the_low_nibble():
    packed = pack_zero_points(np.array([[1, 2, 15], [4, 5, 6]], np.uint8), 4)
    np.testing.assert_array_equal(packed, [0x21, 0x4F, 0x65])


def test_zero_point_out_of_range_and_wrong_length_are_refused():
    with pytest.raises(ValueError, match="zero point 16 does not fit in 4 bits"):
        pack_zero_points(np.array([[3, 16]], np.uint8), 4)
    with pytest.raises(ValueError, match=r"must have shape \(8,\) \(ceil\(20 \* 3 / 8\)\), got \(4, 5\)"):
        unpack_zero_points(np.zeros((4, 5), np.uint8), 3, (4, 5))
    with pytest.raises(ValueError, match=r"got \(7,\)"):
        unpack_zero_points(np.zeros(7, np.uint8), 3, (4, 5))


@pytest.mark.parametrize("scale_kind", [ScaleKind.FLOAT16, ScaleKind.FLOAT8E5M2])
def test_packed_format_rounds_as_integer_and_stores_fewer_bits(scale_kind):
    x = np.random.default_rng(0).standard_normal((6, 100)).astype(np.float32) + 0.5
    integer = BlockFormat(4, 32, False, scale_kind, ZeroPointKind.INTEGER)
    packed = BlockFormat(4, 32, False, scale_kind, ZeroPointKind.PACKED)
    assert packed.packed_zero_points and not integer.packed_zero_points
    assert not BlockFormat(4, 32, True, scale_kind, ZeroPointKind.PACKED).packed_zero_points
    scale_bits = 8 * packed.scale_dtype.itemsize
    assert packed.storage_bits_per_value() == 4 + (scale_bits + 4) / 32  # 4.375 with one-byte scales
    assert integer.storage_bits_per_value() == 4 + (scale_bits + 8) / 32
    for a, b in ((quantize(x, integer), quantize(x, packed)), (quantize_tensor(x, integer), quantize_tensor(x, packed))):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scales, b.scales)
        np.testing.assert_array_equal(a.zero_points, b.zero_points)  # held one a block in memory
        np.testing.assert_array_equal(dequantize(a), dequantize(b))
        assert a.stored_zero_points is a.zero_points
        np.testing.assert_array_equal(b.stored_zero_points, pack_zero_points(b.zero_points, 4))
        assert a.nbytes - b.nbytes == 24 - 12  # 6 rows of 4 blocks: 24 bytes -> 12
