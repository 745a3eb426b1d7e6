"""The output model says it was made by bct-onnx: producer, version and the config in metadata_props."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bct_onnx
from bct_onnx import model_metadata


def tiny_model() -> onnx.ModelProto:
    weight = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch")
    model.producer_version = "2.13.0"
    return model


@pytest.mark.parametrize("output_format", ["bct", "qdq"])
def test_output_carries_producer_version_and_config(tmp_path, output_format):
    out = tmp_path / "out.onnx"
    result = bct_onnx.compress(tiny_model(), out, calibration="none", weight_bits=3, format=output_format)
    saved = onnx.load(str(out))
    assert saved.producer_name == "bct-onnx"
    assert saved.producer_version == bct_onnx.__version__
    props = {p.key: p.value for p in saved.metadata_props}
    assert props["bct_onnx.version"] == bct_onnx.__version__
    assert props["bct_onnx.format"] == output_format
    assert props["bct_onnx.source_producer"] == "pytorch 2.13.0"
    config = json.loads(props["bct_onnx.config"])
    assert config == result.report.config
    assert config["weight_bits"] == 3 and config["format"] == output_format
    read = model_metadata.read(result.model)
    assert read is not None and read["config"] == config and read["format"] == output_format


def test_unstamped_model_reads_as_none():
    import onnx_ir as ir

    assert model_metadata.read(ir.serde.deserialize_model(tiny_model())) is None
