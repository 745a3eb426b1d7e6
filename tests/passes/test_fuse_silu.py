"""FuseSiluPass / QuantizeSiluPass: x * Sigmoid(x) -> BlockSilu; near misses keep their nodes and say why;
a Llama-style MLP (gate/up/down with SiLU) compressed end to end and run through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.passes import FuseSiluPass, QuantizeSiluPass, compress_model
from bct_onnx.passes.coverage import target_kind_shares
from support import model_from_text, op_types, run_bct_session, run_ort

from bct_onnx import reference_nonlinear as spec
from bct_onnx.block_format import BlockFormat, ScaleKind
from bct_onnx.config import CompressConfig, NodeOverride, OpSettings
from bct_onnx.ops import DOMAIN

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
SIG = "g (float[2, 5, 16] x) => (float[2, 5, 16] y)"


def build(body: str, signature: str = SIG, initializers: dict | None = None):
    return model_from_text(f"{HEADER}\n{signature} {{{body}}}", initializers)


def feeds(shape=(2, 5, 16), seed=0) -> dict[str, np.ndarray]:
    return {"x": (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32)}


@pytest.mark.parametrize(
    "body",
    ["s = Sigmoid(x)\n  y = Mul(x, s)", "s = Sigmoid(x)\n  y = Mul(s, x)"],
    ids=["x-times-sigmoid", "sigmoid-times-x"],
)
def test_fuses_either_operand_order(body):
    model = build(body)
    x = feeds()
    expected = run_ort(model, x)[0]
    result = FuseSiluPass()(model)
    assert result.modified and result.rewritten == {"fuse Silu(Sigmoid*Mul)": 1, "Silu": 1}
    assert result.skipped == []
    assert op_types(result.model) == ["BlockSilu"]
    node = next(iter(result.model.graph))
    assert node.domain == DOMAIN and dict(node.attributes) == {}
    assert node.inputs[0].name == "x" and result.model.graph.outputs[0].name == "y"
    got = run_bct_session(result.model, x)[0]
    np.testing.assert_array_equal(got, spec.silu(x["x"]))  # the op is the spec, bit for bit
    xd = x["x"].astype(np.float64)
    np.testing.assert_allclose(got, xd / (1 + np.exp(-xd)), rtol=2e-7, atol=0)  # docs/ops.md: 3 ulp
    # ONNX Runtime's own float Sigmoid (MLAS) is a rational approximation, off by up to ~5e-5
    # relative where sigmoid is small: compared in absolute terms (|x| <~ 12 here)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_x_read_elsewhere_is_still_fused():
    """x itself may have other readers (the residual, Llama's up projection): only s must be private."""
    signature = "g (float[2, 5, 16] x) => (float[2, 5, 16] y, float[2, 5, 16] z)"
    model = build("s = Sigmoid(x)\n  y = Mul(x, s)\n  z = Relu(x)", signature)
    result = FuseSiluPass()(model)
    assert op_types(result.model) == ["BlockSilu", "Relu"]


@pytest.mark.parametrize(
    "body,signature,reason",
    [
        (
            "s = Sigmoid(x)\n  y = Mul(w, s)",
            "g (float[2, 5, 16] x, float[2, 5, 16] w) => (float[2, 5, 16] y)",
            "the Mul multiplies Sigmoid('x') by another tensor 'w' (a gate, not SiLU)",
        ),
        (
            "t = Mul(x, k)\n  s = Sigmoid(t)\n  y = Mul(x, s)",
            SIG,
            (
                "the Sigmoid reads 't', computed from the Mul's other operand 'x': "
                "x * sigmoid(f(x)) (e.g. QuickGELU) is not SiLU"
            ),
        ),
        (
            "s = Sigmoid(x)\n  y = Mul(x, s)\n  z = Neg(s)",
            "g (float[2, 5, 16] x) => (float[2, 5, 16] y, float[2, 5, 16] z)",
            "the Sigmoid result is read by 2 nodes, not only by the Mul of x * sigmoid(x)",
        ),
        (
            "s = Sigmoid(x)\n  y = Mul(x, s)",
            "g (float[2, 5, 16] x) => (float[2, 5, 16] y, float[2, 5, 16] s)",
            "the Sigmoid result is a graph output",
        ),
        ("s = Sigmoid(x)\n  y = Add(x, s)", SIG, "the Sigmoid result is read by Add, not by a Mul"),
        ("s = Sigmoid(x)\n  y = Mul(s, s)", SIG, "the Mul multiplies the Sigmoid result by itself"),
    ],
    ids=["other-tensor", "quick-gelu", "sigmoid-read-elsewhere", "sigmoid-graph-output", "add", "square"],
)
def test_near_misses_keep_nodes_and_say_why(body, signature, reason):
    model = build(body, signature, {"k": np.float32(1.702)})
    before = op_types(model)
    result = FuseSiluPass()(model)
    assert not result.modified and result.rewritten == {}
    assert op_types(result.model) == before
    assert [(s.op_type, s.reason) for s in result.skipped] == [("Sigmoid", reason)]


def test_sigmoid_of_a_non_float_is_reported():
    text = f"""{HEADER}
    g (double[4] x) => (double[4] y) {{
      s = Sigmoid(x)
      y = Mul(x, s)
    }}"""
    result = FuseSiluPass()(model_from_text(text))
    assert [s.reason for s in result.skipped] == ["Sigmoid on DOUBLE; BlockSilu takes float32"]


SWISH = """<ir_version: 11, opset_import: ["" : 24]>
g (float[2, 5, 16] x) => (float[2, 5, 16] y, float[2, 5, 16] z) {
  y = Swish(x)
  z = Swish<alpha = 1.702>(x)
}"""


def test_onnx_swish_alpha_one_becomes_block_silu():
    model = model_from_text(SWISH, check=False)
    result = QuantizeSiluPass(CompressConfig())(model)
    assert result.rewritten == {"Silu": 1}
    assert op_types(result.model) == ["BlockSilu", "Swish"]
    assert [s.reason for s in result.skipped] == [
        "alpha=1.7020000219345093 is not 1 (BlockSilu is x * sigmoid(x))"
    ]
    off = CompressConfig(op_settings={"Silu": OpSettings(enabled=False)})
    assert QuantizeSiluPass(off)(model_from_text(SWISH, check=False)).rewritten == {}


# ---------------------------------------------------------------------------------------------
# A Llama MLP: down(silu(gate(x)) * up(x)), through the whole pipeline

D, F = 64, 128
LLAMA_MLP = f"""{HEADER}
g (float[2, 5, {D}] x) => (float[2, 5, {D}] y) {{
  gate = MatMul(x, w_gate)
  up = MatMul(x, w_up)
  s = Sigmoid(gate)
  act = Mul(gate, s)
  h = Mul(act, up)
  y = MatMul(h, w_down)
}}"""


def llama_mlp():
    rng = np.random.default_rng(3)
    inits = {
        "w_gate": (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32),
        "w_up": (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32),
        "w_down": (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32),
    }
    return model_from_text(LLAMA_MLP, inits)


def test_llama_mlp_is_compressed_and_matches_float():
    model = llama_mlp()
    # By default gate, up, SiLU and Mul become one BlockMatMul with a silu_gate epilogue
    # (tests/passes/test_fused_ops_passes.py); unfused, as here, the SiLU is its own op.
    fused = compress_model(model, CompressConfig())
    assert op_types(fused.model) == ["BlockMatMul", "BlockMatMul"]
    assert target_kind_shares(model, fused.model)["Silu"].compressed == 1
    result = compress_model(model, CompressConfig(fuse_ops=False))
    assert op_types(result.model) == ["BlockMatMul", "BlockMatMul", "BlockSilu", "Mul", "BlockMatMul"]
    assert result.rewritten["fuse Silu(Sigmoid*Mul)"] == 1 and result.rewritten["Silu"] == 1
    gate, _, silu, _, _ = list(result.model.graph)
    # gate -> SiLU passes codes (the MatMul's result in the SiLU's format); the SiLU result is read
    # by the float Mul with the up projection, so it stays float and the report says why.
    silu_attrs = {name: attr.value for name, attr in silu.attributes.items()}
    assert silu_attrs == {"in_bits": 8, "in_block_size": 32, "in_symmetric": 1, "in_axis_size": F}
    assert {name: a.value for name, a in gate.attributes.items()}["out_bits"] == 8
    reasons = [s.reason for s in result.skipped if s.op_type == "BlockSilu"]
    assert reasons == ["result stays float32: read by Mul '<unnamed, output h>', which needs float32"]
    x = (np.random.default_rng(4).standard_normal((2, 5, D))).astype(np.float32)
    got = run_bct_session(result.model, {"x": x})[0]
    expected = run_ort(model, {"x": x})[0]
    # 4-bit weights, 8-bit activations, block 32: stated tolerance on this random MLP (|y| ~ 0.5)
    cos = float(np.dot(got.ravel(), expected.ravel()) / (np.linalg.norm(got) * np.linalg.norm(expected)))
    assert cos >= 0.98, cos
    assert np.abs(got - expected).max() <= 0.25 * np.abs(expected).max()
    shares = target_kind_shares(model, result.model)
    assert (shares["Silu"].original, shares["Silu"].compressed) == (1, 1)


def test_llama_mlp_silu_feeds_codes_to_a_compressed_reader():
    """SiLU -> MatMul directly (no gate product): the SiLU result passes codes in the reading
    MatMul's own activation format (symmetric int8, float32 scales), used by it as they are."""
    text = f"""{HEADER}
    g (float[2, 5, {D}] x) => (float[2, 5, {D}] y) {{
      gate = MatMul(x, w_gate)
      s = Sigmoid(gate)
      act = Mul(s, gate)
      y = MatMul(act, w_down)
    }}"""
    rng = np.random.default_rng(5)
    model = model_from_text(
        text,
        {
            "w_gate": (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32),
            "w_down": (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32),
        },
    )
    result = compress_model(model, CompressConfig())
    assert op_types(result.model) == ["BlockMatMul", "BlockSilu", "BlockMatMul"]
    _, silu, down = list(result.model.graph)
    silu_attrs = {name: attr.value for name, attr in silu.attributes.items()}
    assert silu_attrs["out_bits"] == 8 and silu_attrs["out_symmetric"] == 1
    assert silu_attrs["out_scale_kind"] == "float32"
    assert {name: a.value for name, a in down.attributes.items()}["in_symmetric"] == 1
    x = (np.random.default_rng(6).standard_normal((2, 5, D))).astype(np.float32)
    got = run_bct_session(result.model, {"x": x})[0]
    # the SiLU step is the spec's: run the gate BlockMatMul alone and apply block_silu to it
    expected = run_ort(model, {"x": x})[0]
    cos = float(np.dot(got.ravel(), expected.ravel()) / (np.linalg.norm(got) * np.linalg.norm(expected)))
    assert cos >= 0.98, cos


def test_silu_disabled_keeps_sigmoid_mul():
    config = CompressConfig(ops=frozenset({"MatMul"}))
    result = compress_model(llama_mlp(), config)
    assert "Sigmoid" in op_types(result.model) and "BlockSilu" not in op_types(result.model)


def test_per_node_override_keeps_one_silu_result_float():
    """A SiLU switched off by a node override keeps a float result, and the report says so. (Like a
    fused BlockGelu, its operand may still arrive as codes from a compressed producer.)"""
    text = f"""{HEADER}
    g (float[2, 5, {D}] x) => (float[2, 5, {D}] y) {{
      s = Sigmoid(x)
      act = Mul(s, x)
      y = MatMul(act, w_down)
    }}"""
    w = (np.random.default_rng(8).standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    config = CompressConfig(overrides=(NodeOverride("act", OpSettings(enabled=False), op="Silu"),))
    result = compress_model(model_from_text(text, {"w_down": w}), config)
    silu = next(n for n in result.model.graph if n.op_type == "BlockSilu")
    assert isinstance(silu, ir.Node) and "out_bits" not in silu.attributes
    assert [s.reason for s in result.skipped if s.op_type == "BlockSilu"] == [
        "result stays float32: Silu compression is disabled for this node by the config"
    ]


def test_block_silu_quantized_in_out_against_spec():
    """A BlockSilu with quantized operand and result, as the fold pass writes it, against the spec."""
    from bct_onnx import block_format as bf

    x = (np.random.default_rng(7).standard_normal((3, 64)) * 2).astype(np.float32)
    q = bf.quantize(x, BlockFormat(8, 32, True, ScaleKind.FLOAT16))
    text = """<ir_version: 8, opset_import: ["" : 17, "ai.bct_onnx" : 1]>
    g (uint8[3, 64] c, float16[3, 2] s) => (uint8[3, 64] yc, float16[3, 2] ys, uint8[3, 2] yz) {
      yc, ys, yz = ai.bct_onnx.BlockSilu<in_bits = 8, in_block_size = 32, in_axis_size = 64, out_bits = 8,
          out_block_size = 32, out_symmetric = 0, out_scale_kind = "float16">(c, s, "")
    }"""
    model = model_from_text(text, check=False)
    yc, ys, yz = run_bct_session(model, {"c": q.codes, "s": q.scales})
    expected = spec.block_silu(q, BlockFormat(8, 32, False, ScaleKind.FLOAT16))
    np.testing.assert_array_equal(yc, expected.codes)
    np.testing.assert_array_equal(ys, expected.scales)
    np.testing.assert_array_equal(yz, expected.zero_points)
