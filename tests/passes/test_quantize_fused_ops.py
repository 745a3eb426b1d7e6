"""Graphs fused by ONNX Runtime's transformer optimizer compress without unfusing (QuantizeFusedOpsPass).

The optimizer (onnxruntime.transformers.optimizer, offline) fuses a BERT export into Attention,
EmbedLayerNormalization, SkipLayerNormalization and BiasGelu nodes. After compress_model the fused
nodes are still there, their weights are stored blockwise (Attention's QKV through BlockDequantize,
the word table through BlockGather), the plain MatMuls are BlockMatMuls, and the model runs in ONNX
Runtime with the library. Stated bounds: cosine to the FP32 fused graph >= 0.95 on real MiniLM
sentence embeddings (measured 0.976, docs/results.md) and >= 0.97 on the tiny BERT's outputs (the
family bound of test_families_e2e).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from bct_onnx.models import families, minilm
from bct_onnx.passes import QuantizeFusedOpsPass, compress_model

from bct_onnx.config import CompressConfig
from bct_onnx.runtime import session

FUSED = ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu")


def ort_fused(path: Path, heads: int, hidden: int, out: Path) -> Path:
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(
        str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1
    )
    optimized.save_model_to_file(str(out))
    return out


def counts(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def compress_and_compare(fused: Path, feeds: dict[str, np.ndarray], tmp_path: Path) -> tuple[ir.Model, dict]:
    model = ir.load(fused)
    before = counts(model)
    assert all(before[op] for op in FUSED), before
    result = compress_model(model, CompressConfig())
    after = counts(result.model)
    for op in FUSED:  # nothing unfused
        assert after[op] == before[op], (op, before, after)
    assert result.rewritten["Attention weight (BlockDequantize)"] == before["Attention"]
    assert result.rewritten["EmbedLayerNormalization word table (BlockGather)"] == 1
    assert after["MatMul"] == 0 and after["BlockMatMul"] == before["MatMul"]
    reasons = {s.op_type: s.reason for s in result.skipped}
    assert "residual Add + LayerNormalization with bias" in reasons["SkipLayerNormalization"]
    assert "BlockGelu has no bias input" in reasons["BiasGelu"]
    out = tmp_path / "fused.bct.onnx"
    ir.save(result.model, out)
    reference = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    expected = dict(zip(names, reference.run(names, feeds), strict=True))
    got = dict(zip(names, session(str(out)).run(names, feeds), strict=True))
    cosines = {name: row_cosines(expected[name], got[name]) for name in names}
    ratio = fused.stat().st_size / out.stat().st_size
    print(json.dumps({"ratio": round(ratio, 2), **{k: round(float(v.min()), 4) for k, v in cosines.items()}}))
    return result.model, {"ratio": ratio, **cosines}


def test_minilm_fused_by_ort_optimizer_compresses_without_unfusing(tmp_path: Path, minilm_export: Path) -> None:
    fused = ort_fused(minilm_export, 12, 384, tmp_path / "minilm_fused.onnx")
    tokenizer = minilm.load_tokenizer()
    encoded = tokenizer(minilm.sentences()[:8], padding=True, return_tensors="np")
    feeds = {name: np.asarray(encoded[name], np.int64) for name in ("input_ids", "attention_mask")}
    _, measured = compress_and_compare(fused, feeds, tmp_path)
    assert measured["sentence_embedding"].min() >= 0.95
    assert measured["ratio"] > 5.0


def test_tiny_bert_fused_by_ort_optimizer_compresses_without_unfusing(tmp_path: Path) -> None:
    (exported,) = families.export_tiny("bert", tmp_path / "bert", with_past=False)
    fused = ort_fused(exported, families.HEADS, families.HIDDEN, tmp_path / "bert_fused.onnx")
    feeds = families.dummy_inputs(fused)
    _, measured = compress_and_compare(fused, feeds, tmp_path)
    assert all(values.min() >= 0.97 for key, values in measured.items() if key != "ratio")


def test_fused_weight_that_is_not_a_constant_is_reported() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[1, 4, 8] x, float[8, 24] w) => (float[1, 4, 8] y) {
      y = com.microsoft.Attention <num_heads = 2> (x, w, bias)
    }"""
    import onnx

    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(24, np.float32), "bias"))
    result = QuantizeFusedOpsPass(CompressConfig())(ir.from_proto(proto))
    assert not result.modified
    (skip,) = result.skipped
    assert skip.op_type == "Attention" and skip.reason == "input 1 of Attention is not a constant initializer"


def genai_style_layer(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """One decoder layer as onnxruntime-genai's model builder writes it in float (`-p fp32 -e cpu`):
    SkipSimplifiedLayerNormalization (residual Add + RMSNorm), Q / K / V MatMuls, GroupQueryAttention
    with its past / present cache and seqlens_k (4 query heads, 2 KV heads of 16), the output MatMul;
    and feeds for a 3-token step after 5 cached tokens."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d, heads, kv_heads, dh, past, seq = 64, 4, 2, 16, 5, 3

    def weight(name: str, n: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32), name)

    ms = "com.microsoft"
    nodes = [
        helper.make_node(
            "SkipSimplifiedLayerNormalization", ["x", "residual", "gamma"], ["h", "", "", "sum"],
            domain=ms, epsilon=1e-5,
        ),
        helper.make_node("MatMul", ["h", "wq"], ["q"]),
        helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("MatMul", ["h", "wv"], ["v"]),
        helper.make_node(
            "GroupQueryAttention",
            ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
            ["attn", "present_key", "present_value"],
            domain=ms, num_heads=heads, kv_num_heads=kv_heads,
        ),
        helper.make_node("MatMul", ["attn", "wo"], ["o"]),
        helper.make_node("Add", ["o", "sum"], ["y"]),
    ]
    cache = ["batch", kv_heads, "past", dh]
    present = ["batch", kv_heads, "total", dh]
    graph = helper.make_graph(
        nodes,
        "genai_layer",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d]),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, ["batch", "seq", d]),
            helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
            helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d]),
            helper.make_tensor_value_info("present_key", TensorProto.FLOAT, present),
            helper.make_tensor_value_info("present_value", TensorProto.FLOAT, present),
        ],
        [
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), "gamma"),
            weight("wq", heads * dh),
            weight("wk", kv_heads * dh),
            weight("wv", kv_heads * dh),
            numpy_helper.from_array((rng.standard_normal((heads * dh, d)) / 8).astype(np.float32), "wo"),
        ],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)], ir_version=8
    )
    onnx.checker.check_model(proto)
    feeds = {
        "x": rng.standard_normal((1, seq, d)).astype(np.float32),
        "residual": rng.standard_normal((1, seq, d)).astype(np.float32),
        "past_key": rng.standard_normal((1, kv_heads, past, dh)).astype(np.float32),
        "past_value": rng.standard_normal((1, kv_heads, past, dh)).astype(np.float32),
        "seqlens_k": np.array([past + seq - 1], np.int32),
        "total_sequence_length": np.array(past + seq, np.int32),
    }
    return ir.from_proto(proto), feeds


def test_graph_fused_by_genai_builder_compresses_without_unfusing(tmp_path: Path) -> None:
    """A float decoder layer fused as onnxruntime-genai's builder writes it (GroupQueryAttention,
    SkipSimplifiedLayerNormalization) compresses with the default flags: its MatMuls become BlockMatMuls,
    the fused nodes and their float cache stay as they are, and the result runs in ONNX Runtime close
    to the float graph (a random-weight layer: outputs and present cache cosine >= 0.98)."""
    model, feeds = genai_style_layer(np.random.default_rng(0))
    float_path = tmp_path / "genai_layer.onnx"
    ir.save(model, float_path)
    before = counts(model)
    result = compress_model(ir.load(float_path), CompressConfig())
    after = counts(result.model)
    assert after["GroupQueryAttention"] == 1 and after["SkipSimplifiedLayerNormalization"] == 1, after
    assert after["MatMul"] == 0 and after["BlockMatMul"] == before["MatMul"] == 4, after
    out = tmp_path / "genai_layer.bct.onnx"
    ir.save(result.model, out)
    reference = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    expected = reference.run(names, feeds)
    got = session(str(out)).run(names, feeds)
    for name, want, have in zip(names, expected, got, strict=True):
        assert have.shape == want.shape, name
        assert row_cosines(want.reshape(1, -1), have.reshape(1, -1)).min() >= 0.98, name
