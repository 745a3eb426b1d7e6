"""FuseGeluPass: the exporters' GELU spellings -> one BlockGelu; near misses keep their nodes and say why."""

from __future__ import annotations

import numpy as np
import pytest
from bct_onnx.passes import FuseGeluPass
from support import model_from_text, op_types, run_bct_session, run_ort

from bct_onnx.ops import DOMAIN

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
SIG = "g (float[2, 5, 16] x) => (float[2, 5, 16] y)"
SQRT2 = np.float32(np.sqrt(2.0))
C = {
    "sqrt2": SQRT2,
    "inv_sqrt2": np.float32(1 / np.sqrt(2.0)),
    "one": np.float32(1.0),
    "half": np.float32(0.5),
    "three": np.float32(3.0),
    "cubic": np.float32(0.044715),
    "k": np.float32(np.sqrt(2 / np.pi)),
}

ERF_BERT = """
  d = Div(x, sqrt2)
  e = Erf(d)
  a = Add(e, one)
  m = Mul(x, a)
  y = Mul(m, half)
"""
ERF_HALF_FIRST = """
  d = Mul(inv_sqrt2, x)
  e = Erf(d)
  a = Add(one, e)
  h = Mul(half, x)
  y = Mul(a, h)
"""
TANH_GPT2 = """
  p = Pow(x, three)
  c = Mul(p, cubic)
  s = Add(x, c)
  u = Mul(s, k)
  t = Tanh(u)
  a = Add(t, one)
  h = Mul(x, half)
  y = Mul(h, a)
"""
TANH_BLOOM = """
  kx = Mul(x, k)
  cx = Mul(x, cubic)
  cxx = Mul(cx, x)
  q = Add(cxx, one)
  u = Mul(kx, q)
  t = Tanh(u)
  a = Add(t, one)
  h = Mul(x, half)
  y = Mul(h, a)
"""


def build(body: str, extra: dict | None = None, signature: str = SIG):
    return model_from_text(f"{HEADER}\n{signature} {{{body}}}", {**C, **(extra or {})})


@pytest.mark.parametrize(
    "body,approximate,rule",
    [
        (ERF_BERT, "none", "fuse Gelu(erf)"),
        (ERF_HALF_FIRST, "none", "fuse Gelu(erf)"),
        (TANH_GPT2, "tanh", "fuse Gelu(tanh)"),
        (TANH_BLOOM, "tanh", "fuse Gelu(tanh)"),
    ],
    ids=["erf-bert", "erf-half-first", "tanh-gpt2", "tanh-bloom"],
)
def test_fuses_exporter_spellings(body, approximate, rule):
    model = build(body)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32) * 3
    expected = run_ort(model, {"x": x})[0]
    result = FuseGeluPass()(model)
    assert result.modified and result.rewritten == {rule: 1, "Gelu": 1} and result.skipped == []
    assert op_types(result.model) == ["BlockGelu"]
    node = next(iter(result.model.graph))
    assert node.domain == DOMAIN and node.attributes["approximate"].as_string() == approximate
    assert node.inputs[0].name == "x" and result.model.graph.outputs[0].name == "y"
    got = run_bct_session(result.model, {"x": x})[0]
    # BlockGelu (float operands) vs the exporter's float32 graph: erf/tanh polynomials, docs/ops.md
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * 3 * 4)


@pytest.mark.parametrize(
    "body,extra,reason",
    [
        (
            TANH_GPT2,
            {"cubic": np.float32(0.045)},
            "the Tanh argument is not sqrt(2/pi) * (x + 0.044715 x^3) of one tensor x",
        ),
        (ERF_BERT, {"sqrt2": np.float32(2.0)}, "the Erf argument is not x / sqrt(2) of one tensor x"),
        (
            ERF_BERT,
            {"half": np.float32(0.25)},
            "the products after the Erf/Tanh do not compute 0.5 * x * (1 + t) (stopped at 'y', a graph output or unread)",
        ),
        (
            ERF_BERT.replace("m = Mul(x, a)", "z = Relu(x)\n  m = Mul(z, a)"),
            {},
            "the products after the Erf/Tanh do not compute 0.5 * x * (1 + t) (stopped at 'y', a graph output or unread)",
        ),
    ],
    ids=["wrong-cubic", "erf-of-x-over-2", "quarter-not-half", "other-tensor-in-product"],
)
def test_near_misses_keep_nodes_and_say_why(body, extra, reason):
    model = build(body, extra)
    before = op_types(model)
    result = FuseGeluPass()(model)
    assert not result.modified and result.rewritten == {}
    assert op_types(result.model) == before
    anchor = "Erf" if "Erf" in before else "Tanh"
    assert [(s.op_type, s.reason) for s in result.skipped] == [(anchor, reason)]


def test_intermediate_read_elsewhere_is_not_fused():
    signature = "g (float[2, 5, 16] x) => (float[2, 5, 16] y, float[2, 5, 16] a)"
    model = build(ERF_BERT, signature=signature)
    result = FuseGeluPass()(model)
    assert not result.modified
    assert [s.reason for s in result.skipped] == [
        "the products after the Erf/Tanh do not compute 0.5 * x * (1 + t) (stopped at 'a', a graph output or unread)"
    ]


def test_erf_of_a_non_float_is_reported():
    text = f"""{HEADER}
    g (double[4] x) => (double[4] y) {{
      y = Erf(x)
    }}"""
    result = FuseGeluPass()(model_from_text(text))
    assert [s.reason for s in result.skipped] == ["Erf on DOUBLE; BlockGelu takes float32"]
