"""scale_kind "float8e4m3": the quantize passes store float8e4m3fn scales and put the tensor's
factor on each reader as attribute scale_factor; ORT, the numpy reference and the spec agree."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from bct_onnx.passes import QuantizeGatherPass, QuantizeMatMulPass
from support import model_from_text, run_bct_session, run_reference

from bct_onnx.block_format import dequantize, float8e4m3_scale_factor
from bct_onnx.config import CompressConfig, NodeOverride, OpSettings
from bct_onnx.weight_quantizer import quantize_tensor

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(7)


@pytest.mark.parametrize("symmetric,zero_points", [(True, "integer"), (False, "packed"), (False, "float")])
def test_matmul_stores_e4m3_scales_and_their_factor(symmetric, zero_points):
    k, n = 72, 24
    w = (RNG.standard_normal((k, n)) * np.exp(RNG.uniform(-2, 2, (1, n)))).astype(np.float32)
    text = f"{HEADER}\ng (float[B, S, {k}] A) => (float[B, S, {n}] Y) {{\n  Y = MatMul(A, W)\n}}"
    config = CompressConfig(scale_kind="float8e4m3", symmetric=symmetric, zero_points=zero_points, act_bits=None)
    compressed = QuantizeMatMulPass(config)(model_from_text(text, {"W": w})).model
    node = next(iter(compressed.graph))
    spec = quantize_tensor(w.T, config.weight_format)
    assert node.inputs[2].const_value.numpy().dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert node.attributes["scale_factor"].as_float() == np.float32(spec.scale_factor)
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy().view(np.uint8), spec.scales.view(np.uint8))
    a = RNG.standard_normal((2, 3, k)).astype(np.float32)
    (y_ort,) = run_bct_session(compressed, {"A": a})
    (y_ref,) = run_reference(compressed, {"A": a})
    np.testing.assert_allclose(y_ort, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_ref, a @ dequantize(spec).T, rtol=1e-5, atol=1e-5)


def test_gather_table_is_the_spec_bit_for_bit():
    e = (RNG.standard_normal((50, 40)) * np.exp(RNG.uniform(-3, 1, (50, 1)))).astype(np.float32)
    text = f"{HEADER}\ng (int64[B, S] ids) => (float[B, S, 40] Y) {{\n  Y = Gather <axis = 0> (E, ids)\n}}"
    config = CompressConfig(embedding_scale_kind="float8e4m3")
    compressed = QuantizeGatherPass(config)(model_from_text(text, {"E": e})).model
    node = next(iter(compressed.graph))
    spec = quantize_tensor(e, config.embedding_format)
    assert node.attributes["scale_factor"].as_float() == np.float32(spec.scale_factor)
    ids = np.array([[0, 49, -1, 7], [3, -50, 2, 2]], dtype=np.int64)
    (y_ort,) = run_bct_session(compressed, {"ids": ids})
    (y_ref,) = run_reference(compressed, {"ids": ids})
    np.testing.assert_array_equal(y_ort, dequantize(spec)[ids])
    np.testing.assert_array_equal(y_ref, dequantize(spec)[ids])


def test_matmuls_reading_one_activation_in_one_format_share_the_largest_factor():
    """q/k/v-like MatMuls of one activation get one scale_factor (the largest any needs); one with
    another width keeps its own; the codes are the spec's with that factor."""
    k, n = 64, 16
    scales = {"Q": 1.0, "K": 3.0, "V": 0.5, "O": 2.0}
    ws = {name: (RNG.standard_normal((k, n)) * scale).astype(np.float32) for name, scale in scales.items()}
    text = f"""{HEADER}
g (float[2, {k}] A) => (float[2, {n}] q, float[2, {n}] kk, float[2, {n}] v, float[2, {n}] o) {{
  q = MatMul (A, Q)
  kk = MatMul (A, K)
  v = MatMul (A, V)
  o = MatMul (A, O)
}}"""
    six_bits = NodeOverride("re:^o$", OpSettings(weight_bits=6))
    config = CompressConfig(scale_kind="float8e4m3", act_bits=None, overrides=(six_bits,))
    model = model_from_text(text, ws)
    for node, name in zip(model.graph, ("q", "k", "v", "o")):
        node.name = name
    compressed = QuantizeMatMulPass(config)(model).model
    factors = {node.name: node.attributes["scale_factor"].as_float() for node in compressed.graph}
    four = config.weight_format
    shared = max(float8e4m3_scale_factor(ws[name].T, four) for name in "QKV")
    assert factors["q"] == factors["k"] == factors["v"] == np.float32(shared)
    six = config.settings_for("MatMul", "o").weight_format
    assert factors["o"] == np.float32(float8e4m3_scale_factor(ws["O"].T, six))
    node = next(n for n in compressed.graph if n.name == "v")
    spec = quantize_tensor(ws["V"].T, four, scale_factor=shared)
    assert spec.scale_factor == shared
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), spec.codes)
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy().view(np.uint8), spec.scales.view(np.uint8))
