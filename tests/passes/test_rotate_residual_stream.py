"""RotateResidualStreamPass: a pre-RMSNorm stream rotated by a randomized Hadamard, outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from bct_onnx.passes import FuseRMSNormPass, RotateResidualStreamPass, compress_model

from bct_onnx.config import CompressConfig
from bct_onnx.hadamard import hadamard, randomized_hadamard

D, F, V = 64, 96, 50
RNG = np.random.default_rng(3)
CONSTS = {
    "table": RNG.standard_normal((V, D)).astype(np.float32),
    "g1": (1 + 0.3 * RNG.standard_normal(D)).astype(np.float32),
    "g2": (1 + 0.3 * RNG.standard_normal(D)).astype(np.float32),
    "w_up": (RNG.standard_normal((D, F)) / 8).astype(np.float32),
    "w_down": (RNG.standard_normal((F, D)) / 8).astype(np.float32),
    "w_head": (RNG.standard_normal((D, V)) / 8).astype(np.float32),
    "two": np.float32(2.0),
    "eps": np.float32(1e-5),
}
IDS = RNG.integers(0, V, size=(2, 7)).astype(np.int64)


def rms(x: str, gamma: str, out: str) -> str:
    return f"""
  {out}_sq = Pow({x}, two)
  {out}_ms = ReduceMean<axes = [-1]>({out}_sq)
  {out}_me = Add({out}_ms, eps)
  {out}_r = Sqrt({out}_me)
  {out}_n = Div({x}, {out}_r)
  {out} = Mul({out}_n, {gamma})
"""


def decoder(tied: bool, stream_norm: str = "rms") -> str:
    """Gather -> [x + down(relu(up(rms(x))))] -> rms -> head (tied: Transpose(table))."""
    first = rms("x0", "g1", "n1") if stream_norm == "rms" else "  n1 = LayerNormalization<axis = -1>(x0, g1)\n"
    head = "  t = Transpose<perm = [1, 0]>(table)\n  logits = MatMul(n2, t)\n" if tied else "  logits = MatMul(n2, w_head)\n"
    body = (
        "  x0 = Gather(table, input_ids)\n"
        + first
        + "  u = MatMul(n1, w_up)\n  a = Relu(u)\n  h = MatMul(a, w_down)\n  x1 = Add(x0, h)\n"
        + rms("x1", "g2", "n2")
        + head
    )
    return (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"g (int64[2, 7] input_ids) => (float[2, 7, {V}] logits) {{{body}}}"
    )


def fused(helpers, text: str):
    model = helpers.model_from_text(text, CONSTS)
    expected = helpers.run_ort(model, {"input_ids": IDS})[0]
    model = FuseRMSNormPass()(model).model
    return model, expected


@pytest.mark.parametrize("n", [1, 2, 12, 64, 384, 576, 768, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))
    q = randomized_hadamard(n, seed=5)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(q), 1 / np.sqrt(n))


def test_no_hadamard_for_unreachable_order():
    assert hadamard(100) is None and randomized_hadamard(100) is None


def test_untied_head_folds_every_norm_and_keeps_outputs(helpers):
    model, expected = fused(helpers, decoder(tied=False))
    before = helpers.op_types(model)
    result = RotateResidualStreamPass()(model)
    assert result.rewritten == {
        "residual stream rotated (Hadamard)": 1,
        "stream writer MatMul rotated": 1,
        "RMSNorm scale folded into rotated readers": 2,
    }
    assert result.skipped == []
    assert helpers.op_types(result.model) == before  # weights change, no node is added
    norms = [n for n in result.model.graph if n.op_type == "BlockRMSNorm"]
    for norm in norms:
        np.testing.assert_array_equal(norm.inputs[3].const_value.numpy(), np.ones(D, np.float32))
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    q = randomized_hadamard(D)
    np.testing.assert_allclose(gather.inputs[0].const_value.numpy(), CONSTS["table"] @ q, atol=1e-5)
    got = helpers.run_bct_session(result.model, {"input_ids": IDS})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_tied_head_reads_through_q_and_keeps_outputs(helpers):
    model, expected = fused(helpers, decoder(tied=True))
    result = RotateResidualStreamPass()(model)
    assert result.rewritten == {
        "residual stream rotated (Hadamard)": 1,
        "stream writer MatMul rotated": 1,
        "RMSNorm scale folded into rotated readers": 1,
        "RMSNorm reads the stream through Q^T": 1,
        "tied output projection reads through Q": 1,
    }
    types = helpers.op_types(result.model)
    assert types.count("MatMul") == 5 and types.count("Transpose") == 1  # up, down, head + Q^T + Q
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    transpose = next(n for n in result.model.graph if n.op_type == "Transpose")
    assert transpose.inputs[0] is gather.inputs[0]  # the table stays tied, rotated once
    final_norm = [n for n in result.model.graph if n.op_type == "BlockRMSNorm"][-1]
    np.testing.assert_array_equal(final_norm.inputs[3].const_value.numpy(), CONSTS["g2"])  # not folded
    assert final_norm.inputs[0].producer().op_type == "MatMul"  # reads x Q^T
    got = helpers.run_bct_session(result.model, {"input_ids": IDS})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_layer_norm_stream_is_left_alone_with_a_reason(helpers):
    model = helpers.model_from_text(decoder(tied=False, stream_norm="layernorm"), CONSTS)
    model = FuseRMSNormPass()(model).model
    before = helpers.op_types(model)
    result = RotateResidualStreamPass()(model)
    assert not result.modified and helpers.op_types(result.model) == before
    [skip] = result.skipped
    assert skip.reason.startswith("the residual stream feeds LayerNormalization")


def test_shared_writer_weight_is_refused(helpers):
    text = decoder(tied=False).replace("h = MatMul(a, w_down)", "h = MatMul(a, w_down)\n  h2 = MatMul(a, w_down)")
    text = text.replace("(float[2, 7, 50] logits)", "(float[2, 7, 50] logits, float[2, 7, 64] h2)")
    model, _ = fused(helpers, text)
    result = RotateResidualStreamPass()(model)
    assert not result.modified
    assert "without its own constant [K, 64] weight" in result.skipped[0].reason


def test_pipeline_rotates_when_asked_and_not_by_default(helpers):
    model = helpers.model_from_text(decoder(tied=False), CONSTS)
    on = compress_model(model, CompressConfig(act_bits=None, ops=frozenset({"MatMul"}), rotation=True))
    off = compress_model(model, CompressConfig(act_bits=None, ops=frozenset({"MatMul"})))
    assert on.rewritten["residual stream rotated (Hadamard)"] == 1
    assert on.rewritten["RMSNorm scale folded into rotated readers"] == 2
    assert "residual stream rotated (Hadamard)" not in off.rewritten
    assert on.rewritten["MatMul"] == off.rewritten["MatMul"] == 3
