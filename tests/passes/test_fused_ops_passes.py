"""FuseMatMulEpiloguePass and FuseAddNormPass: the patterns of BERT (post-norm, GELU FFN), GPT-2
(pre-norm, tanh GELU) and Llama (pre-RMSNorm, SiLU-gated FFN) become the fused ops, run through ONNX
Runtime, and give the unfused pipeline's result (bit for bit where the fusion only removes a float
edge; within the codes' rounding where it removes an intermediate quantization); near misses say why."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.passes import FuseAddNormPass, FuseMatMulEpiloguePass, compress_model
from support import model_from_text, run_bct_session, run_ort

from bct_onnx import ops
from bct_onnx.block_format import float8e4m3_scale_factor
from bct_onnx.config import CompressConfig

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(5)
D, F = 64, 128


def _w(rows: int, cols: int) -> np.ndarray:
    return (RNG.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)


# Post-norm encoder layer (BERT): residual Add + LayerNorm twice, GELU (erf) FFN with biases.
BERT = f"""{HEADER}
g (float[2, 8, {D}] x) => (float[2, 8, {D}] y) {{
  a = MatMul(x, wo)
  ab = Add(a, bo)
  r1 = Add(ab, x)
  h = LayerNormalization<axis = -1, epsilon = 1e-12>(r1, g1, b1)
  u = MatMul(h, wi)
  ub = Add(u, bi)
  d = Div(ub, sqrt2)
  e = Erf(d)
  e1 = Add(e, one)
  m = Mul(ub, e1)
  gelu = Mul(m, half)
  o = MatMul(gelu, wd)
  ob = Add(o, bd)
  r2 = Add(ob, h)
  y = LayerNormalization<axis = -1, epsilon = 1e-12>(r2, g2, b2)
}}"""

# Pre-RMSNorm decoder MLP (Llama): the residual stream goes on after the norm.
LLAMA = f"""{HEADER}
g (float[1, 8, {D}] x, float[1, 8, {D}] attn) => (float[1, 8, {D}] y) {{
  s = Add(x, attn)
  sq = Pow(s, two)
  ms = ReduceMean<axes = [-1]>(sq)
  me = Add(ms, eps)
  r = Sqrt(me)
  inv = Div(one, r)
  n = Mul(s, inv)
  h = Mul(rms, n)
  gt = MatMul(h, wg)
  sig = Sigmoid(gt)
  silu = Mul(gt, sig)
  up = MatMul(h, wu)
  gu = Mul(silu, up)
  dn = MatMul(gu, wdn)
  y = Add(s, dn)
}}"""


def bert_model() -> ir.Model:
    inits = {
        "wo": _w(D, D), "bo": _w(1, D)[0], "wi": _w(D, F), "bi": _w(1, F)[0], "wd": _w(F, D), "bd": _w(1, D)[0],
        "g1": 1 + _w(1, D)[0] / 4, "b1": _w(1, D)[0] / 4, "g2": 1 + _w(1, D)[0] / 4, "b2": _w(1, D)[0] / 4,
        "sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5),
    }  # fmt: skip
    return model_from_text(BERT, inits)


def llama_model() -> ir.Model:
    inits = {
        "wg": _w(D, F), "wu": _w(D, F), "wdn": _w(F, D), "rms": 1 + _w(1, D)[0] / 4,
        "two": np.float32(2), "one": np.float32(1), "eps": np.float32(1e-6),
    }  # fmt: skip
    return model_from_text(LLAMA, inits)


def _ours(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph if node.domain == ops.DOMAIN]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bert_layer_fuses_gelu_epilogue_and_both_residual_norms():
    model = bert_model()
    feeds = {"x": RNG.standard_normal((2, 8, D)).astype(np.float32)}
    fused = compress_model(model, CompressConfig(target_ratio=None))
    unfused = compress_model(model, CompressConfig(target_ratio=None, fuse_ops=False))
    assert fused.rewritten["fuse MatMul + GELU epilogue"] == 1
    assert fused.rewritten["fuse residual Add + norm"] == 2
    assert sorted(_ours(fused.model)) == sorted(["BlockMatMul"] * 3 + ["BlockAddLayerNorm"] * 2)
    assert "BlockGelu" in _ours(unfused.model) and "BlockLayerNorm" in _ours(unfused.model)
    assert len(list(fused.model.graph)) == len(list(unfused.model.graph)) - 3
    up = next(n for n in fused.model.graph if n.attributes.get("epilogue") is not None)
    assert up.attributes["epilogue"].as_string() == "gelu"
    assert up.attributes["out_bits"].as_int() == 8  # the fused result goes to the down MatMul as codes
    (y_fused,) = run_bct_session(fused.model, feeds)
    (y_unfused,) = run_bct_session(unfused.model, feeds)
    (y_fp32,) = run_ort(model, feeds)
    # The fused chain drops the 8-bit quantization of the pre-GELU values: close to the unfused
    # result, and at least as close to FP32 (within noise).
    np.testing.assert_allclose(y_fused, y_unfused, atol=0.1)
    assert _cosine(y_fused, y_fp32) >= _cosine(y_unfused, y_fp32) - 1e-4


def test_llama_mlp_fuses_gate_up_and_residual_rms_norm_with_sum_output():
    model = llama_model()
    feeds = {name: RNG.standard_normal((1, 8, D)).astype(np.float32) for name in ("x", "attn")}
    fused = compress_model(model, CompressConfig(target_ratio=None))
    unfused = compress_model(model, CompressConfig(target_ratio=None, fuse_ops=False))
    assert fused.rewritten["fuse gate/up MatMul + SiLU gating epilogue"] == 1
    assert fused.rewritten["fuse residual Add + norm"] == 1
    assert sorted(_ours(fused.model)) == ["BlockAddRMSNorm", "BlockMatMul", "BlockMatMul"]
    gate_up = next(n for n in fused.model.graph if n.attributes.get("epilogue") is not None)
    assert gate_up.attributes["epilogue"].as_string() == "silu_gate"
    assert gate_up.attributes["N"].as_int() == 2 * F
    assert gate_up.inputs[1].const_value.shape[0] == 2 * F  # gate rows then up rows
    norm = next(n for n in fused.model.graph if n.op_type == "BlockAddRMSNorm")
    assert len(norm.outputs) == 4 and norm.outputs[3].name == "s"  # the residual stream reads the sum
    assert int(norm.attributes["out_bits"].as_int()) == 8  # codes for the gate/up MatMul
    (y_fused,) = run_bct_session(fused.model, feeds)
    (y_unfused,) = run_bct_session(unfused.model, feeds)
    (y_fp32,) = run_ort(model, feeds)
    np.testing.assert_allclose(y_fused, y_unfused, atol=0.05)
    assert _cosine(y_fused, y_fp32) >= _cosine(y_unfused, y_fp32) - 1e-4


def test_residual_norm_fusion_is_bit_exact_to_the_unfused_pipeline():
    """Without GELU / SiLU (only the Add + norm fusion), the two pipelines compute the same bits."""
    text = f"""{HEADER}
g (float[2, 8, {D}] x) => (float[2, 8, {D}] y, float[2, 8, {D}] r) {{
  a = MatMul(x, wo)
  r = Add(x, a)
  h = LayerNormalization<axis = -1, epsilon = 1e-5>(r, g1, b1)
  y = MatMul(h, wi)
}}"""
    model = model_from_text(text, {"wo": _w(D, D), "wi": _w(D, D), "g1": 1 + _w(1, D)[0], "b1": _w(1, D)[0]})
    feeds = {"x": RNG.standard_normal((2, 8, D)).astype(np.float32)}
    fused = compress_model(model, CompressConfig(target_ratio=None)).model
    unfused = compress_model(model, CompressConfig(target_ratio=None, fuse_ops=False)).model
    assert "BlockAddLayerNorm" in _ours(fused) and "BlockAddLayerNorm" not in _ours(unfused)
    for got, want, name in zip(
        run_bct_session(fused, feeds), run_bct_session(unfused, feeds), ("y", "r"), strict=True
    ):
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_near_misses_say_why():
    # The up-projection's result is also a graph output: no gate/up fusion; the gate MatMul + SiLU stay.
    text = LLAMA.replace(f"=> (float[1, 8, {D}] y)", f"=> (float[1, 8, {D}] y, float[1, 8, {F}] up)")
    inits = {"wg": _w(D, F), "wu": _w(D, F), "wdn": _w(F, D), "rms": 1 + _w(1, D)[0] / 4,
             "two": np.float32(2), "one": np.float32(1), "eps": np.float32(1e-6)}  # fmt: skip
    model = model_from_text(text, inits)
    result = compress_model(model, CompressConfig(target_ratio=None))
    reasons = [skip.reason for skip in result.skipped if skip.op_type == "BlockSilu"]
    assert any("is read elsewhere too (or is a graph output)" in reason for reason in reasons), result.skipped
    assert "BlockSilu" in _ours(result.model)
    # An Add of two graph inputs of unknown relation: no BlockMatMul operand, shapes not known equal.
    text = f"""{HEADER}
g (float[2, 8, {D}] x, float[1, 8, {D}] p) => (float[2, 8, {D}] y) {{
  r = Add(x, p)
  y = LayerNormalization<axis = -1, epsilon = 1e-5>(r, g1, b1)
}}"""
    model = model_from_text(text, {"g1": 1 + _w(1, D)[0], "b1": _w(1, D)[0]})
    compressed = compress_model(
        model, CompressConfig(target_ratio=None, ops=frozenset({"LayerNormalization"}))
    ).model
    result = FuseAddNormPass()(compressed)
    assert not result.modified
    assert len(result.skipped) == 1
    assert "neither operand is known to be the full-size one" in result.skipped[0].reason


@pytest.mark.parametrize("pass_", [FuseMatMulEpiloguePass, FuseAddNormPass])
def test_passes_leave_a_graph_without_patterns_alone(pass_):
    model = model_from_text(f"{HEADER}\ng (float[2, {D}] x) => (float[2, {D}] y) {{\n  y = Relu(x)\n}}")
    result = pass_()(model)
    assert not result.modified and result.rewritten == {} and result.skipped == []


def test_gate_up_with_float8e4m3_scales_share_one_factor_and_fuse():
    """A node holds one float8e4m3 scale_factor: MatMuls reading one activation in one format (gate
    and up) get one factor, the largest either needs, so they still fuse; the down projection reading
    another activation keeps its own factor."""
    model = llama_model()
    weights = {name: model.graph.initializers[name].const_value.numpy() for name in ("wg", "wu", "wdn")}
    feeds = {name: RNG.standard_normal((1, 8, D)).astype(np.float32) for name in ("x", "attn")}
    config = CompressConfig(target_ratio=None, scale_kind="float8e4m3")
    own = {name: float8e4m3_scale_factor(w.T, config.weight_format) for name, w in weights.items()}
    assert own["wg"] != own["wu"]
    fused = compress_model(model, config)
    unfused = compress_model(model, dataclasses.replace(config, fuse_ops=False))
    assert fused.rewritten["fuse gate/up MatMul + SiLU gating epilogue"] == 1
    factors = {n.inputs[0].name: n.attributes["scale_factor"].as_float() for n in fused.model.graph if n.op_type == "BlockMatMul"}
    gate_up = next(n for n in fused.model.graph if n.attributes.get("epilogue") is not None)
    assert gate_up.attributes["scale_factor"].as_float() == np.float32(max(own["wg"], own["wu"]))
    assert sorted(factors.values()) == sorted(np.float32([max(own["wg"], own["wu"]), own["wdn"]]).tolist())
    unfused_factors = [n.attributes["scale_factor"].as_float() for n in unfused.model.graph if n.op_type == "BlockMatMul"]
    assert sorted(unfused_factors) == sorted(np.float32([max(own["wg"], own["wu"])] * 2 + [own["wdn"]]).tolist())
    (y_fused,) = run_bct_session(fused.model, feeds)
    (y_unfused,) = run_bct_session(unfused.model, feeds)
    (y_fp32,) = run_ort(model, feeds)
    np.testing.assert_allclose(y_fused, y_unfused, atol=0.05)
    assert _cosine(y_fused, y_fp32) > 0.99
