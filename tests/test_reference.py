"""bct_onnx.reference: a compressed model run in numpy (onnx.reference) against ONNX Runtime + our library.

A small transformer block in ONNX text (embedding Gather, LayerNorm, Q/K/V MatMuls, two-head
attention with Softmax, GELU in BERT's erf spelling, SiLU, RMSNorm in Llama's spelling) is compressed with the
default config and run both ways. Codes agree with the spec bit for bit where an output depends on
rounding alone; MatMul sums differ by accumulation order (docs/ops.md), which can move a downstream
8-bit activation code by one step, hence the stated output tolerance. The two ops the pipeline does
not emit here (BlockQuantize, BlockDequantize) are checked bit-exactly on their own.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bct_onnx.passes import compress_model
from onnx import TensorProto, helper
from support import assert_bits_equal, model_from_text, run, run_bct_session, run_ort

from bct_onnx import ops, reference
from bct_onnx.block_format import BlockFormat, quantize
from bct_onnx.config import CompressConfig

RNG = np.random.default_rng(23)
V, S, D, F = 50, 6, 64, 96

BLOCK = f"""<ir_version: 8, opset_import: ["" : 17]>
g (int64[1, {S}] ids) => (float[1, {S}, {D}] y) {{
  h = Gather(emb, ids)
  ln = LayerNormalization<axis = -1, epsilon = 1e-5>(h, ln_scale, ln_bias)
  q_flat = MatMul(ln, wq)
  k_flat = MatMul(ln, wk)
  v_flat = MatMul(ln, wv)
  q_split = Reshape(q_flat, heads)
  k_split = Reshape(k_flat, heads)
  v_split = Reshape(v_flat, heads)
  q = Transpose<perm = [0, 2, 1, 3]>(q_split)
  kt = Transpose<perm = [0, 2, 3, 1]>(k_split)
  v = Transpose<perm = [0, 2, 1, 3]>(v_split)
  scores = MatMul(q, kt)
  scaled = Div(scores, root)
  probs = Softmax<axis = -1>(scaled)
  att_heads = MatMul(probs, v)
  att_split = Transpose<perm = [0, 2, 1, 3]>(att_heads)
  att = Reshape(att_split, merged)
  up = MatMul(att, w_up)
  d = Div(up, sqrt2)
  e = Erf(d)
  a = Add(e, one)
  m = Mul(up, a)
  gelu = Mul(m, half)
  gate = MatMul(gelu, w_gate)
  sig = Sigmoid(gate)
  silu = Mul(gate, sig)
  down = MatMul(silu, w_down)
  sq = Pow(down, two)
  ms = ReduceMean<axes = [-1]>(sq)
  me = Add(ms, eps)
  r = Sqrt(me)
  inv = Div(one, r)
  n = Mul(down, inv)
  y = Mul(rms_scale, n)
}}"""


def block_model():
    def weight(rows: int, cols: int) -> np.ndarray:
        return (RNG.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    inits = {
        "emb": RNG.standard_normal((V, D)).astype(np.float32),
        "ln_scale": (1 + 0.1 * RNG.standard_normal(D)).astype(np.float32),
        "ln_bias": (0.1 * RNG.standard_normal(D)).astype(np.float32),
        "wq": weight(D, D),
        "wk": weight(D, D),
        "wv": weight(D, D),
        "heads": np.array([1, S, 2, D // 2], np.int64),  # two heads, as BERT splits them
        "merged": np.array([1, S, D], np.int64),
        "root": np.float32(np.sqrt(D // 2)),
        "w_up": weight(D, F),
        "sqrt2": np.float32(np.sqrt(2.0)),
        "one": np.float32(1.0),
        "half": np.float32(0.5),
        "two": np.float32(2.0),
        "eps": np.float32(1e-5),
        "w_gate": weight(F, F),
        "w_down": weight(F, D),
        "rms_scale": (1 + 0.1 * RNG.standard_normal(D)).astype(np.float32),
    }
    return model_from_text(BLOCK, inits)


def test_reference_covers_every_op_of_the_domain():
    assert sorted(op.__name__ for op in reference.OPS) == sorted(ops.OP_TYPES)
    assert all(op.op_domain == ops.DOMAIN for op in reference.OPS)


def test_compressed_block_runs_in_numpy_as_in_onnx_runtime():
    """Every op of the domain but the explicit (de)quantize ops is emitted by the default (fused) or
    the unfused pipeline (or, for the Add + norm ops, residual_model below), and both run in numpy as
    in ONNX Runtime."""
    model = block_model()
    feeds = {"ids": RNG.integers(0, V, (1, S)).astype(np.int64)}
    (fp32,) = run_ort(model, feeds)
    emitted: set[str] = set()
    for config in (CompressConfig(), CompressConfig(fuse_ops=False, fuse_attention=False)):
        compressed = compress_model(model, config).model
        emitted |= {node.op_type for node in compressed.graph if node.domain == ops.DOMAIN}
        (numpy_y,) = reference.run(compressed, feeds)
        (ort_y,) = run_bct_session(compressed, feeds)
        assert numpy_y.dtype == ort_y.dtype == np.float32 and numpy_y.shape == ort_y.shape == fp32.shape
        # Equal bit for bit on the machines tried; a MatMul sum rounded differently may move one 8-bit
        # code of a later op by a step: the RMSNorm output (unit mean square) then moves by a few hundredths.
        np.testing.assert_allclose(numpy_y, ort_y, rtol=0, atol=0.05)
        assert np.mean(numpy_y != ort_y) < 0.05
        cosine = float(np.sum(numpy_y * fp32) / (np.linalg.norm(numpy_y) * np.linalg.norm(fp32)))
        assert cosine > 0.97  # and both are the compressed model, not something else
    fused_norms = {ops.BLOCK_ADD_LAYER_NORM, ops.BLOCK_ADD_RMS_NORM}  # residual_model below
    assert emitted == set(ops.OP_TYPES) - {ops.BLOCK_QUANTIZE, ops.BLOCK_DEQUANTIZE} - fused_norms, emitted


RESIDUAL = f"""<ir_version: 8, opset_import: ["" : 17]>
g (int64[1, {S}] ids) => (float[1, {S}, {D}] y, float[1, {S}, {D}] stream) {{
  h = Gather(emb, ids)
  a = MatMul(h, wa)
  r1 = Add(a, h)
  ln = LayerNormalization<axis = -1, epsilon = 1e-5>(r1, ln_scale, ln_bias)
  b = MatMul(ln, wb)
  stream = Add(r1, b)
  sq = Pow(stream, two)
  ms = ReduceMean<axes = [-1]>(sq)
  me = Add(ms, eps)
  r = Sqrt(me)
  inv = Div(one, r)
  n = Mul(stream, inv)
  normed = Mul(rms_scale, n)
  y = MatMul(normed, wc)
}}"""


def test_fused_residual_norms_run_in_numpy_as_in_onnx_runtime():
    """BlockAddLayerNorm (post-norm) and BlockAddRMSNorm (pre-norm, its sum a graph output)."""
    inits = {
        "emb": RNG.standard_normal((V, D)).astype(np.float32),
        "wa": (RNG.standard_normal((D, D)) / 8).astype(np.float32),
        "wb": (RNG.standard_normal((D, D)) / 8).astype(np.float32),
        "wc": (RNG.standard_normal((D, D)) / 8).astype(np.float32),
        "ln_scale": (1 + 0.1 * RNG.standard_normal(D)).astype(np.float32),
        "ln_bias": (0.1 * RNG.standard_normal(D)).astype(np.float32),
        "rms_scale": (1 + 0.1 * RNG.standard_normal(D)).astype(np.float32),
        "two": np.float32(2.0),
        "one": np.float32(1.0),
        "eps": np.float32(1e-5),
    }
    model = model_from_text(RESIDUAL, inits)
    feeds = {"ids": RNG.integers(0, V, (1, S)).astype(np.int64)}
    compressed = compress_model(model, CompressConfig()).model
    emitted = {node.op_type for node in compressed.graph if node.domain == ops.DOMAIN}
    assert {ops.BLOCK_ADD_LAYER_NORM, ops.BLOCK_ADD_RMS_NORM} <= emitted, emitted
    assert not {ops.BLOCK_LAYER_NORM, ops.BLOCK_RMS_NORM} & emitted, emitted
    numpy_out = reference.run(compressed, feeds)
    ort_out = run_bct_session(compressed, feeds)
    fp32 = run_ort(model, feeds)
    for name, numpy_y, ort_y, float_y in zip(("y", "stream"), numpy_out, ort_out, fp32, strict=True):
        assert numpy_y.shape == ort_y.shape == float_y.shape, name
        # The MatMuls' float sums may round differently (docs/ops.md tolerance); the fused ops add no more.
        np.testing.assert_allclose(numpy_y, ort_y, rtol=0, atol=0.05, err_msg=name)
        cosine = float(np.sum(numpy_y * float_y) / (np.linalg.norm(numpy_y) * np.linalg.norm(float_y)))
        assert cosine > 0.97, name


def test_reference_accepts_a_saved_file(tmp_path):
    compressed = compress_model(block_model(), CompressConfig(act_bits=None)).model
    path = tmp_path / "block.onnx"
    onnx.save(__import__("onnx_ir").to_proto(compressed), path)
    feeds = {"ids": np.arange(S, dtype=np.int64)[None]}
    (from_file,) = reference.run(str(path), feeds)
    (from_ir,) = reference.run(compressed, feeds)
    assert_bits_equal(from_file, from_ir, "y")


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_and_dequantize_match_the_library_bit_for_bit(symmetric):
    fmt = BlockFormat(bits=5, block_size=16, symmetric=symmetric)
    x = RNG.standard_normal((3, 40)).astype(np.float32)
    outputs = ["codes", "scales"] + ([] if symmetric else ["zero_points"])
    attrs = {"bits": fmt.bits, "block_size": fmt.block_size, "symmetric": int(symmetric)}
    quant = helper.make_node(
        ops.BLOCK_QUANTIZE, ["x"], outputs, domain=ops.DOMAIN, scale_kind="float16", **attrs
    )
    dequant = helper.make_node(ops.BLOCK_DEQUANTIZE, outputs, ["y"], domain=ops.DOMAIN, axis_size=40, **attrs)
    graph = helper.make_graph(
        [quant, dequant],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
        [helper.make_value_info(name, onnx.TypeProto()) for name in [*outputs, "y"]],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)], ir_version=9
    )
    expected = quantize(x, fmt)
    numpy_out = reference.run(model, {"x": x})
    library_out = run(model.SerializeToString(), {"x": x})
    spec = [expected.codes, expected.scales] + ([] if symmetric else [expected.zero_points])
    for name, want, got_numpy, got_library in zip(outputs, spec, numpy_out, library_out, strict=False):
        assert_bits_equal(got_numpy, want, f"reference {name}")
        assert_bits_equal(got_library, want, f"library {name}")
    assert_bits_equal(numpy_out[-1], library_out[-1], "y")
