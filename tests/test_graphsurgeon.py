"""onnx-graphsurgeon: a compressed model survives import -> cleanup -> toposort -> export and still runs;
compress accepts a graphsurgeon Graph (converted at the edge)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import bct_onnx

gs = pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is part of the [test] extra")

K, N, V = 64, 32, 50
TEXT = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 5, {K}] A, int64[2, 5] ids) => (float[2, 5, {N}] Y, float[2, 5, {K}] E) {{
  h = MatMul(A, W1)
  s = Softmax<axis=-1>(h)
  Y = MatMul(s, W2)
  E = Gather(T, ids)
}}"""
RNG = np.random.default_rng(11)
FEEDS = {"A": RNG.standard_normal((2, 5, K)).astype(np.float32), "ids": RNG.integers(0, V, (2, 5))}


def model_proto() -> onnx.ModelProto:
    model = onnx.parser.parse_model(TEXT)
    model.graph.initializer.extend([
        numpy_helper.from_array(RNG.standard_normal((K, N)).astype(np.float32), "W1"),
        numpy_helper.from_array(RNG.standard_normal((N, N)).astype(np.float32), "W2"),
        numpy_helper.from_array(RNG.standard_normal((V, K)).astype(np.float32), "T"),
    ])
    return model


def run(proto: onnx.ModelProto, custom: bool) -> list[np.ndarray]:
    data = proto.SerializeToString()
    if custom:
        return bct_onnx.session(data).run(None, FEEDS)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, FEEDS)


@pytest.mark.parametrize("output_format", ["bct", "qdq"])
def test_compressed_model_survives_a_graphsurgeon_round_trip(output_format):
    compressed = bct_onnx.compress(model_proto(), calibration="none", format=output_format)
    proto = ir.serde.serialize_model(compressed.model)
    graph = gs.import_onnx(proto)
    graph.cleanup().toposort()
    exported = gs.export_onnx(graph)
    onnx.checker.check_model(exported)
    assert sorted(n.op_type for n in exported.graph.node) == sorted(n.op_type for n in proto.graph.node)
    custom = output_format == "bct"
    for before, after in zip(run(proto, custom), run(exported, custom)):
        np.testing.assert_array_equal(after, before)


def test_compress_accepts_a_graphsurgeon_graph():
    source = model_proto()
    graph = gs.import_onnx(source)
    from_graph = bct_onnx.compress(graph, calibration="none")
    from_proto = bct_onnx.compress(source, calibration="none")
    assert from_graph.report.rewritten == from_proto.report.rewritten
    assert from_graph.report.input == "<in-memory model>"
    for a, b in zip(run(ir.serde.serialize_model(from_graph.model), True), run(ir.serde.serialize_model(from_proto.model), True)):
        np.testing.assert_array_equal(a, b)
