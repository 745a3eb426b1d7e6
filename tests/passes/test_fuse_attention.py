"""FuseAttentionPass: Q x K^T -> scale -> mask -> Softmax -> x V becomes one BlockAttention.

Numerics: the compressed model equals bct_onnx.reference_attention.attention on the fused node's
own inputs bit for bit (the kernel agrees with its spec), and is within 0.05 of the float model
(8-bit Q and K, |y| <~ 3, as the unfused chain's test in test_quantize_nonlinear.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.passes import FuseAttentionPass, compress_model
from support import model_from_text, op_types, run_bct_session, run_ort

from bct_onnx import reference_attention as ref
from bct_onnx.config import CompressConfig

B, HQ, HKV, S, PAST, DK = 1, 6, 2, 5, 7, 32
KV = PAST + S

# Llama / SmolLM2 as optimum exports it: rotary aside, K^T = Transpose<[0,1,3,2]> of the repeated
# KV heads (repeat_kv: Unsqueeze -> Expand -> Reshape), sqrt(scale) on Q and on K^T, an additive
# causal mask, and Where(IsNaN(P), 0, P) before P x V.
LLAMA = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[{B}, {HQ}, {S}, {DK}] q, float[{B}, {HKV}, {KV}, {DK}] k, float[{B}, {HKV}, {KV}, {DK}] v,
   float[{B}, 1, {S}, {KV}] mask) => (float[{B}, {HQ}, {S}, {DK}] y) {{
  ku = Unsqueeze(k, two)
  ke = Expand(ku, kv_shape)
  kr = Reshape(ke, q_heads_shape)
  vu = Unsqueeze(v, two)
  ve = Expand(vu, kv_shape)
  vr = Reshape(ve, q_heads_shape)
  kt = Transpose<perm = [0, 1, 3, 2]>(kr)
  qs = Mul(q, root_scale)
  ks = Mul(kt, root_scale)
  scores = MatMul(qs, ks)
  masked = Add(scores, mask)
  probs = Softmax<axis = -1>(masked)
  nan = IsNaN(probs)
  clean = Where(nan, zero, probs)
  y = MatMul(clean, vr)
}}"""


LLAMA_INITIALIZERS = {
    "two": np.array([2], np.int64),
    "kv_shape": np.array([B, HKV, HQ // HKV, KV, DK], np.int64),
    "q_heads_shape": np.array([B, HQ, KV, DK], np.int64),
    "root_scale": np.float32(DK**-0.25),
    "zero": np.float32(0.0),
}


def llama_model() -> ir.Model:
    return model_from_text(
        LLAMA,
        LLAMA_INITIALIZERS,
    )


def llama_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {
        "q": rng.standard_normal((B, HQ, S, DK)).astype(np.float32),
        "k": rng.standard_normal((B, HKV, KV, DK)).astype(np.float32),
        "v": rng.standard_normal((B, HKV, KV, DK)).astype(np.float32),
    }
    visible = np.arange(KV)[None, :] <= np.arange(S)[:, None] + PAST
    feeds["mask"] = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]
    return feeds


def fused_node(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "BlockAttention"]
    return node


def test_llama_attention_with_gqa_becomes_one_op():
    model = llama_model()
    result = compress_model(model, CompressConfig())
    assert op_types(result.model) == ["BlockAttention"]  # repeat_kv, both scales and Where(IsNaN) folded
    assert result.rewritten == {
        "Attention (fused)": 1,
        "Attention: grouped-query expansion folded": 1,
        "Attention: additive mask": 1,
        "Attention: static scale folded": 1,
    }
    node = fused_node(result.model)
    assert [v.name if v is not None else "" for v in node.inputs] == ["q", "k", "", "", "v", "", "", "mask"]
    scale = node.attributes["scale"].value
    assert scale == pytest.approx(DK**-0.5, rel=1e-6)
    feeds = llama_feeds()
    got = run_bct_session(result.model, feeds)[0]
    expected = ref.attention(
        feeds["q"], feeds["k"], feeds["v"], act_bits=8, block_size=32, scale=scale, mask=feeds["mask"]
    )
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=0, atol=0.05)


BERT = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[2, {S}, 4, {DK}] q, float[2, {S}, 4, {DK}] k, float[2, {S}, 4, {DK}] v, float[2, 1, 1, {S}] mask)
  => (float[2, 4, {S}, {DK}] y) {{
  qt = Transpose<perm = [0, 2, 1, 3]>(q)
  kt = Transpose<perm = [0, 2, 3, 1]>(k)
  vt = Transpose<perm = [0, 2, 1, 3]>(v)
  shape = Shape(qt)
  head = Slice(shape, minus_one, big)
  head_f = Cast<to = 1>(head)
  root = Sqrt(head_f)
  inv = Div(one, root)
  root_scale = Sqrt(inv)
  qs = Mul(qt, root_scale)
  ks = Mul(kt, root_scale)
  scores = MatMul(qs, ks)
  masked = Add(scores, mask)
  probs = Softmax<axis = -1>(masked)
  y = MatMul(probs, vt)
}}"""


def test_bert_layout_and_a_scale_computed_from_the_head_size():
    """K^T = Transpose<[0,2,3,1]>(k) becomes Transpose<[0,2,1,3]>(k); sqrt(1 / sqrt(Dh)) computed from
    Shape at run time is static (Dh = 32) and folds into the op's scale."""
    model = model_from_text(
        BERT,
        {
            "minus_one": np.array([-1], np.int64),
            "big": np.array([2**62], np.int64),
            "one": np.float32(1.0),
        },
    )
    result = compress_model(model, CompressConfig())
    assert sorted(op_types(result.model)) == ["BlockAttention", "Transpose", "Transpose", "Transpose"]
    node = fused_node(result.model)
    k_transpose = node.inputs[1].producer()
    assert list(k_transpose.attributes["perm"].value) == [0, 2, 1, 3]
    assert node.attributes["scale"].value == pytest.approx(DK**-0.5, rel=1e-6)
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, S, 4, DK)).astype(np.float32) for n in ("q", "k", "v")}
    feeds["mask"] = np.zeros((2, 1, 1, S), np.float32)
    feeds["mask"][1, ..., -2:] = np.finfo(np.float32).min
    got = run_bct_session(result.model, feeds)[0]
    q, k, v = (np.ascontiguousarray(np.transpose(feeds[n], (0, 2, 1, 3))) for n in ("q", "k", "v"))
    scale = node.attributes["scale"].value
    np.testing.assert_array_equal(
        got, ref.attention(q, k, v, act_bits=8, block_size=32, scale=scale, mask=feeds["mask"])
    )
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=0, atol=0.05)


# BERT / MiniLM as optimum exports them: Q, K, V are [B, S, H * Dh] split into heads by Reshape (its
# shape partly computed at run time) -> Transpose, and the result is merged back by Transpose -> Reshape.
BERT_SPLIT = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[2, {S}, {4 * DK}] q, float[2, {S}, {4 * DK}] k, float[2, {S}, {4 * DK}] v, float[2, 1, 1, {S}] mask)
  => (float[2, {S}, {4 * DK}] y) {{
  shape = Shape(q)
  batch = Gather<axis = 0>(shape, zero_i)
  batch1 = Unsqueeze(batch, zero_1d)
  seq = Gather<axis = 0>(shape, one_i)
  seq1 = Unsqueeze(seq, zero_1d)
  split = Concat<axis = 0>(batch1, minus_one, heads_dh)
  qr = Reshape(q, split)
  kr = Reshape(k, split)
  vr = Reshape(v, split)
  qt = Transpose<perm = [0, 2, 1, 3]>(qr)
  kt = Transpose<perm = [0, 2, 3, 1]>(kr)
  vt = Transpose<perm = [0, 2, 1, 3]>(vr)
  qs = Mul(qt, root_scale)
  ks = Mul(kt, root_scale)
  scores = MatMul(qs, ks)
  masked = Add(scores, mask)
  probs = Softmax<axis = -1>(masked)
  heads = MatMul(probs, vt)
  merged = Transpose<perm = [0, 2, 1, 3]>(heads)
  width = Concat<axis = 0>(batch1, seq1, hidden)
  y = Reshape(merged, width)
}}"""

BERT_SPLIT_INITIALIZERS = {
    "zero_i": np.array(0, np.int64),
    "one_i": np.array(1, np.int64),
    "zero_1d": np.array([0], np.int64),
    "minus_one": np.array([-1], np.int64),
    "heads_dh": np.array([4, DK], np.int64),
    "hidden": np.array([4 * DK], np.int64),
    "root_scale": np.float32(DK**-0.25),
}


def test_bert_head_split_and_merge_go_into_the_op():
    """The op reads Q, K, V [B, S, H * Dh] and writes Y [B, S, H * Dh] (q_heads = 4): no Reshape,
    Transpose or shape arithmetic is left; Y is the spec's, and near the float model's."""
    model = model_from_text(BERT_SPLIT, BERT_SPLIT_INITIALIZERS)
    result = compress_model(model, CompressConfig())
    assert op_types(result.model) == ["BlockAttention"]
    assert result.rewritten["Attention: head split / merge in the op"] == 1
    node = fused_node(result.model)
    assert [v.name if v is not None else "" for v in node.inputs] == ["q", "k", "", "", "v", "", "", "mask"]
    assert node.attributes["q_heads"].value == 4
    assert node.outputs[0].name == "y"
    rng = np.random.default_rng(2)
    feeds = {n: rng.standard_normal((2, S, 4 * DK)).astype(np.float32) for n in ("q", "k", "v")}
    feeds["mask"] = np.zeros((2, 1, 1, S), np.float32)
    feeds["mask"][1, ..., -2:] = np.finfo(np.float32).min
    got = run_bct_session(result.model, feeds)[0]
    scale = node.attributes["scale"].value
    assert scale == pytest.approx(DK**-0.5, rel=1e-6)
    want = ref.attention(
        feeds["q"],
        feeds["k"],
        feeds["v"],
        act_bits=8,
        block_size=32,
        scale=scale,
        mask=feeds["mask"],
        q_heads=4,
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=0, atol=0.05)


def test_result_read_without_the_merge_keeps_the_heads_first_layout():
    """A result that is not merged back (here a graph output [B, H, S, Dh]) keeps Q, K, V heads first."""
    text = BERT_SPLIT.replace(
        f"=> (float[2, {S}, {4 * DK}] y)", f"=> (float[2, {S}, {4 * DK}] y, float[2, 4, {S}, {DK}] heads)"
    )
    result = compress_model(model_from_text(text, BERT_SPLIT_INITIALIZERS), CompressConfig())
    node = fused_node(result.model)
    assert "q_heads" not in node.attributes
    assert "Attention: head split / merge in the op" not in result.rewritten
    assert node.inputs[0].producer().op_type == "Transpose"


def test_off_by_config_leaves_the_chain_to_the_act_matmul_and_softmax_passes():
    result = compress_model(llama_model(), CompressConfig(fuse_attention=False))
    types = op_types(result.model)
    assert "BlockAttention" not in types
    assert types.count("BlockActMatMul") == 2 and "BlockSoftmax" in types


def test_dynamic_scale_on_k_is_a_skip_with_its_reason():
    text = LLAMA.replace(f"float[{B}, 1, {S}, {KV}] mask)", f"float[{B}, 1, {S}, {KV}] mask, float[1] s)")
    text = text.replace("ks = Mul(kt, root_scale)", "ks = Mul(kt, s)")
    model = model_from_text(
        text,
        LLAMA_INITIALIZERS,
    )
    result = FuseAttentionPass(CompressConfig())(model)
    assert not result.modified
    assert [s.reason for s in result.skipped] == ["K^T scaled by a factor that is not static"]


def test_weight_only_config_skips_with_its_reason():
    result = FuseAttentionPass(CompressConfig(act_bits=None))(llama_model())
    assert not result.modified
    assert [s.reason for s in result.skipped] == [
        "AttentionMatMul is disabled or weight-only for Q x K^T: BlockAttention needs act_bits"
    ]


def test_probabilities_read_elsewhere_are_a_skip():
    text = LLAMA.replace(
        f"=> (float[{B}, {HQ}, {S}, {DK}] y)",
        f"=> (float[{B}, {HQ}, {S}, {DK}] y, float[{B}, {HQ}, {S}, {KV}] probs)",
    )
    model = model_from_text(
        text,
        LLAMA_INITIALIZERS,
    )
    result = FuseAttentionPass(CompressConfig())(model)
    assert [s.reason for s in result.skipped] == ["attention probabilities are a graph output"]
