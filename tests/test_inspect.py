"""bct_onnx.inspect: per-node format, bits, block size, scale kind and bytes; why float nodes stay float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import bct_onnx
from bct_onnx.inspect import component_of, inspect_model, layer_of

K, N, V = 64, 24, 100
TEXT = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, {K}] A, int64[B, S] ids) => (float[B, S, {N}] Y, float[B, S, {K}] E, float[B, S, S] P) {{
  q = MatMul(A, W)
  Y = Add(q, bias)
  E = Gather(T, ids)
  At = Transpose<perm=[0, 2, 1]>(A)
  P = MatMul(A, At)
}}"""


def model_proto() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    model = onnx.parser.parse_model(TEXT)
    for node, name in zip(model.graph.node, ["/model/layers.0/mlp/up_proj/MatMul", "add", "/model/embed_tokens/Gather",
                                                "t", "/model/layers.1/self_attn/MatMul"]):
        node.name = name
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((N,)).astype(np.float32), "bias"),
        numpy_helper.from_array(rng.standard_normal((V, K)).astype(np.float32), "T"),
    ])
    return model


def by_name(inspection):
    return {node.name: node for node in inspection.nodes}


def test_float_model_predicts_what_compress_would_do():
    result = inspect_model(model_proto())
    assert result.format == "float" and result.opset == 17 and result.made_by is None
    nodes = by_name(result)
    assert set(nodes) == {"/model/layers.0/mlp/up_proj/MatMul", "/model/embed_tokens/Gather", "/model/layers.1/self_attn/MatMul"}
    up = nodes["/model/layers.0/mlp/up_proj/MatMul"]
    assert (up.kind, up.format, up.layer, up.component, up.bytes) == ("MatMul", "float", "layer 0", "mlp", K * N * 4)
    assert "would rewrite it" in up.reason and "would rewrite it" in nodes["/model/embed_tokens/Gather"].reason
    attention = nodes["/model/layers.1/self_attn/MatMul"]
    assert attention.kind == "AttentionMatMul" and "computed at run time" in attention.reason
    assert result.prediction["rewritten"] == {"Gather": 1, "MatMul": 1}
    assert result.prediction["weight_bytes_after"] < result.prediction["weight_bytes_before"]
    assert "would rewrite: Gather 1, MatMul 1" in result.summary()


def test_bct_model_nodes_bytes_and_float_reasons():
    compressed = bct_onnx.compress(model_proto(), calibration="none", ops=["MatMul"], act_bits=None)
    result = inspect_model(compressed.model)
    assert result.format == "bct" and result.made_by["config"]["ops"] == ["MatMul"]
    nodes = by_name(result)
    up = nodes["/model/layers.0/mlp/up_proj/MatMul"]
    assert (up.op_type, up.format, up.bits, up.block_size, up.scale_kind, up.act_bits) == ("BlockMatMul", "bct", 4, 32, "float16", None)
    block_matmul = next(n for n in compressed.model.graph if n.op_type == "BlockMatMul")
    stored = sum(v.const_value.nbytes for v in block_matmul.inputs[1:] if v is not None)
    assert up.bytes == stored == N * K // 2 + N * 2 * 2 + N * 4  # codes, float16 scales, float32 bias
    assert up.float_bytes == (K * N + N) * 4
    table = nodes["/model/embed_tokens/Gather"]
    assert table.format == "float" and table.component == "embedding"
    assert "not an op kind" in table.reason
    attention = nodes["/model/layers.1/self_attn/MatMul"]
    assert attention.format == "float" and "computed at run time" in attention.reason
    data = json.loads(result.to_json())
    assert data["totals_by_component"]["mlp"] == {"nodes": 1, "compressed": 1, "bytes": stored, "float_bytes": (K * N + N) * 4}
    text = result.summary()
    assert "layer 0" in text and "float: 2 node(s)" in text
    assert "BlockMatMul" in result.summary(per_node=True)


@pytest.mark.parametrize("bits", [3, 4])
def test_qdq_model_reports_standard_weights(bits):
    compressed = bct_onnx.compress(model_proto(), calibration="none", format="qdq", weight_bits=bits)
    result = inspect_model(compressed.model)
    assert result.format == "qdq" and result.opset == 21
    nodes = by_name(result)
    up = nodes["/model/layers.0/mlp/up_proj/MatMul"]
    assert (up.format, up.bits, up.block_size, up.scale_kind) == ("qdq", bits, 32, "float32")
    code_bytes = K * N // 2 if bits == 4 else K * N  # int4 packed, 3-bit in an int8 container
    assert up.bytes == code_bytes + (K // 32) * N * 4 + N * 4
    assert nodes["/model/embed_tokens/Gather"].format == "qdq"


def test_inspect_reads_files(tmp_path):
    path = tmp_path / "m.onnx"
    bct_onnx.compress(model_proto(), path, calibration="none")
    result = inspect_model(path, explain=False)
    assert result.file_bytes == path.stat().st_size and result.model == str(path)


def test_layer_and_component_names():
    assert layer_of("/model/layers.3/self_attn/q_proj/MatMul") == "layer 3"
    assert layer_of("/encoder/layer.11/attention/self/query/MatMul") == "layer 11"
    assert layer_of("/transformer/h.7/mlp/c_fc/MatMul") == "layer 7"
    assert layer_of("/lm_head/MatMul") is None
    assert component_of("MatMul", "/encoder/layer.1/attention/self/query/MatMul") == "attention"
    assert component_of("MatMul", "/model/layers.1/mlp/down_proj/MatMul") == "mlp"
    assert component_of("MatMul", "/lm_head/MatMul") == "lm_head"
    assert component_of("Gather", "x") == "embedding"


def test_custom_nonlinear_ops_count_their_parameters():
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 5, {K}] X) => (float[2, 5, {K}] Y) {{
  Y = LayerNormalization<axis=-1>(X, gamma, beta)
}}""")
    model.graph.node[0].name = "/encoder/layer.2/LayerNorm"
    model.graph.initializer.extend([
        numpy_helper.from_array(np.ones(K, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(K, np.float32), "beta"),
    ])
    compressed = bct_onnx.compress(model, calibration="none", ops=["LayerNormalization"])
    (node,) = inspect_model(compressed.model, explain=False).nodes
    assert (node.op_type, node.kind, node.format, node.layer, node.component) == (
        "BlockLayerNorm", "LayerNormalization", "bct", "layer 2", "norm")
    assert node.bytes == node.float_bytes == 2 * K * 4
