"""QuantizeGelu/Softmax/LayerNorm/ActMatMul passes and CompressIntermediatesPass.

Exact op types after the passes, near misses with their reasons, the attention chain
Q x K^T -> scale -> mask -> Softmax -> P x V against the numpy specification, and the activation
memory figure of the compressed edges.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.passes import (
    CompressIntermediatesPass,
    QuantizeActMatMulPass,
    QuantizeGeluPass,
    QuantizeLayerNormPass,
    QuantizeSoftmaxPass,
    compress_model,
    compressed_activations,
)
from support import model_from_text, op_types, run_bct_session, run_ort, run_reference

from bct_onnx import reference_nonlinear as spec
from bct_onnx.block_format import BlockFormat, ScaleKind
from bct_onnx.config import CompressConfig, NodeOverride, OpSettings

RNG = np.random.default_rng(11)
H, S, DK = 2, 8, 32


def attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


ATTENTION = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[1, {H}, {S}, {DK}] q, float[1, {H}, {S}, {DK}] k, float[1, {H}, {S}, {DK}] v, float[1, 1, 1, {S}] mask)
  => (float[1, {H}, {S}, {DK}] y) {{
  kt = Transpose<perm = [0, 1, 3, 2]>(k)
  scores = MatMul(q, kt)
  scaled = Div(scores, root)
  masked = Add(scaled, mask)
  probs = Softmax<axis = -1>(masked)
  y = MatMul(probs, v)
}}"""


def attention_feeds() -> dict[str, np.ndarray]:
    feeds = {name: RNG.standard_normal((1, H, S, DK)).astype(np.float32) for name in ("q", "k", "v")}
    mask = np.zeros((1, 1, 1, S), np.float32)
    mask[..., -2:] = -1e4
    feeds["mask"] = mask
    return feeds


def attention_model():
    return model_from_text(ATTENTION, {"root": np.float32(np.sqrt(DK))})


def test_attention_chain_is_compressed_and_matches_the_spec():
    model = attention_model()
    result = compress_model(model, CompressConfig(fuse_attention=False))  # the unfused chain
    assert op_types(result.model) == [
        "BlockActMatMul",
        "Div",
        "Add",
        "BlockSoftmax",
        "BlockActMatMul",
    ]
    assert result.rewritten == {
        "AttentionMatMul": 2,
        "attention Q x K^T": 1,
        "attention probabilities x V": 1,
        "AttentionMatMul transpose_b (Transpose folded)": 1,
        "Softmax": 1,
        "attention Softmax": 1,
        "attention Softmax: scaled scores": 1,
        "attention Softmax: additive mask/bias": 1,
        "intermediate kept compressed": 1,
        "activation bytes saved per token (static last dims)": 23,  # floor(8 * (32 - 8.75) / 8)
    }
    qk, _, _, softmax, pv = list(result.model.graph)
    assert attrs(qk) == {"act_bits": 8, "block_size": 32, "transpose_b": 1}
    assert qk.inputs[3].name == "k"  # the Transpose is gone: K read with transpose_b
    assert attrs(softmax) == {
        "out_bits": 8,
        "out_block_size": 32,
        "out_symmetric": 0,
        "out_scale_kind": "float16",
    }
    assert attrs(pv) == {
        "act_bits": 8,
        "block_size": 32,
        "transpose_b": 0,
        "in_bits": 8,
        "in_block_size": 32,
        "in_symmetric": 0,
        "in_axis_size": S,
    }
    assert [v.name for v in pv.inputs[:3]] == ["probs.codes", "probs.scales", "probs.zero_points"]
    summary = result.activations
    assert summary is not None and summary.count == 1
    # S = 8 values at 8 bits + (16-bit scale + 8-bit zero point) per block of 32: 8.75 bits per value
    assert summary.tensors[0].effective_bits == pytest.approx(8.75)
    assert summary.bytes_saved_per_token() == pytest.approx(S * (32 - 8.75) / 8)

    feeds = attention_feeds()
    got = run_bct_session(result.model, feeds)[0]
    scores = spec.block_act_matmul(feeds["q"], feeds["k"], 8, 32, transpose_b=True)
    masked = (scores / np.float32(np.sqrt(DK))).astype(np.float32) + feeds["mask"]
    probs = spec.block_softmax(masked, BlockFormat(8, 32, False, ScaleKind.FLOAT16))
    expected = spec.block_act_matmul(probs, feeds["v"], 8, 32)
    np.testing.assert_array_equal(got, expected)  # bit-exact: every step is the spec's float32 op
    reference = run_ort(model, feeds)[0]
    np.testing.assert_allclose(got, reference, rtol=0, atol=0.05)  # 8-bit operands, |y| <~ 3


BERT_ATTENTION = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[1, {S}, {H}, {DK}] q, float[1, {S}, {H}, {DK}] k, float[1, {S}, {H}, {DK}] v) => (float[1, {H}, {S}, {DK}] y) {{
  qt = Transpose<perm = [0, 2, 1, 3]>(q)
  kt = Transpose<perm = [0, 2, 3, 1]>(k)
  ks = Mul(kt, root)
  scores = MatMul(qt, ks)
  probs = Softmax<axis = -1>(scores)
  vt = Transpose<perm = [0, 2, 1, 3]>(v)
  y = MatMul(probs, vt)
}}"""


def test_bert_layout_transposes_keep_the_last_axis():
    """BERT's K^T = Transpose<[0, 2, 3, 1]>(k) * scalar becomes Transpose<[0, 2, 1, 3]>(k) * scalar
    read with transpose_b=1 (a row-copying Transpose); V's Transpose<[0, 2, 1, 3]> already copies
    rows and stays, read with transpose_b=0. Same bits as the spec on the original layout."""
    model = model_from_text(BERT_ATTENTION, {"root": np.float32(0.25)})
    result = compress_model(model, CompressConfig(fuse_attention=False))
    nodes = list(result.model.graph)
    transposes = [list(n.attributes["perm"].value) for n in nodes if n.op_type == "Transpose"]
    assert transposes == [[0, 2, 1, 3]] * 3
    qk, pv = [n for n in nodes if n.op_type == "BlockActMatMul"]
    assert attrs(qk)["transpose_b"] == 1 and attrs(pv)["transpose_b"] == 0
    assert qk.inputs[3].producer().op_type == "Mul"
    assert result.rewritten["AttentionMatMul transpose_b (Transpose folded)"] == 1
    rng = np.random.default_rng(3)
    feeds = {n: rng.standard_normal((1, S, H, DK)).astype(np.float32) for n in ("q", "k", "v")}
    got = run_bct_session(result.model, feeds)[0]
    q, k, v = (np.transpose(feeds[n], (0, 2, 1, 3)) for n in ("q", "k", "v"))
    kt = np.ascontiguousarray(np.swapaxes(k, -1, -2)) * np.float32(0.25)
    scores = spec.block_act_matmul(q, kt, 8, 32, out_fmt=BlockFormat(8, 32, True, ScaleKind.FLOAT16))
    probs = spec.block_softmax(scores, BlockFormat(8, 32, False, ScaleKind.FLOAT16))
    np.testing.assert_array_equal(got, spec.block_act_matmul(probs, np.ascontiguousarray(v), 8, 32))


def test_passes_alone_keep_float_operands():
    model = attention_model()
    config = CompressConfig()
    for pass_ in (QuantizeActMatMulPass(config), QuantizeSoftmaxPass(config)):
        model = pass_(model).model
    assert op_types(model) == ["BlockActMatMul", "Div", "Add", "BlockSoftmax", "BlockActMatMul"]
    for node in model.graph:
        assert "in_bits" not in node.attributes and "out_bits" not in node.attributes
    feeds = attention_feeds()
    got = run_bct_session(model, feeds)[0]
    scores = spec.block_act_matmul(feeds["q"], feeds["k"], 8, 32, transpose_b=True)
    masked = (scores / np.float32(np.sqrt(DK))).astype(np.float32) + feeds["mask"]
    np.testing.assert_array_equal(got, spec.block_act_matmul(spec.softmax(masked), feeds["v"], 8, 32))


def test_weight_only_config_keeps_attention_float_and_says_why():
    result = QuantizeActMatMulPass(CompressConfig(act_bits=None))(attention_model())
    assert not result.modified
    assert {s.reason for s in result.skipped} == {
        "act_bits is none (weight-only): attention MatMuls need activation bits"
    }


def test_activation_product_that_is_not_attention_is_left_alone():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 1] freq, float[1, 1, 6] pos) => (float[1, 4, 6] y) {
      y = MatMul(freq, pos)
    }"""
    result = QuantizeActMatMulPass(CompressConfig())(model_from_text(text))
    assert not result.modified
    assert [s.reason for s in result.skipped] == [
        "activation x activation MatMul that is not attention's Q x K^T or probabilities x V"
    ]


def test_per_node_override_disables_one_softmax():
    config = CompressConfig(overrides=(NodeOverride("prob?", OpSettings(enabled=False), op="Softmax"),))
    result = QuantizeSoftmaxPass(config)(attention_model())
    assert not result.modified
    assert [s.reason for s in result.skipped] == [
        "Softmax compression is disabled for this node by the config"
    ]


def test_softmax_not_over_last_axis_is_reported():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
      y = Softmax<axis = 1>(x)
    }"""
    result = QuantizeSoftmaxPass(CompressConfig())(model_from_text(text))
    assert [s.reason for s in result.skipped] == [
        "softmax over axis 1 of a rank-3 input; BlockSoftmax is over the last axis"
    ]


def test_opset_12_softmax_default_axis_is_not_the_last():
    text = """<ir_version: 7, opset_import: ["" : 12]>
    g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
      y = Softmax(x)
    }"""
    result = QuantizeSoftmaxPass(CompressConfig())(model_from_text(text))
    assert not result.modified
    assert "coerced to 2-D" in result.skipped[0].reason


LN_GELU = """<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 5, 64] x) => (float[2, 5, 64] y) {
  n = LayerNormalization<axis = -1, epsilon = 1e-5>(x, gamma, beta)
  g = Gelu(n)
  y = Softmax<axis = -1>(g)
}"""


def ln_gelu_model():
    return model_from_text(
        LN_GELU,
        {"gamma": (1 + 0.1 * RNG.standard_normal(64)).astype(np.float32), "beta": np.zeros(64, np.float32)},
    )


def test_chain_layer_norm_gelu_softmax_stays_compressed():
    model = ln_gelu_model()
    result = compress_model(model, CompressConfig(op_settings={"Gelu": OpSettings(act_bits=6)}))
    assert op_types(result.model) == ["BlockLayerNorm", "BlockGelu", "BlockSoftmax"]
    ln, gelu, softmax = list(result.model.graph)
    assert attrs(ln)["out_bits"] == 8 and attrs(ln)["out_symmetric"] == 1
    assert attrs(gelu)["in_bits"] == 8 and attrs(gelu)["out_bits"] == 6 and attrs(gelu)["out_symmetric"] == 0
    assert attrs(softmax)["in_bits"] == 6 and "out_bits" not in attrs(softmax)  # graph output: float
    assert [s.reason for s in result.skipped] == [
        "result stays float32: its result is a graph output (float32)"
    ]
    assert result.activations is not None and result.activations.count == 2
    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    got = run_bct_session(result.model, {"x": x})[0]
    gamma = ln.inputs[3].const_value.numpy()
    n = spec.block_layer_norm(
        x, gamma, np.zeros(64, np.float32), 1e-5, BlockFormat(8, 32, True, ScaleKind.FLOAT16)
    )
    g = spec.block_gelu(n, "none", BlockFormat(6, 32, False, ScaleKind.FLOAT16))
    np.testing.assert_array_equal(got, spec.block_softmax(g))


def test_quantize_passes_report_what_they_cannot_take():
    text = """<ir_version: 10, opset_import: ["" : 20]>
    g (float[2, 5, 8] x, float[8] gamma) => (float[2, 5, 8] y, float[2, 5, 1] mean) {
      n, mean = LayerNormalization<axis = -1>(x, gamma)
      y = Gelu<approximate = "sigmoid">(n)
    }"""
    model = model_from_text(text, check=False)
    ln = QuantizeLayerNormPass(CompressConfig())(model)
    assert [s.reason for s in ln.skipped] == ["scale is not a constant float32 tensor of 8 elements"]
    gelu = QuantizeGeluPass(CompressConfig())(model)
    assert [s.reason for s in gelu.skipped] == ["approximate='sigmoid' is not none/tanh"]


LN_MATMUL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 5, 64] x) => (float[2, 5, 16] y) {
  n = LayerNormalization<axis = -1>(x, gamma, beta)
  y = MatMul(n, w)
}"""


def ln_matmul_model():
    rng = np.random.default_rng(21)  # the same model on every call
    inits = {
        "gamma": (1 + 0.1 * rng.standard_normal(64)).astype(np.float32),
        "beta": (0.1 * rng.standard_normal(64)).astype(np.float32),
        "w": rng.standard_normal((64, 16)).astype(np.float32),
    }
    return model_from_text(LN_MATMUL, inits)


def test_layer_norm_feeds_block_matmul_codes_in_its_own_activation_format():
    """LayerNorm -> MatMul passes codes in the MatMul's run-time activation format (8-bit, block 32,
    symmetric, float32 scales): the MatMul skips its own quantization and its result is bit for bit
    the one of the float edge."""
    model = ln_matmul_model()
    result = compress_model(model, CompressConfig())
    assert op_types(result.model) == ["BlockLayerNorm", "BlockMatMul"]
    ln, mm = list(result.model.graph)
    assert attrs(ln) == {
        "epsilon": pytest.approx(1e-5),
        "out_bits": 8,
        "out_block_size": 32,
        "out_symmetric": 1,
        "out_scale_kind": "float32",
    }
    assert {k: v for k, v in attrs(mm).items() if k.startswith("in_")} == {
        "in_bits": 8,
        "in_block_size": 32,
        "in_symmetric": 1,
        "in_axis_size": 64,
    }
    assert attrs(mm)["act_bits"] == 8 and "out_bits" not in attrs(mm)
    assert [v.name if v is not None else "" for v in mm.inputs] == [
        "n.codes",
        mm.inputs[1].name,
        mm.inputs[2].name,
        "",
        "",
        "n.scales",
    ]
    assert result.skipped == []  # a BlockMatMul result read by no compressed op is not an intermediate
    summary = compressed_activations(result.model)
    assert summary.count == 1 and summary.tensors[0].effective_bits == pytest.approx(9.0)
    assert summary.bytes_saved_per_token() == pytest.approx(64 * (32 - 9) / 8)

    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    got = run_bct_session(result.model, {"x": x})[0]
    float_edge = compress_model(ln_matmul_model(), CompressConfig(keep_compressed=False)).model
    np.testing.assert_array_equal(got, run_bct_session(float_edge, {"x": x})[0])
    np.testing.assert_allclose(got, run_reference(result.model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_weight_only_block_matmul_keeps_its_float_input():
    config = CompressConfig(overrides=(NodeOverride("y", OpSettings(), op="MatMul", act_bits_none=True),))
    result = compress_model(ln_matmul_model(), config)
    assert op_types(result.model) == ["BlockLayerNorm", "BlockMatMul"]
    assert "out_bits" not in attrs(next(iter(result.model.graph)))
    assert attrs(list(result.model.graph)[1])["act_bits"] == 0
    assert [s.reason for s in result.skipped] == [
        "result stays float32: read by BlockMatMul 'y', which is weight-only (act_bits 0): its A stays float32",
    ]
    assert compressed_activations(result.model).count == 0


FFN = """<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 5, 64] x) => (float[2, 5, 32] y) {
  n = LayerNormalization<axis = -1, epsilon = 1e-5>(x, gamma, beta)
  h = MatMul(n, w1)
  hb = Add(h, b1)
  g = Gelu(hb)
  y = MatMul(g, w2)
}"""


def ffn_model():
    inits = {
        "gamma": (1 + 0.1 * RNG.standard_normal(64)).astype(np.float32),
        "beta": (0.1 * RNG.standard_normal(64)).astype(np.float32),
        "w1": (RNG.standard_normal((64, 128)) / 8).astype(np.float32),
        "b1": (0.1 * RNG.standard_normal(128)).astype(np.float32),
        "w2": (RNG.standard_normal((128, 32)) / 11).astype(np.float32),
    }
    return model_from_text(FFN, inits)


def test_layer_norm_matmul_gelu_matmul_chain_passes_codes():
    """LN -> MatMul -> Gelu -> MatMul: every intermediate is codes and scales. LN -> MatMul in the
    MatMul's own format, MatMul -> Gelu in the MatMul kind's format (8-bit, float16 scales),
    Gelu -> MatMul in the reading MatMul's own format too (so it uses the codes as they are).
    Unfused (fuse_ops off); by default MatMul -> Gelu is one BlockMatMul with a gelu epilogue
    (tests/passes/test_fused_ops_passes.py)."""
    model = ffn_model()
    result = compress_model(model, CompressConfig(fuse_ops=False))
    assert op_types(result.model) == ["BlockLayerNorm", "BlockMatMul", "BlockGelu", "BlockMatMul"]
    ln, mm1, gelu, mm2 = list(result.model.graph)
    operand = ("in_bits", "in_block_size", "in_symmetric", "in_axis_size")
    result_attrs = ("out_bits", "out_block_size", "out_symmetric", "out_scale_kind")

    def pick(node, names):
        return {k: v for k, v in attrs(node).items() if k in names}

    assert pick(ln, result_attrs) == {
        "out_bits": 8,
        "out_block_size": 32,
        "out_symmetric": 1,
        "out_scale_kind": "float32",
    }
    assert pick(mm1, operand) == {"in_bits": 8, "in_block_size": 32, "in_symmetric": 1, "in_axis_size": 64}
    assert pick(mm1, result_attrs) == {
        "out_bits": 8,
        "out_block_size": 32,
        "out_symmetric": 1,
        "out_scale_kind": "float16",
    }
    assert pick(gelu, operand) == {"in_bits": 8, "in_block_size": 32, "in_symmetric": 1, "in_axis_size": 128}
    assert pick(gelu, result_attrs) == {
        "out_bits": 8,
        "out_block_size": 32,
        "out_symmetric": 1,
        "out_scale_kind": "float32",
    }
    assert pick(mm2, operand) == {"in_bits": 8, "in_block_size": 32, "in_symmetric": 1, "in_axis_size": 128}
    assert pick(mm2, result_attrs) == {}
    assert [v.name if v is not None else "" for v in mm1.inputs] == [
        "n.codes",
        mm1.inputs[1].name,
        mm1.inputs[2].name,
        "",
        "b1",
        "n.scales",
    ]
    assert [v.name for v in gelu.inputs] == ["hb.codes", "hb.scales"]
    assert [v.name if v is not None else "" for v in mm2.inputs] == [
        "g.codes",
        mm2.inputs[1].name,
        mm2.inputs[2].name,
        "",
        "",
        "g.scales",
    ]
    assert result.rewritten["intermediate kept compressed"] == 3
    # 64 * (32 - 9) / 8 + 128 * (32 - 8.5) / 8 + 128 * (32 - 9) / 8 = 184 + 376 + 368
    assert result.rewritten["activation bytes saved per token (static last dims)"] == 928
    summary = result.activations
    assert summary is not None and summary.count == 3
    assert [t.op_type for t in summary.tensors] == ["BlockLayerNorm", "BlockMatMul", "BlockGelu"]
    assert summary.bytes_saved_per_token() == pytest.approx(928)

    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    got = run_bct_session(result.model, {"x": x})[0]
    spec_y = run_reference(result.model, {"x": x})[0]
    # Same formulas; the float32 matmul results may differ from the float64 spec by accumulation
    # order, which can move a requantized code by one step (8-bit, |y| <~ 3).
    np.testing.assert_allclose(got, spec_y, rtol=0, atol=0.02)
    reference = run_ort(model, {"x": x})[0]
    np.testing.assert_allclose(got, reference, rtol=0, atol=0.5)  # 4-bit random weights


def test_fold_respects_weight_only_and_keep_compressed():
    for config in (CompressConfig(act_bits=None), CompressConfig(keep_compressed=False)):
        model = ln_gelu_model()
        for pass_ in (QuantizeLayerNormPass(config), QuantizeGeluPass(config), QuantizeSoftmaxPass(config)):
            model = pass_(model).model
        result = CompressIntermediatesPass(config)(model)
        assert not result.modified
        assert compressed_activations(result.model).count == 0
