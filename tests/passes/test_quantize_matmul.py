"""QuantizeMatMulPass: exact rewrites, near-misses with their reasons, numerics against the spec."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.passes import QuantizeMatMulPass
from support import model_from_text, op_types, run_bct_session, run_ort, run_reference

from bct_onnx.block_format import BlockFormat, dequantize_codes, unpack_codes
from bct_onnx.config import CompressConfig
from bct_onnx.ops import DOMAIN, DOMAIN_VERSION
from bct_onnx.weight_quantizer import quantize_tensor

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(1234)


def weights(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def linear_model(k: int = 40, n: int = 24, bias_shape: tuple[int, ...] | None | str = "[N]"):
    if bias_shape == "[N]":
        bias_shape = (n,)
    body = "  mm = MatMul(A, W)\n  Y = Add(mm, Bias)\n" if bias_shape else "  Y = MatMul(A, W)\n"
    text = f"{HEADER}\ng (float[B, S, {k}] A) => (float[B, S, {n}] Y) {{\n{body}}}"
    inits = {"W": weights(k, n)}
    if bias_shape:
        inits["Bias"] = weights(*bias_shape)
    return model_from_text(text, inits), inits


def test_rewrites_matmul_and_fuses_bias():
    model, inits = linear_model()
    result = QuantizeMatMulPass(CompressConfig(act_bits=None))(model)
    assert result.modified
    assert op_types(result.model) == ["BlockMatMul"]
    assert result.rewritten == {"MatMul": 1, "MatMul+Add(bias)": 1}
    assert result.skipped == []
    node = next(iter(result.model.graph))
    assert node.domain == DOMAIN
    assert result.model.opset_imports[DOMAIN] == DOMAIN_VERSION
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    assert attrs == {"K": 40, "N": 24, "bits": 4, "block_size": 32, "symmetric": 1, "act_bits": 0}
    codes, scales, bias = (node.inputs[i] for i in (1, 2, 4))
    assert node.inputs[3] is None  # symmetric: no zero points
    assert codes.const_value.shape == (24, 20) and codes.dtype == ir.DataType.UINT8  # ceil(40*4/8)
    assert scales.const_value.shape == (24, 2) and scales.dtype == ir.DataType.FLOAT16
    np.testing.assert_array_equal(bias.const_value.numpy(), inits["Bias"])
    # The stored weight is W^T quantized along K, exactly as weight_quantizer produces it.
    expected = quantize_tensor(inits["W"].T, CompressConfig().weight_format, scale_search=True)
    np.testing.assert_array_equal(codes.const_value.numpy(), expected.codes)
    np.testing.assert_array_equal(scales.const_value.numpy(), expected.scales)
    assert result.model.graph.outputs[0].name == "Y"


@pytest.mark.parametrize("act_bits", [None, 8, 4])
@pytest.mark.parametrize(
    "weight_bits,block_size,symmetric,scale_kind",
    [
        (4, 32, True, "float16"),
        (3, 16, False, "float16"),
        (8, 7, True, "float16"),
        (4, 32, True, "pow2"),
        (5, 16, False, "float32"),
        # float offsets (zero_points="float"): float16 next to float16/pow2 scales, float32 next to float32
        (4, 32, "float", "float16"),
        (3, 16, "float", "pow2"),
        (5, 16, "float", "float32"),
    ],
)
def test_numerics_match_spec(act_bits, weight_bits, block_size, symmetric, scale_kind):
    model, inits = linear_model(k=45, n=10)
    config = CompressConfig(
        weight_bits=weight_bits,
        act_bits=act_bits,
        block_size=block_size,
        symmetric=symmetric is True,
        scale_kind=scale_kind,
        zero_points="float" if symmetric == "float" else "integer",
    )
    a = RNG.standard_normal((2, 3, 45)).astype(np.float32)
    (y_float,) = run_ort(model, {"A": a})
    compressed = QuantizeMatMulPass(config)(model.clone()).model
    (y_ref,) = run_reference(compressed, {"A": a})
    # Independent expectation: dequantized weight, fake-quantized activation, float64 accumulation.
    node = next(iter(compressed.graph))
    fmt = config.weight_format
    zp = node.inputs[3].const_value.numpy() if symmetric is not True else None
    if symmetric == "float":
        assert zp is not None and zp.dtype == fmt.zero_point_dtype
        assert zp.dtype == (np.float32 if scale_kind == "float32" else np.float16)
    w = dequantize_codes(
        unpack_codes(node.inputs[1].const_value.numpy(), fmt.bits, 45),
        node.inputs[2].const_value.numpy(),
        zp,
        fmt,
    )
    a_used = a
    if act_bits:
        from bct_onnx.block_format import fake_quantize

        a_used = fake_quantize(a, BlockFormat(act_bits, block_size, True, "float32"))
    expected = (a_used.astype(np.float64) @ w.T.astype(np.float64) + inits["Bias"]).astype(np.float32)
    np.testing.assert_allclose(y_ref, expected, rtol=0, atol=1e-5)
    # Quantization error stays in the range the bit width allows (relative to the output scale).
    rel = np.abs(y_ref - y_float).max() / np.abs(y_float).max()
    assert rel < {8: 0.05, 5: 0.15, 4: 0.3, 3: 0.5}[min(weight_bits, act_bits or 8)]


@pytest.mark.parametrize(
    "k,config",
    [
        (64, CompressConfig()),
        (45, CompressConfig(act_bits=None)),
        (45, CompressConfig(weight_bits=3, symmetric=False, block_size=16)),
        (45, CompressConfig(weight_bits=4, symmetric=False, zero_points="float", block_size=16)),
        (100, CompressConfig(scale_kind="pow2", act_bits=4)),
        (37, CompressConfig(weight_bits=8, scale_kind="float32", block_size=7)),
        (45, CompressConfig(weight_bits=3, symmetric=False, zero_points="packed", block_size=16)),
    ],
    ids=["default", "weight-only-partial-block", "asym3", "float-offsets4", "pow2-a4", "w8-f32-b7", "packed-zp3"],
)
def test_ort_session_matches_reference(k, config):
    model, _ = linear_model(k=k, n=48)
    compressed = QuantizeMatMulPass(config)(model).model
    a = RNG.standard_normal((2, 5, k)).astype(np.float32)
    (y_ref,) = run_reference(compressed, {"A": a})
    (y_ort,) = run_bct_session(compressed, {"A": a})
    # Float accumulation order differs between numpy (float64) and the kernel: stated tolerance.
    np.testing.assert_allclose(y_ort, y_ref, rtol=1e-4, atol=1e-4)


def test_partial_block_and_k_of_one():
    model, _ = linear_model(k=1, n=3, bias_shape=None)
    result = QuantizeMatMulPass(CompressConfig())(model)
    assert op_types(result.model) == ["BlockMatMul"]
    node = next(iter(result.model.graph))
    assert node.attributes["K"].value == 1
    assert node.inputs[1].const_value.shape == (3, 1)


def test_bias_rank2_broadcast_fused_when_activation_rank_allows():
    model, inits = linear_model(bias_shape=(1, 24))
    result = QuantizeMatMulPass(CompressConfig())(model)
    assert op_types(result.model) == ["BlockMatMul"]
    bias = next(iter(result.model.graph)).inputs[4]
    assert bias.const_value.shape == (24,)
    np.testing.assert_array_equal(bias.const_value.numpy(), inits["Bias"].reshape(24))


def test_bias_not_fused_when_matmul_output_has_two_consumers():
    text = f"""{HEADER}
    g (float[B, 8] A) => (float[B, 4] Y, float[B, 4] Z) {{
      mm = MatMul(A, W)
      Y = Add(mm, Bias)
      Z = Relu(mm)
    }}"""
    model = model_from_text(text, {"W": weights(8, 4), "Bias": weights(4)})
    result = QuantizeMatMulPass(CompressConfig())(model)
    assert op_types(result.model) == ["BlockMatMul", "Add", "Relu"]
    assert result.rewritten == {"MatMul": 1}


def test_bias_not_fused_when_it_is_a_graph_output_or_not_constant():
    text = f"""{HEADER}
    g (float[B, 8] A, float[4] C) => (float[B, 4] Y, float[B, 4] mm) {{
      mm = MatMul(A, W)
      Y = Add(mm, C)
    }}"""
    model = model_from_text(text, {"W": weights(8, 4)})
    result = QuantizeMatMulPass(CompressConfig())(model)
    assert op_types(result.model) == ["BlockMatMul", "Add"]
    assert [v.name for v in result.model.graph.outputs] == ["Y", "mm"]


@pytest.mark.parametrize(
    "text,inits,reason",
    [
        (
            "g (float[B, 8] A, float[8, 4] W) => (float[B, 4] Y) { Y = MatMul(A, W) }",
            {},
            "weight (input B) 'W' is a graph input, not a constant",
        ),
        (
            "g (float[B, 8] A, float[B, 8] K) => (float[B, B] Y) { KT = Transpose(K) \n Y = MatMul(A, KT) }",
            {},
            (
                "weight (input B) is computed at run time (produced by Transpose): activation x activation "
                "MatMul (e.g. attention) is not compressed by this pass"
            ),
        ),
        (
            "g (double[B, 8] A) => (double[B, 4] Y) { Y = MatMul(A, W) }",
            {"W": np.ones((8, 4), np.float64)},
            "weight dtype DOUBLE is not FLOAT (float32)",
        ),
        (
            "g (float[2, B, 8] A) => (float[2, B, 4] Y) { Y = MatMul(A, W) }",
            {"W": np.ones((2, 8, 4), np.float32)},
            "weight has rank 3; only 2-D [K, N] weights are compressed",
        ),
    ],
    ids=["graph-input-weight", "attention", "double", "rank3"],
)
def test_near_misses_are_skipped_with_reason(text, inits, reason):
    model = model_from_text(f"{HEADER}\n{text}", inits)
    before = op_types(model)
    result = QuantizeMatMulPass(CompressConfig())(model)
    assert not result.modified
    assert result.rewritten == {}
    assert op_types(result.model) == before
    assert [(s.op_type, s.reason) for s in result.skipped] == [("MatMul", reason)]
    assert DOMAIN not in result.model.opset_imports


def test_initializer_that_is_also_graph_input_is_not_constant():
    model, _ = linear_model(bias_shape=None)
    model.graph.inputs.append(model.graph.initializers["W"])
    result = QuantizeMatMulPass(CompressConfig())(model)
    assert op_types(result.model) == ["MatMul"]
    assert result.skipped[0].reason == "weight (input B) 'W' is a graph input, not a constant"


def test_transposed_constant_weight_is_quantized_without_copy():
    text = f"""{HEADER}
    g (float[B, 16] A) => (float[B, 10] Y) {{
      WT = Transpose <perm = [1, 0]> (T)
      Y = MatMul(A, WT)
    }}"""
    table = weights(10, 16)
    model = model_from_text(text, {"T": table})
    result = QuantizeMatMulPass(CompressConfig(act_bits=None))(model)
    assert op_types(result.model) == ["Transpose", "BlockMatMul"]  # dead Transpose: cleanup's job
    assert result.rewritten == {"MatMul": 1, "MatMul(Transpose(weight))": 1}
    node = result.model.graph.node(1)
    assert (node.attributes["K"].value, node.attributes["N"].value) == (16, 10)
    expected = quantize_tensor(table, CompressConfig().weight_format)
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), expected.codes)
    a = RNG.standard_normal((3, 16)).astype(np.float32)
    (y,) = run_reference(result.model, {"A": a})
    (y_float,) = run_ort(model_from_text(text, {"T": table}), {"A": a})
    assert np.abs(y - y_float).max() / np.abs(y_float).max() < 0.3


def test_second_run_does_not_modify():
    model, _ = linear_model()
    first = QuantizeMatMulPass(CompressConfig())(model)
    second = QuantizeMatMulPass(CompressConfig())(first.model)
    assert first.modified and not second.modified
    assert second.rewritten == {} and second.skipped == []


def test_weight_shared_by_two_matmuls_is_quantized_once():
    text = f"""{HEADER}
    g (float[B, 8] A, float[B, 8] C) => (float[B, 4] Y, float[B, 4] Z) {{
      Y = MatMul(A, W)
      Z = MatMul(C, W)
    }}"""
    model = model_from_text(text, {"W": weights(8, 4)})
    result = QuantizeMatMulPass(CompressConfig())(model)
    assert op_types(result.model) == ["BlockMatMul", "BlockMatMul"]
    assert result.rewritten == {"MatMul": 2, "shared quantized weight": 1}
    first, second = result.model.graph
    assert first.inputs[1] is second.inputs[1] and first.inputs[2] is second.inputs[2]


def test_scale_search_weights_channels_by_the_preceding_layer_norm():
    # After LayerNormalization, E[a_k^2] ~ gamma_k^2 + beta_k^2: the scale search weighs each input
    # channel's error by it (only when the weight has this one reader).
    k, n = 64, 32
    gamma = np.full(k, 0.1, np.float32)
    gamma[::16] = 8.0  # two loud channels in each block of 32
    text = f"""{HEADER}
    g (float[B, {k}] x) => (float[B, {n}] Y) {{
      h = LayerNormalization <axis = -1> (x, gamma, beta)
      Y = MatMul(h, W)
    }}"""
    w = weights(k, n)
    inits = {"gamma": gamma, "beta": np.zeros(k, np.float32), "W": w}
    result = QuantizeMatMulPass(CompressConfig(act_bits=None))(model_from_text(text, inits))
    node = result.model.graph.node(1)
    assert node.op_type == "BlockMatMul"
    fmt = CompressConfig().weight_format
    importance = gamma**2 / np.mean(gamma**2)
    expected = quantize_tensor(w.T, fmt, importance=importance)
    plain = quantize_tensor(w.T, fmt)
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), expected.codes)
    assert not np.array_equal(expected.scales, plain.scales)
    from bct_onnx.block_format import dequantize

    def weighted_error(q):
        return float((((dequantize(q) - w.T) ** 2) * importance).sum())

    assert weighted_error(expected) < weighted_error(plain)
    # Output error on LayerNorm-shaped inputs goes down accordingly.
    x = RNG.standard_normal((256, k)).astype(np.float32)
    h = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True) * gamma
    exact = h @ w
    err_aware = np.square(h @ dequantize(expected).T - exact).mean()
    err_plain = np.square(h @ dequantize(plain).T - exact).mean()
    assert err_aware < err_plain


def test_shared_weight_is_not_importance_weighted():
    text = f"""{HEADER}
    g (float[B, 8] x, float[B, 8] c) => (float[B, 4] Y, float[B, 4] Z) {{
      h = LayerNormalization <axis = -1> (x, gamma)
      Y = MatMul(h, W)
      Z = MatMul(c, W)
    }}"""
    inits = {"gamma": np.array([9, 1, 1, 1, 1, 1, 1, 1], np.float32), "W": weights(8, 4)}
    result = QuantizeMatMulPass(CompressConfig())(model_from_text(text, inits))
    first, second = (n for n in result.model.graph if n.op_type == "BlockMatMul")
    assert first.inputs[1] is second.inputs[1]
    plain = quantize_tensor(inits["W"].T, CompressConfig().weight_format)
    np.testing.assert_array_equal(first.inputs[1].const_value.numpy(), plain.codes)


@pytest.mark.parametrize("bits,block_size,k", [(4, 32, 160), (3, 16, 45), (5, 8, 40)])
def test_packed_zero_points_store_the_integer_zero_points_at_the_code_width(bits, block_size, k):
    """zero_points="packed": the same codes, scales and zero points as "integer", the zero points packed
    (block_format.pack_zero_points), the node marked zero_points_packed=1, and the same outputs bit for bit."""
    from bct_onnx.block_format import pack_zero_points

    model, _ = linear_model(k=k, n=24)
    common = dict(weight_bits=bits, block_size=block_size, symmetric=False, scale_kind="float8e5m2")
    plain = QuantizeMatMulPass(CompressConfig(**common))(model.clone()).model
    packed = QuantizeMatMulPass(CompressConfig(**common, zero_points="packed"))(model.clone()).model
    node_plain, node_packed = next(iter(plain.graph)), next(iter(packed.graph))
    assert node_packed.attributes["zero_points_packed"].as_int() == 1
    assert "zero_points_packed" not in node_plain.attributes
    for i in (1, 2):
        np.testing.assert_array_equal(node_packed.inputs[i].const_value.numpy(), node_plain.inputs[i].const_value.numpy())
    zp = node_plain.inputs[3].const_value.numpy()
    stored = node_packed.inputs[3].const_value.numpy()
    assert stored.shape == (-(-zp.size * bits // 8),)
    np.testing.assert_array_equal(stored, pack_zero_points(zp, bits))
    a = RNG.standard_normal((2, 5, k)).astype(np.float32)
    (y_plain,) = run_bct_session(plain, {"A": a})
    (y_packed,) = run_bct_session(packed, {"A": a})
    np.testing.assert_array_equal(y_packed.view(np.uint32), y_plain.view(np.uint32))
    (y_ref,) = run_reference(packed, {"A": a})
    np.testing.assert_allclose(y_packed, y_ref, rtol=1e-4, atol=1e-4)
