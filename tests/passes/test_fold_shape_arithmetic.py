"""FoldShapeArithmeticPass: static dims folded, symbolic dims read once, per-layer copies merged."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.passes import FoldShapeArithmeticPass

TWO_LAYERS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 8] x, float[B, 2, P, 4] past0, float[B, 2, P, 4] past1) => (float[B, S, 2, 4] y0, float[B, S, 2, 4] y1, int64[1] p) {
  y0 = Layer0(x, past0)
  y1 = Layer1(x, past1)
  sp = Shape(past1)
  three = Constant<value = int64[1] {2}>()
  p = Gather<axis = 0>(sp, three)
}"""


def _layer(index: int) -> str:
    # Reshape x [B, S, 8] to [B, S, 2, 4]: the target is built from Shape reads as exporters do
    return f"""
  sx{index} = Shape(x)
  zero{index} = Constant<value = int64 {{0}}>()
  one{index} = Constant<value = int64 {{1}}>()
  b{index} = Gather<axis = 0>(sx{index}, zero{index})
  s{index} = Gather<axis = 0>(sx{index}, one{index})
  sk{index} = Shape(past{index})
  heads_index{index} = Constant<value = int64 {{1}}>()
  heads{index} = Gather<axis = 0>(sk{index}, heads_index{index})
  axes{index} = Constant<value = int64[1] {{0}}>()
  b1{index} = Unsqueeze(b{index}, axes{index})
  s1{index} = Unsqueeze(s{index}, axes{index})
  h1{index} = Unsqueeze(heads{index}, axes{index})
  four{index} = Constant<value = int64[1] {{4}}>()
  target{index} = Concat<axis = 0>(b1{index}, s1{index}, h1{index}, four{index})
  x{index} = {"Neg" if index else "Identity"}(x)
  y{index} = Reshape(x{index}, target{index})"""


def _model(helpers):
    body = TWO_LAYERS.replace("  y0 = Layer0(x, past0)\n", _layer(0) + "\n").replace(
        "  y1 = Layer1(x, past1)\n", _layer(1) + "\n"
    )
    return helpers.model_from_text(body)


def test_reshape_targets_fold_and_layers_share_one_copy(helpers):
    model = _model(helpers)
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((2, 3, 8)).astype(np.float32),
        "past0": rng.standard_normal((2, 2, 5, 4)).astype(np.float32),
        "past1": rng.standard_normal((2, 2, 5, 4)).astype(np.float32),
    }
    expected = helpers.run_ort(model, feeds)
    result = FoldShapeArithmeticPass()(model)
    assert result.modified
    assert result.rewritten["static dim read folded"] == 2  # the heads dim (2) of both pasts
    assert result.rewritten["symbolic dim read shared"] == 4  # B and S in both layers
    counts = collections.Counter(helpers.op_types(model))
    # One Shape read per symbolic dim of x (B, S); the graph output p keeps its own Shape -> Gather.
    # One Reshape target (Concat) serves both layers.
    assert counts["Shape"] == 3 and counts["Reshape"] == 2 and counts["Concat"] == 1, counts
    assert counts["Gather"] == 1
    got = helpers.run_ort(model, feeds)
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)


def test_tiny_llama_with_past_keeps_its_outputs(tmp_path):
    pytest.importorskip("optimum")
    import onnxruntime as ort
    from bct_onnx.models import families

    path = families.export_tiny("llama", tmp_path, with_past=True)[0]
    model = ir.load(path)
    before = collections.Counter(n.op_type for n in model.graph)
    result = FoldShapeArithmeticPass()(model)
    after = collections.Counter(n.op_type for n in model.graph)
    assert sum(after.values()) < 0.6 * sum(before.values()), (before, after)
    assert after["Shape"] < before["Shape"] / 2 and after["MatMul"] == before["MatMul"]
    assert result.rewritten["symbolic dim read shared"] > 0
    folded = tmp_path / "folded.onnx"
    ir.save(model, folded)
    original, rewritten = ort.InferenceSession(str(path)), ort.InferenceSession(str(folded))
    for sequence, past in ((1, 6), (5, 0), (3, 4)):  # decode step, prefill, chunk after a past
        feeds = families.dummy_inputs(path, sequence_length=sequence, past_length=past)
        for want, have in zip(original.run(None, feeds), rewritten.run(None, feeds)):
            np.testing.assert_array_equal(have, want)
