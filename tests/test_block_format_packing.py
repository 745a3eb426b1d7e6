"""The packing of codes (block_format.pack_codes / unpack_codes) against the layout as documented."""

from __future__ import annotations

import numpy as np
import pytest

from bct_onnx.block_format import pack_codes, unpack_codes


def _pack_bit_by_bit(codes: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout, one bit at a time: code i of a row occupies bits [i * bits, (i + 1) * bits)
    of the row's bytes, least significant bit first."""
    rows, d = codes.shape
    out = np.zeros((rows, -(-d * bits // 8)), np.uint8)
    for r in range(rows):
        for i in range(d):
            for bit in range(bits):
                if (int(codes[r, i]) >> bit) & 1:
                    position = i * bits + bit
                    out[r, position // 8] |= 1 << (position % 8)
    return out


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("d", [1, 7, 8, 9, 17, 33, 64])
def test_pack_codes_is_the_documented_bit_layout(bits: int, d: int) -> None:
    rng = np.random.default_rng(bits * 100 + d)
    codes = rng.integers(0, 1 << bits, (3, d)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.flags.c_contiguous  # kernels read the bytes by pointer
    np.testing.assert_array_equal(packed, _pack_bit_by_bit(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, d), codes)


def test_pack_codes_keeps_leading_axes_and_reads_strided_views() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (2, 3, 40)).astype(np.uint8)
    packed = pack_codes(codes, 4)
    assert packed.shape == (2, 3, 20)
    np.testing.assert_array_equal(packed.reshape(6, 20), _pack_bit_by_bit(codes.reshape(6, 40), 4))
    transposed = np.ascontiguousarray(codes[0].T).T  # a Fortran-ordered view, as GPTQ hands over
    np.testing.assert_array_equal(pack_codes(transposed, 4), packed[0])
