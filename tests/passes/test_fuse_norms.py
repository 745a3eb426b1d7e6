"""FuseLayerNormPass and FuseRMSNormPass: decomposed norms -> one node; near misses say why."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.passes import FuseLayerNormPass, FuseRMSNormPass
from support import model_from_text, op_types, run_bct_session, run_ort

D = 24
RNG = np.random.default_rng(7)
GAMMA = (1 + 0.1 * RNG.standard_normal(D)).astype(np.float32)
BETA = (0.1 * RNG.standard_normal(D)).astype(np.float32)
CONSTS = {
    "two": np.float32(2.0),
    "eps": np.float32(1e-5),
    "one": np.float32(1.0),
    "gamma": GAMMA,
    "beta": BETA,
}
X = (RNG.standard_normal((2, 3, D)) * 2 + 0.5).astype(np.float32)

LAYER_NORM = """
  mean = ReduceMean<axes = [-1]>(x)
  d = Sub(x, mean)
  sq = Pow(d, two)
  var = ReduceMean<axes = [-1]>(sq)
  ve = Add(var, eps)
  std = Sqrt(ve)
  n = Div(d, std)
  s = Mul(n, gamma)
  y = Add(s, beta)
"""
RMS_LLAMA = """
  xf = Cast<to = 1>(x)
  sq = Pow(xf, two)
  ms = ReduceMean<axes = [-1]>(sq)
  me = Add(ms, eps)
  r = Sqrt(me)
  inv = Div(one, r)
  n = Mul(xf, inv)
  nf = Cast<to = 1>(n)
  y = Mul(gamma, nf)
"""
RMS_RECIPROCAL = """
  sq = Mul(x, x)
  ms = ReduceMean<axes = [2]>(sq)
  me = Add(eps, ms)
  r = Sqrt(me)
  inv = Reciprocal(r)
  n = Mul(inv, x)
  y = Mul(n, gamma)
"""
RMS_DIV = """
  sq = Pow(x, two)
  ms = ReduceMean<axes = [-1]>(sq)
  me = Add(ms, eps)
  r = Sqrt(me)
  y = Div(x, r)
"""


def build(body: str, opset: int = 17, extra: dict | None = None):
    text = f'<ir_version: 8, opset_import: ["" : {opset}]>\ng (float[2, 3, {D}] x) => (float[2, 3, {D}] y) {{{body}}}'
    return model_from_text(text, {**CONSTS, **(extra or {})})


def test_layer_norm_fuses_into_onnx_layer_normalization():
    model = build(LAYER_NORM)
    expected = run_ort(model, {"x": X})[0]
    result = FuseLayerNormPass()(model)
    assert result.rewritten == {"fuse LayerNormalization": 1} and result.skipped == []
    assert op_types(result.model) == ["LayerNormalization"]
    node = next(iter(result.model.graph))
    assert node.attributes["axis"].as_int() == -1
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    assert node.inputs[1].name == "gamma" and node.inputs[2].name == "beta"
    got = run_ort(result.model, {"x": X})[0]  # standard op: plain onnxruntime
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_layer_norm_before_opset_17_becomes_block_layer_norm():
    model = build(LAYER_NORM, opset=13)
    expected = run_ort(model, {"x": X})[0]
    result = FuseLayerNormPass()(model)
    assert op_types(result.model) == ["BlockLayerNorm"]
    assert result.model.opset_imports[""] == 13  # never bumped
    got = run_bct_session(result.model, {"x": X})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6)


@pytest.mark.parametrize(
    "edit,reason",
    [
        (
            ("mean = ReduceMean<axes = [-1]>(x)", "mean = ReduceMean<axes = [1]>(x)"),
            "ReduceMean reduces axes [1], not only the last axis",
        ),
        (("sq = Pow(d, two)", "sq = Pow(d, three)"), "Pow(x - mean, e) has e != 2"),
        (
            ("std = Sqrt(ve)\n  n = Div(d, std)", "std = Sqrt(ve)\n  n = Div(x, std)"),
            "x - mean is not read exactly by a square (Pow/Mul) and a Div",
        ),
        (
            ("ve = Add(var, eps)", "ve = Add(var, gamma)"),
            "the Add after the variance does not add a constant epsilon >= 0",
        ),
    ],
    ids=["wrong-axis", "cube", "div-of-x", "eps-not-constant"],
)
def test_layer_norm_near_misses(edit, reason):
    body = LAYER_NORM.replace(*edit)
    model = build(body, extra={"three": np.float32(3.0)})
    before = op_types(model)
    result = FuseLayerNormPass()(model)
    assert not result.modified and op_types(result.model) == before
    assert [(s.op_type, s.reason) for s in result.skipped] == [("ReduceMean", reason)]


@pytest.mark.parametrize(
    "body,scale",
    [(RMS_LLAMA, GAMMA), (RMS_RECIPROCAL, GAMMA), (RMS_DIV, np.ones(D, np.float32))],
    ids=["llama-casts", "reciprocal", "div-no-weight"],
)
def test_rms_norm_fuses_into_block_rms_norm(body, scale):
    model = build(body)
    expected = run_ort(model, {"x": X})[0]
    result = FuseRMSNormPass()(model)
    assert result.rewritten == {"fuse RMSNorm": 1, "LayerNormalization": 1} and result.skipped == []
    assert op_types(result.model) == ["BlockRMSNorm"]  # the no-op Casts go with the pattern
    node = next(iter(result.model.graph))
    assert node.inputs[0].name == "x" and node.inputs[1] is None and node.inputs[2] is None
    np.testing.assert_array_equal(node.inputs[3].const_value.numpy(), scale)
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    got = run_bct_session(result.model, {"x": X})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6)


@pytest.mark.parametrize(
    "edit,reason",
    [
        (("inv = Div(one, r)", "inv = Div(two, r)"), "Div(c, sqrt(...)) with c != 1"),
        (("sq = Pow(xf, two)", "sq = Pow(xf, one)"), "Pow(x, e) before ReduceMean has e != 2"),
        (
            ("ms = ReduceMean<axes = [-1]>(sq)", "ms = ReduceMean<axes = [0]>(sq)"),
            "ReduceMean reduces axes [0], not only the last axis",
        ),
        (("n = Mul(xf, inv)", "n = Mul(inv, inv)"), "1 / sqrt(mean square + eps) does not multiply x"),
    ],
    ids=["div-two", "pow-one", "wrong-axis", "mul-not-x"],
)
def test_rms_norm_near_misses(edit, reason):
    model = build(RMS_LLAMA.replace(*edit))
    before = op_types(model)
    result = FuseRMSNormPass()(model)
    assert not result.modified and op_types(result.model) == before
    assert [(s.op_type, s.reason) for s in result.skipped] == [("ReduceMean", reason)]


def test_plain_mean_is_not_a_norm():
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, {D}] x) => (float[2, 3, 1] y) {{
      y = ReduceMean<axes = [-1]>(x)
    }}"""
    model = model_from_text(text)
    for fusion in (FuseLayerNormPass(), FuseRMSNormPass()):
        result = fusion(model)
        assert not result.modified and result.skipped == []  # not a candidate: nothing to report
    assert isinstance(model, ir.Model)
