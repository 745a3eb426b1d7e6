"""codes_coding = "huffman": the kernels decode the stream at creation exactly as bct_onnx/code_entropy.py.

BlockMatMul and BlockGather with entropy-coded codes must give bit for bit what they give with the
packed codes (which the other tests check against the spec), and a bad stream fails at session
creation with a message naming node, input and problem.
"""

from __future__ import annotations

import numpy as np
import pytest
from support import run_matmul
from support import weight_matmul_model as matmul_model

import bct_onnx
from bct_onnx import code_entropy
from bct_onnx.block_format import BlockFormat, ScaleKind, quantize, unpack_codes

CASES = [(4, 32, 96, 40), (3, 16, 37, 23), (8, 32, 64, 9), (2, 8, 50, 17), (5, 6, 41, 11)]  # bits, block, K, N


def _weights(bits: int, block_size: int, k: int, n: int, symmetric: bool = True):
    w = np.random.default_rng(bits * 100 + k).standard_normal((n, k)).astype(np.float32)
    return quantize(w, BlockFormat(bits, block_size, symmetric, ScaleKind.FLOAT8E5M2 if symmetric else ScaleKind.FLOAT16))


@pytest.mark.parametrize("bits,block_size,k,n", CASES)
@pytest.mark.parametrize("act_bits", [0, 8])
def test_matmul_with_coded_codes_equals_packed(bits, block_size, k, n, act_bits) -> None:
    q = _weights(bits, block_size, k, n)
    stream = code_entropy.encode_packed(q.codes, bits, k, chunk_symbols=100)  # several chunks
    common = dict(k=k, n=n, bits=bits, block_size=block_size, symmetric=True, act_bits=act_bits,
                  scales=q.scales, zero_points=None, bias=None)
    a = np.random.default_rng(1).standard_normal((3, 5, k)).astype(np.float32)
    packed = run_matmul(matmul_model(codes=q.codes, **common), a)
    coded = run_matmul(matmul_model(codes=stream, codes_coding="huffman", **common), a)
    np.testing.assert_array_equal(coded.view(np.uint32), packed.view(np.uint32))


def test_asymmetric_matmul_with_coded_codes(kit) -> None:
    q = _weights(4, 32, 64, 12, symmetric=False)
    stream = code_entropy.encode_packed(q.codes, 4, 64)
    common = dict(k=64, n=12, bits=4, block_size=32, symmetric=False, act_bits=0, scales=q.scales,
                  zero_points=q.zero_points, bias=np.arange(12, dtype=np.float32))
    a = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    packed = run_matmul(matmul_model(codes=q.codes, **common), a)
    coded = run_matmul(matmul_model(codes=stream, codes_coding="huffman", **common), a)
    kit.assert_bits_equal(coded, packed, "y")


@pytest.mark.parametrize("bits,block_size,axis_size", [(4, 32, 96), (3, 32, 70), (8, 16, 33)])
def test_gather_with_coded_codes_equals_packed(kit, bits, block_size, axis_size) -> None:
    fmt = BlockFormat(bits, block_size, True, ScaleKind.FLOAT8E5M2)
    table = quantize(np.random.default_rng(bits).standard_normal((57, axis_size)).astype(np.float32), fmt)
    stream = code_entropy.encode_packed(table.codes, bits, axis_size, chunk_symbols=333)
    coded_table = type(table)(stream, table.scales, table.zero_points, table.axis_size, table.fmt)
    indices = np.array([[0, 56, -1, 5], [7, -57, 3, 3]], np.int64)
    (packed,) = kit.run(kit.gather_model(fmt, axis_size, table), {"indices": indices})
    (coded,) = kit.run(kit.gather_model(fmt, axis_size, coded_table, codes_coding="huffman"), {"indices": indices})
    kit.assert_bits_equal(coded, packed, "y")


def test_decoded_layout_is_the_spec(kit) -> None:
    """The C++ decoder's packed bytes are the numpy decoder's: a gather of every row of 8-bit codes
    with scale 1 returns the code values themselves."""
    fmt = BlockFormat(8, 16, False, ScaleKind.FLOAT32)
    codes = np.random.default_rng(5).integers(0, 256, (20, 31)).astype(np.uint8)
    codes[:, 0] = 7  # a skewed symbol histogram: codes of different lengths
    stream = code_entropy.encode(codes, 8, chunk_symbols=64)
    np.testing.assert_array_equal(code_entropy.decode(stream), codes)
    scales = np.ones((20, 2), np.float32)
    zero_points = np.zeros((20, 2), np.uint8)
    table = type(quantize(np.zeros((1, 31), np.float32), fmt))(stream, scales, zero_points, 31, fmt)
    (got,) = kit.run(kit.gather_model(fmt, 31, table, codes_coding="huffman"), {"indices": np.arange(20)})
    np.testing.assert_array_equal(got, codes.astype(np.float32))
    np.testing.assert_array_equal(unpack_codes(code_entropy.decode_packed(stream, 8, 31), 8, 31), codes)


def _session_error(model: bytes) -> str:
    with pytest.raises(Exception) as error:
        bct_onnx.session(model)
    return str(error.value)


def test_bad_streams_fail_at_session_creation_naming_node_and_input() -> None:
    q = _weights(4, 32, 64, 8)
    stream = code_entropy.encode_packed(q.codes, 4, 64)
    common = dict(k=64, n=8, bits=4, block_size=32, symmetric=True, act_bits=0, scales=q.scales,
                  zero_points=None, bias=None, node_name="coded_mm")
    message = _session_error(matmul_model(codes=q.codes, codes_coding="huffman", **common))
    assert "coded_mm" in message and "W_codes" in message and "no BCTH header" in message
    truncated = stream[:-3]
    assert "offsets" in _session_error(matmul_model(codes=truncated, codes_coding="huffman", **common))
    wrong_k = dict(common, k=96, scales=np.zeros((8, 3), q.scales.dtype))
    assert "rows of 64" in _session_error(matmul_model(codes=stream, codes_coding="huffman", **wrong_k))
    assert "'codes_coding' must be 'none' or 'huffman'" in _session_error(
        matmul_model(codes=stream, codes_coding="rans", **common)
    )
    message = _session_error(matmul_model(codes=stream, codes_coding="huffman", constant_weights=False, **common))
    assert "must be a constant initializer" in message


def test_corrupt_payload_is_an_error_not_a_crash() -> None:
    q = _weights(4, 32, 64, 8)
    stream = code_entropy.encode_packed(q.codes, 4, 64, chunk_symbols=128)
    payload_start = code_entropy.read_header(stream).payload_start
    common = dict(k=64, n=8, bits=4, block_size=32, symmetric=True, act_bits=0, scales=q.scales,
                  zero_points=None, bias=None)
    rng = np.random.default_rng(9)
    for _ in range(5):  # random payload bytes: either decodes to something or fails cleanly
        bad = stream.copy()
        bad[payload_start:] = rng.integers(0, 256, bad.size - payload_start, dtype=np.uint8)
        try:
            expected = code_entropy.decode(bad)
        except code_entropy.EntropyCodeError:
            assert "chunk" in _session_error(matmul_model(codes=bad, codes_coding="huffman", **common))
            continue
        model = matmul_model(codes=bad, codes_coding="huffman", **common)
        decoded = matmul_model(codes=code_entropy.encode_packed(
            code_entropy.decode_packed(bad, 4, 64), 4, 64), codes_coding="huffman", **common)
        a = np.ones((1, 64), np.float32)
        np.testing.assert_array_equal(run_matmul(model, a), run_matmul(decoded, a))
        assert expected.shape == (8, 64)
