"""float8e4m3 scales with a per-tensor scale_factor attribute: the kernels widen them at creation to
float32 exactly as block_format.scales_to_float32 (e4m3(byte) * scale_factor).

BlockMatMul with float8e4m3 scales must give bit for bit what it gives with those float32 scales
(which test_matmul.py checks against the spec) on every instruction-set path; BlockGather and
BlockDequantize must equal block_format.dequantize bit for bit. A bad factor, or float8e4m3 scales
without one, fails at session creation with a message naming node and attribute or input.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import covering_pairs, run_matmul
from support import weight_matmul_model as matmul_model

import bct_onnx
from bct_onnx.block_format import (
    BlockFormat,
    ScaleKind,
    ZeroPointKind,
    dequantize,
    quantize,
    scales_to_float32,
)
from bct_onnx.ops import BLOCK_DEQUANTIZE, DOMAIN

ISAS = ("scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx")
# bits, block_size, K, N: partial last blocks, odd widths
CASES = [(4, 32, 96, 40), (4, 16, 80, 9), (3, 16, 37, 23), (5, 6, 41, 11), (8, 32, 64, 9)]
ZERO_POINTS = [(True, ZeroPointKind.INTEGER), (False, ZeroPointKind.INTEGER), (False, ZeroPointKind.PACKED),
               (False, ZeroPointKind.FLOAT)]


def _tensor(fmt: BlockFormat, rows: int, axis_size: int, seed: int):
    rng = np.random.default_rng(seed)
    # rows of very different magnitudes: scales spread over many octaves of e4m3's range
    x = rng.standard_normal((rows, axis_size)) * np.exp(rng.uniform(-4, 2, (rows, 1))) + 0.1 * rng.standard_normal((rows, 1))
    q = quantize(x.astype(np.float32), fmt)
    assert q.scales.dtype == np.dtype("float8_e4m3fn") and q.scale_factor is not None
    return q


def _row_id(value) -> str:
    if isinstance(value, tuple) and len(value) == 2:  # (symmetric, zero-point kind)
        return f"{value[0]}-{value[1].value}"
    return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


# Every pair of (case, zero-point mode, act_bits), on every path (was the full product: 40).
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case,zero_point_mode,act_bits", covering_pairs(CASES, ZERO_POINTS, [0, 8]), ids=_row_id)
def test_matmul_equals_widened_float32_scales(force_isa, isa, case, zero_point_mode, act_bits):
    force_isa(isa)
    (bits, block_size, k, n), (symmetric, zero_points) = case, zero_point_mode
    q = _tensor(BlockFormat(bits, block_size, symmetric, ScaleKind.FLOAT8E4M3, zero_points), n, k, seed=bits * 10 + k)
    packed = zero_points is ZeroPointKind.PACKED
    common = dict(k=k, n=n, bits=bits, block_size=block_size, symmetric=symmetric, act_bits=act_bits, codes=q.codes,
                  zero_points=q.stored_zero_points, bias=np.linspace(-1, 1, n, dtype=np.float32),
                  **({"zero_points_packed": 1} if packed else {}))
    a = np.random.default_rng(1).standard_normal((3, 5, k)).astype(np.float32)
    widened = scales_to_float32(q.scales, ScaleKind.FLOAT8E4M3, q.scale_factor)
    want = run_matmul(matmul_model(scales=widened, **common), a)
    got = run_matmul(matmul_model(scales=q.scales, scale_factor=q.scale_factor, **common), a)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("isa", ("scalar", "avx2", "avx512"))
@pytest.mark.parametrize("symmetric,zero_points", ZERO_POINTS, ids=lambda v: str(getattr(v, "value", v)))
@pytest.mark.parametrize("bits,block_size,axis_size", [(4, 32, 96), (5, 32, 160), (3, 16, 70), (6, 8, 33)])
def test_gather_and_dequantize_are_the_spec(kit, force_isa, isa, symmetric, zero_points, bits, block_size, axis_size):
    force_isa(isa)
    fmt = BlockFormat(bits, block_size, symmetric, ScaleKind.FLOAT8E4M3, zero_points)
    q = _tensor(fmt, 57, axis_size, seed=bits + axis_size)
    packed = {"zero_points_packed": 1} if zero_points is ZeroPointKind.PACKED else {}
    stored = type(q)(q.codes, q.scales, q.stored_zero_points, q.axis_size, fmt, q.scale_factor)
    indices = np.array([[0, 56, -1, 5], [7, -57, 3, 3]], np.int64)
    (got,) = kit.run(kit.gather_model(fmt, axis_size, stored, scale_factor=q.scale_factor, **packed), {"indices": indices})
    kit.assert_bits_equal(got, dequantize(q)[indices], "y")
    (got,) = kit.run(_dequantize_model(fmt, axis_size, stored, scale_factor=q.scale_factor, **packed), {})
    kit.assert_bits_equal(got, dequantize(q), "y")


def _dequantize_model(fmt, axis_size, q, node_name="dq", scales_constant=True, **attrs) -> bytes:
    inits = [numpy_helper.from_array(q.codes, "codes")]
    inputs = ["codes", "scales"]
    graph_inputs = []
    if scales_constant:
        inits.append(numpy_helper.from_array(q.scales, "scales"))
    else:
        graph_inputs.append(helper.make_tensor_value_info("scales", TensorProto.FLOAT8E4M3FN, None))
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(BLOCK_DEQUANTIZE, inputs, ["y"], domain=DOMAIN, name=node_name, bits=fmt.bits,
                            block_size=fmt.block_size, symmetric=int(fmt.symmetric), axis_size=axis_size, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=9)
    return model.SerializeToString()


def _symmetric_table():
    fmt = BlockFormat(4, 32, True, ScaleKind.FLOAT8E4M3)
    return fmt, _tensor(fmt, 4, 64, seed=5)


def _creation_error(model: bytes) -> str:
    with pytest.raises(Exception) as caught:
        bct_onnx.session(model)
    return str(caught.value)


def _run_error(model: bytes) -> str:
    """The error of running a model whose kernel is created but whose inputs fail each call's checks."""
    session = bct_onnx.session(model)
    with pytest.raises(Exception) as caught:
        session.run(None, {})
    return str(caught.value)


@pytest.mark.parametrize("factor", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_factor_names_node_and_attribute(factor):
    fmt, q = _symmetric_table()
    message = _creation_error(_dequantize_model(fmt, 64, q, node_name="dq_bad", scale_factor=factor))
    assert "dq_bad" in message and "'scale_factor'" in message and "finite float > 0" in message
    k, n = 64, 4
    mm = matmul_model(k=k, n=n, bits=4, block_size=32, symmetric=True, act_bits=0, codes=q.codes, scales=q.scales,
                      zero_points=None, bias=None, node_name="mm_bad", scale_factor=factor)
    message = _creation_error(mm)
    assert "mm_bad" in message and "'scale_factor'" in message


def test_e4m3_scales_without_factor_or_not_constant_fail_clearly():
    fmt, q = _symmetric_table()
    message = _run_error(_dequantize_model(fmt, 64, q, node_name="dq_nofactor"))
    assert "dq_nofactor" in message and "float8e4m3fn" in message and "'scale_factor'" in message
    message = _creation_error(_dequantize_model(fmt, 64, q, node_name="dq_input", scales_constant=False,
                                                scale_factor=q.scale_factor))
    assert "dq_input" in message and "'scales' must be a constant initializer" in message
    half = type(q)(q.codes, q.scales.astype(np.float32).astype(np.float16), None, 64, fmt)
    message = _creation_error(_dequantize_model(fmt, 64, half, node_name="dq_half", scale_factor=1.0))
    assert "dq_half" in message and "must be float8e4m3fn when attribute 'scale_factor' is set" in message

