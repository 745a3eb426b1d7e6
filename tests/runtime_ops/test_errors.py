"""Bad inputs and attributes fail with an ONNX Runtime error naming the node and the problem."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bct_onnx
from bct_onnx.block_format import BlockFormat, ScaleKind, quantize

SYM4 = BlockFormat(4, 8, True, ScaleKind.FLOAT16)
ASYM4 = BlockFormat(4, 8, False, ScaleKind.FLOAT16)


def _fails(kit, model: bytes, feeds: dict[str, np.ndarray], *parts: str) -> str:
    """Runs the model (session creation included) and returns the error text, checking its parts."""
    with pytest.raises(Exception) as info:
        kit.run(model, feeds)
    text = str(info.value)
    for part in parts:
        assert part in text, f"{part!r} not in error: {text}"
    return text


# --- attributes (checked when the session creates the kernel) ---------------------------------


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(kit, bits: int) -> None:
    _fails(
        kit,
        kit.quantize_model(SYM4, node_name="q_bits", bits=bits),
        {"x": np.ones((1, 8), np.float32)},
        "bct_onnx BlockQuantize node 'q_bits': ",
        f"attribute 'bits' must be in 2..8, got {bits}",
    )


def test_block_size_zero(kit) -> None:
    _fails(
        kit,
        kit.dequantize_model(SYM4, 8, node_name="dq_bs", block_size=0),
        {"codes": np.zeros((1, 4), np.uint8), "scales": np.ones((1, 1), np.float16)},
        "bct_onnx BlockDequantize node 'dq_bs': ",
        "attribute 'block_size' must be in 1..2147483648, got 0",
    )


@pytest.mark.parametrize("block_size", [2**31 + 1, 2**63 - 1])
def test_block_size_absurd(kit, block_size: int) -> None:
    """A block size past the limit is an attribute error, not a failure to allocate (INT64_MAX overflowed
    the block count into "output 'scales' is required")."""
    _fails(
        kit,
        kit.quantize_model(SYM4, node_name="q_bs", block_size=block_size),
        {"x": np.ones((2, 64), np.float32)},
        "bct_onnx BlockQuantize node 'q_bs': ",
        f"attribute 'block_size' must be in 1..2147483648, got {block_size}",
    )
    with pytest.raises(ValueError, match="block_size must be an integer in"):
        BlockFormat(4, block_size)


def test_unknown_scale_kind(kit) -> None:
    _fails(
        kit,
        kit.quantize_model(SYM4, node_name="q_kind", scale_kind="bf16"),
        {"x": np.ones((1, 8), np.float32)},
        "bct_onnx BlockQuantize node 'q_kind': ",
        "attribute 'scale_kind' must be 'float16', 'float32' or 'pow2'",
        "'bf16'",
    )


def test_missing_axis_size(kit) -> None:
    proto = onnx.load_from_string(kit.dequantize_model(SYM4, 8, node_name="dq_axis"))
    attrs = [a for a in proto.graph.node[0].attribute if a.name != "axis_size"]
    del proto.graph.node[0].attribute[:]
    proto.graph.node[0].attribute.extend(attrs)
    _fails(
        kit,
        proto.SerializeToString(),
        {"codes": np.zeros((1, 4), np.uint8), "scales": np.ones((1, 1), np.float16)},
        "bct_onnx BlockDequantize node 'dq_axis': ",
        "required int attribute 'axis_size' is missing",
    )


# --- dtypes, ranks, shapes ---------------------------------------------------------------------


def test_quantize_wrong_dtype(kit) -> None:
    _fails(
        kit,
        kit.quantize_model(SYM4, node_name="q_dtype", x_type=TensorProto.DOUBLE),
        {"x": np.ones((1, 8), np.float64)},
        "bct_onnx BlockQuantize node 'q_dtype': ",
        "input 'X' must be float32, got float64",
    )


def test_quantize_scalar(kit) -> None:
    # float32 scales: with a rank-0 X the type inference cannot tell a scalar from an unknown rank
    # and leaves the scales' type alone, so the graph must agree with ORT's default guess (float).
    fmt = BlockFormat(4, 8, True, ScaleKind.FLOAT32)
    _fails(
        kit,
        kit.quantize_model(fmt, rank=0, node_name="q_rank"),
        {"x": np.array(1.0, np.float32)},
        "bct_onnx BlockQuantize node 'q_rank': ",
        "input 'X' must have rank >= 1",
    )


def test_quantize_asymmetric_needs_zero_points_output(kit) -> None:
    proto = onnx.load_from_string(kit.quantize_model(ASYM4, node_name="q_zp"))
    del proto.graph.node[0].output[2]
    del proto.graph.output[2]
    _fails(
        kit,
        proto.SerializeToString(),
        {"x": np.ones((1, 8), np.float32)},
        "bct_onnx BlockQuantize node 'q_zp': ",
        "output 'zero_points' is required when symmetric=0",
    )


def test_dequantize_codes_width(kit) -> None:
    _fails(
        kit,
        kit.dequantize_model(SYM4, 37, node_name="dq_width"),
        {"codes": np.zeros((2, 18), np.uint8), "scales": np.ones((2, 5), np.float16)},
        "bct_onnx BlockDequantize node 'dq_width': ",
        "input 'codes' last dim must be ceil(axis_size * bits / 8) = 19 for axis_size=37, bits=4, got shape [2, 18]",
    )


def test_dequantize_scales_shape(kit) -> None:
    _fails(
        kit,
        kit.dequantize_model(SYM4, 37, node_name="dq_scales"),
        {"codes": np.zeros((2, 19), np.uint8), "scales": np.ones((2, 4), np.float16)},
        "bct_onnx BlockDequantize node 'dq_scales': ",
        "input 'scales' must have shape [2, 5]",
        "got [2, 4]",
    )


def test_dequantize_scales_dtype(kit) -> None:
    _fails(
        kit,
        kit.dequantize_model(SYM4, 8, node_name="dq_sdtype", scale_type=TensorProto.INT32),
        {"codes": np.zeros((1, 4), np.uint8), "scales": np.ones((1, 1), np.int32)},
        "bct_onnx BlockDequantize node 'dq_sdtype': ",
        "input 'scales' must be float16, float32, float8e5m2 or uint8 (pow2 exponents), got int32",
    )


def test_dequantize_missing_zero_points(kit) -> None:
    _fails(
        kit,
        kit.dequantize_model(ASYM4, 8, node_name="dq_nozp", with_zero_points=False),
        {"codes": np.zeros((1, 4), np.uint8), "scales": np.ones((1, 1), np.float16)},
        "bct_onnx BlockDequantize node 'dq_nozp': ",
        "input 'zero_points' is required when symmetric=0",
    )


def test_dequantize_zero_points_shape(kit) -> None:
    _fails(
        kit,
        kit.dequantize_model(ASYM4, 16, node_name="dq_zpshape"),
        {
            "codes": np.zeros((1, 8), np.uint8),
            "scales": np.ones((1, 2), np.float16),
            "zero_points": np.zeros((1, 3), np.uint8),
        },
        "bct_onnx BlockDequantize node 'dq_zpshape': ",
        "input 'zero_points' must have shape [1, 2]",
    )


def test_dequantize_codes_dtype(kit) -> None:
    proto = onnx.load_from_string(kit.dequantize_model(SYM4, 8, node_name="dq_cdtype"))
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("codes", TensorProto.INT8, None))
    _fails(
        kit,
        proto.SerializeToString(),
        {"codes": np.zeros((1, 4), np.int8), "scales": np.ones((1, 1), np.float16)},
        "bct_onnx BlockDequantize node 'dq_cdtype': ",
        "input 'codes' must be uint8, got int8",
    )


# --- gather indices ----------------------------------------------------------------------------


@pytest.fixture
def table():
    return quantize(np.random.default_rng(0).standard_normal((23, 16)).astype(np.float32), SYM4)


@pytest.mark.parametrize("bad", [23, -24, 1 << 40])
def test_gather_index_out_of_range(kit, table, bad: int) -> None:
    _fails(
        kit,
        kit.gather_model(SYM4, 16, table, node_name="emb"),
        {"indices": np.array([[0, bad]], np.int64)},
        "bct_onnx BlockGather node 'emb': ",
        f"input 'indices' holds {bad} at flat position 1, outside [-23, 23) for a table of 23 rows",
    )


def test_gather_index_dtype(kit, table) -> None:
    _fails(
        kit,
        kit.gather_model(SYM4, 16, table, index_type=TensorProto.FLOAT, node_name="emb_f"),
        {"indices": np.array([0.0], np.float32)},
        "bct_onnx BlockGather node 'emb_f': ",
        "input 'indices' must be int64 or int32, got float32",
    )


def test_gather_table_must_be_2d(kit) -> None:
    q = quantize(np.ones((2, 3, 16), np.float32), SYM4)
    _fails(
        kit,
        kit.gather_model(SYM4, 16, q, node_name="emb_3d"),
        {"indices": np.array([0], np.int64)},
        "bct_onnx BlockGather node 'emb_3d': ",
        "input 'codes' must be a 2-D table [V, row_bytes]",
    )


def test_error_does_not_poison_the_session(kit, table) -> None:
    """A failed run leaves the session usable."""
    sess = bct_onnx.session(kit.gather_model(SYM4, 16, table, node_name="emb_again"))
    with pytest.raises(Exception, match="outside"):
        sess.run(None, {"indices": np.array([99], np.int64)})
    (y,) = sess.run(None, {"indices": np.array([1], np.int64)})
    assert y.shape == (1, 16)


# --- attributes of the wrong type, operands of unknown rank (found by tools/fuzz_ops.py) ---------


def _one_node(op_type: str, inputs: dict[str, np.ndarray], n_outputs: int = 1, shapes: bool = True, **attrs) -> bytes:
    """One node of our domain; graph inputs declared with their shapes (or rank unknown), outputs untyped."""
    node = helper.make_node(op_type, list(inputs), [f"y{i}" for i in range(n_outputs)], domain=bct_onnx.ops.DOMAIN,
                            name="typed_node", **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape) if shapes else None)
         for n, v in inputs.items()],
        [helper.make_value_info(f"y{i}", onnx.TypeProto()) for i in range(n_outputs)],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(bct_onnx.ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


@pytest.mark.parametrize(
    ("op_type", "attrs", "message"),
    [
        ("BlockQuantize", {"bits": 4, "block_size": 8, "symmetric": ""}, "attribute 'symmetric' must be an int"),
        ("BlockQuantize", {"bits": 4.0, "block_size": 8}, "attribute 'bits' must be an int"),
        ("BlockQuantize", {"bits": 4, "block_size": 8, "scale_kind": 1}, "attribute 'scale_kind' must be a string"),
        ("BlockLayerNorm", {"epsilon": 1}, "attribute 'epsilon' must be a float"),
        ("BlockSoftmax", {"out_bits": "4"}, "attribute 'out_bits' must be an int"),
    ],
)
def test_attribute_of_the_wrong_type(kit, op_type: str, attrs: dict, message: str) -> None:
    """An attribute of another type is an error naming it (it was read as absent: the default)."""
    inputs = {"x": np.ones((2, 8), np.float32)}
    if op_type == "BlockLayerNorm":
        inputs["scale"] = np.ones(8, np.float32)
    proto = onnx.load_from_string(_one_node(op_type, inputs, n_outputs=2 if op_type == "BlockQuantize" else 1, **attrs))
    if op_type == "BlockLayerNorm":  # X, absent X_scales and X_zero_points, scale
        proto.graph.node[0].input[:] = ["x", "", "", "scale"]
    model = proto.SerializeToString()
    _fails(kit, model, inputs, f"bct_onnx {op_type} node 'typed_node': ", message)


def test_operand_of_unknown_rank() -> None:
    """An input declared without a shape: the outputs still get their dtypes (float32 Y of a quantized
    operand was typed uint8 like the codes, and the kernel refused its own output)."""
    q = quantize(np.linspace(-2, 2, 24, dtype=np.float32).reshape(3, 8), SYM4)
    attrs = {"in_bits": 4, "in_block_size": 8, "in_axis_size": 8}
    model = _one_node("BlockGelu", {"x": q.codes, "x_scales": q.scales}, shapes=False, **attrs)
    (y,) = bct_onnx.session(model).run(None, {"x": q.codes, "x_scales": q.scales})
    assert y.dtype == np.float32 and y.shape == (3, 8)
    model = _one_node("BlockQuantize", {"x": np.ones((2, 5), np.float32)}, n_outputs=2, shapes=False, bits=4,
                      block_size=8, scale_kind="float32")
    codes, scales = bct_onnx.session(model).run(None, {"x": np.ones((2, 5), np.float32)})
    assert codes.dtype == np.uint8 and scales.dtype == np.float32 and scales.shape == (2, 1)
