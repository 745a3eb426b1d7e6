"""The entropy-coded code stream (bct_onnx/code_entropy.py): round trips, the canonical code, bad streams."""

from __future__ import annotations

import numpy as np
import pytest

from bct_onnx import code_entropy
from bct_onnx.block_format import pack_codes

RNG = np.random.default_rng(0)


def _codes(bits: int, shape: tuple[int, int], spread: float = 0.25) -> np.ndarray:
    """Bell-shaped codes around the middle of the range, as symmetric weight codes are."""
    x = np.round(RNG.standard_normal(shape) * spread * 2**bits + 2 ** (bits - 1))
    return np.clip(x, 0, 2**bits - 1).astype(np.uint8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("chunk_symbols", [1, 5, 64, 100000])
def test_round_trip_is_exact(bits, chunk_symbols):
    codes = _codes(bits, (13, 29))
    stream = code_entropy.encode(codes, bits, chunk_symbols)
    np.testing.assert_array_equal(code_entropy.decode(stream), codes)
    np.testing.assert_array_equal(
        code_entropy.decode_packed(stream, bits, 29), pack_codes(codes, bits)
    )


def test_packed_round_trip_and_smaller_for_peaked_codes():
    codes = _codes(4, (256, 384), spread=0.12)
    packed = pack_codes(codes, 4)
    stream = code_entropy.encode_packed(packed, 4, 384)
    np.testing.assert_array_equal(code_entropy.decode_packed(stream, 4, 384), packed)
    assert stream.nbytes < packed.nbytes
    counts = np.bincount(codes.ravel(), minlength=16) / codes.size
    entropy = -(counts[counts > 0] * np.log2(counts[counts > 0])).sum()
    # Huffman is within one bit of the entropy, and here within 0.1 (plus the header and offsets).
    assert entropy <= code_entropy.bits_per_value(stream) <= entropy + 0.1


def test_canonical_code_of_a_worked_example():
    # DEFLATE's own example (RFC 1951, 3.2.2): lengths (3, 3, 3, 3, 3, 2, 4, 4) give these codes.
    lengths = np.array([3, 3, 3, 3, 3, 2, 4, 4])
    assert code_entropy.canonical_codes(lengths).tolist() == [2, 3, 4, 5, 6, 0, 14, 15]


def test_stream_header_fields():
    codes = _codes(3, (7, 11))
    stream = code_entropy.encode(codes, 3, chunk_symbols=20)
    header = code_entropy.read_header(stream)
    assert bytes(stream[:4]) == b"BCTH" and stream[4] == 1 and stream[5] == 3
    assert (header.rows, header.row_length, header.chunk_symbols, header.chunk_count) == (7, 11, 20, 4)
    assert header.offsets[0] == 0 and header.payload_start + header.offsets[-1] == stream.size
    assert 1 <= header.max_length <= code_entropy.MAX_CODE_LENGTH


def test_one_symbol_and_length_limit():
    same = np.full((4, 9), 5, np.uint8)
    stream = code_entropy.encode(same, 4)
    assert code_entropy.read_header(stream).lengths.tolist().count(1) == 1
    np.testing.assert_array_equal(code_entropy.decode(stream), same)
    # Fibonacci counts make Huffman codes as long as there are symbols: 256 of them must be limited.
    counts = np.array([1, 1] + [0] * 254, np.int64)
    for i in range(2, 40):
        counts[i] = counts[i - 1] + counts[i - 2]
    counts[40:] = 1
    lengths = code_entropy.code_lengths(counts)
    assert lengths.max() <= code_entropy.MAX_CODE_LENGTH
    assert sum(2.0 ** -int(n) for n in lengths if n) == 1.0  # still a complete prefix code
    symbols = np.repeat(np.arange(256), np.minimum(counts, 50)).astype(np.uint8)
    RNG.shuffle(symbols)
    stream = code_entropy.encode(symbols.reshape(1, -1), 8)
    np.testing.assert_array_equal(code_entropy.decode(stream).ravel(), symbols)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda s: s[:10], "no BCTH header"),
        (lambda s: np.concatenate((np.frombuffer(b"XXXX", np.uint8), s[4:])), "no BCTH header"),
        (lambda s: _with(s, 4, 2), "version 2"),
        (lambda s: _with(s, 28, 9), "chunk_count"),
        (lambda s: s[:-1], "chunk offsets"),
        (lambda s: _with(s, 32 + 8, 0), "max_length|prefix code"),
    ],
)
def test_bad_streams_are_named(corrupt, message):
    stream = code_entropy.encode(_codes(4, (8, 16)), 4, chunk_symbols=40)
    with pytest.raises(code_entropy.EntropyCodeError, match=message):
        code_entropy.decode(corrupt(stream))


def _with(stream: np.ndarray, index: int, value: int) -> np.ndarray:
    out = stream.copy()
    out[index] = value
    return out


def test_decode_packed_checks_the_ops_attributes():
    stream = code_entropy.encode(_codes(4, (3, 10)), 4)
    with pytest.raises(code_entropy.EntropyCodeError, match="the op expects 3-bit codes in rows of 10"):
        code_entropy.decode_packed(stream, 3, 10)
    with pytest.raises(code_entropy.EntropyCodeError, match="empty"):
        code_entropy.encode(np.zeros((0, 4), np.uint8), 4)
    with pytest.raises(code_entropy.EntropyCodeError, match="codes must be in 0..7"):
        code_entropy.encode(np.full((1, 2), 8, np.uint8), 3)
