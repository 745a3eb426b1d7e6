"""zero_points_packed = 1: the kernels unpack the zero points at creation exactly as
block_format.unpack_zero_points.

BlockMatMul with packed zero points must give bit for bit what it gives with one byte a block
(which test_matmul.py checks against the spec) on every instruction-set path; BlockGather and
BlockDequantize must equal block_format.dequantize bit for bit. A bad packed input fails at session
creation with a message naming node, input and problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import run_matmul
from support import weight_matmul_model as matmul_model

import bct_onnx
from bct_onnx.block_format import (
    BlockFormat,
    ScaleKind,
    ZeroPointKind,
    dequantize,
    quantize,
)
from bct_onnx.ops import BLOCK_DEQUANTIZE, DOMAIN

ISAS = ("scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx")
# bits, block_size, K, N: odd widths, partial last blocks, an odd block count (a half-used last byte)
CASES = [(4, 32, 96, 40), (4, 16, 80, 9), (3, 16, 37, 23), (5, 6, 41, 11), (2, 8, 50, 17), (7, 32, 64, 5), (8, 32, 64, 9)]


def _asymmetric(bits: int, block_size: int, rows: int, axis_size: int, seed: int, scale_kind=ScaleKind.FLOAT8E5M2):
    fmt = BlockFormat(bits, block_size, False, scale_kind, ZeroPointKind.PACKED)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, axis_size)).astype(np.float32) + rng.standard_normal((rows, 1)).astype(np.float32)
    return fmt, quantize(x, fmt)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,block_size,k,n", CASES)
@pytest.mark.parametrize("act_bits", [0, 8])
def test_matmul_with_packed_zero_points_equals_unpacked(force_isa, isa, bits, block_size, k, n, act_bits) -> None:
    force_isa(isa)
    _, q = _asymmetric(bits, block_size, n, k, seed=bits * 10 + k)
    assert q.zero_points is not None and q.stored_zero_points.shape == (-(-q.zero_points.size * bits // 8),)
    common = dict(k=k, n=n, bits=bits, block_size=block_size, symmetric=False, act_bits=act_bits, codes=q.codes,
                  scales=q.scales, bias=np.linspace(-1, 1, n, dtype=np.float32))
    a = np.random.default_rng(1).standard_normal((3, 5, k)).astype(np.float32)
    unpacked = run_matmul(matmul_model(zero_points=q.zero_points, **common), a)
    packed = run_matmul(matmul_model(zero_points=q.stored_zero_points, zero_points_packed=1, **common), a)
    np.testing.assert_array_equal(packed.view(np.uint32), unpacked.view(np.uint32))


def test_matmul_with_packed_zero_points_and_coded_codes() -> None:
    from bct_onnx import code_entropy

    _, q = _asymmetric(4, 32, 12, 64, seed=3)
    stream = code_entropy.encode_packed(q.codes, 4, 64)
    common = dict(k=64, n=12, bits=4, block_size=32, symmetric=False, act_bits=0, scales=q.scales, bias=None)
    a = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    unpacked = run_matmul(matmul_model(codes=q.codes, zero_points=q.zero_points, **common), a)
    both = run_matmul(matmul_model(codes=stream, codes_coding="huffman", zero_points=q.stored_zero_points,
                                   zero_points_packed=1, **common), a)
    np.testing.assert_array_equal(both.view(np.uint32), unpacked.view(np.uint32))


@pytest.mark.parametrize("isa", ("scalar", "avx2", "avx512"))
@pytest.mark.parametrize("bits,block_size,axis_size", [(4, 32, 96), (4, 32, 160), (3, 16, 70), (6, 8, 33)])
def test_gather_with_packed_zero_points_is_the_spec(kit, force_isa, isa, bits, block_size, axis_size) -> None:
    force_isa(isa)
    fmt, table = _asymmetric(bits, block_size, 57, axis_size, seed=bits, scale_kind=ScaleKind.FLOAT16)
    stored = type(table)(table.codes, table.scales, table.stored_zero_points, table.axis_size, fmt)
    indices = np.array([[0, 56, -1, 5], [7, -57, 3, 3]], np.int64)
    (got,) = kit.run(kit.gather_model(fmt, axis_size, stored, zero_points_packed=1), {"indices": indices})
    kit.assert_bits_equal(got, dequantize(table)[indices], "y")


def _dequantize_model(fmt: BlockFormat, q: Any, zero_points: np.ndarray, node_name: str = "dq", **attrs: Any) -> bytes:
    """BlockDequantize with codes, scales and zero points as initializers."""
    node = helper.make_node(
        BLOCK_DEQUANTIZE, ["codes", "scales", "zero_points"], ["y"], domain=DOMAIN, name=node_name,
        bits=fmt.bits, block_size=fmt.block_size, symmetric=0, axis_size=q.axis_size, **attrs,
    )
    inits = [numpy_helper.from_array(a, name) for a, name in ((q.codes, "codes"), (q.scales, "scales"), (zero_points, "zero_points"))]
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    ).SerializeToString()


@pytest.mark.parametrize("isa", ("scalar", "avx2", "avx512"))
def test_dequantize_with_packed_zero_points_is_the_spec(kit, force_isa, isa) -> None:
    force_isa(isa)
    fmt, q = _asymmetric(5, 16, 13, 90, seed=7, scale_kind=ScaleKind.FLOAT16)
    (got,) = bct_onnx.session(_dequantize_model(fmt, q, q.stored_zero_points, zero_points_packed=1)).run(None, {})
    kit.assert_bits_equal(got, dequantize(q), "y")


def _session_error(model: bytes) -> str:
    with pytest.raises(Exception) as error:
        bct_onnx.session(model)
    return str(error.value)


def test_wrong_packed_length_names_node_and_input() -> None:
    _, q = _asymmetric(4, 32, 12, 96, seed=4)  # 12 rows of 3 blocks: ceil(36 * 4 / 8) = 18 bytes
    common = dict(k=96, n=12, bits=4, block_size=32, symmetric=False, act_bits=0, codes=q.codes, scales=q.scales,
                  bias=None, node_name="proj")
    message = _session_error(matmul_model(zero_points=q.zero_points, zero_points_packed=1, **common))
    assert "proj" in message and "'W_zero_points'" in message and "= [18]" in message, message
    assert "got shape [12, 3]" in message, message
    message = _session_error(matmul_model(zero_points=q.stored_zero_points[:-1], zero_points_packed=1, **common))
    assert "proj" in message and "'W_zero_points'" in message and "got shape [17]" in message, message
    fmt, t = _asymmetric(3, 16, 5, 70, seed=5)  # 5 rows of 5 blocks: ceil(25 * 3 / 8) = 10 bytes
    message = _session_error(_dequantize_model(fmt, t, t.zero_points, node_name="deq", zero_points_packed=1))
    assert "deq" in message and "'zero_points'" in message and "= [10]" in message, message


def test_packed_zero_points_must_be_constant() -> None:
    _, q = _asymmetric(4, 32, 6, 64, seed=6)
    message = _session_error(matmul_model(k=64, n=6, bits=4, block_size=32, symmetric=False, act_bits=0,
                                          codes=q.codes, scales=q.scales, zero_points=q.stored_zero_points,
                                          bias=None, constant_weights=False, zero_points_packed=1, node_name="mm9"))
    assert "mm9" in message and "'W_zero_points' must be a constant initializer" in message, message


@pytest.mark.parametrize("value,symmetric,expected", [(2, False, "must be 0 or 1, got 2"), (1, True, "symmetric")])
def test_bad_zero_points_packed_attribute(value, symmetric, expected) -> None:
    _, q = _asymmetric(4, 32, 6, 64, seed=8)
    model = matmul_model(k=64, n=6, bits=4, block_size=32, symmetric=symmetric, act_bits=0, codes=q.codes,
                         scales=q.scales, zero_points=None if symmetric else q.stored_zero_points, bias=None,
                         zero_points_packed=value, node_name="mmx")
    message = _session_error(model)
    assert "mmx" in message and "zero_points_packed" in message and expected in message, message


def test_reference_evaluator_unpacks_them() -> None:
    """bct_onnx.reference (the numpy evaluator of the domain) reads packed zero points as the kernels do."""
    from bct_onnx import reference

    fmt, q = _asymmetric(4, 32, 7, 96, seed=9, scale_kind=ScaleKind.FLOAT16)
    model = onnx.load_from_string(_dequantize_model(fmt, q, q.stored_zero_points, zero_points_packed=1))
    (got,) = reference.run(model, {})
    np.testing.assert_array_equal(got, dequantize(q))
