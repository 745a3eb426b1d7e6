"""The output model says it was made by bct-onnx: producer, version and the config in metadata_props."""

from __future__ import annotations

import json

import onnx
import pytest

import bct_onnx
from bct_onnx import model_metadata


def stamped_source(tiny_model) -> onnx.ModelProto:
    model = tiny_model(seed=3)
    model.producer_name, model.producer_version = "pytorch", "2.13.0"
    return model


@pytest.mark.parametrize("output_format", ["bct", "qdq"])
def test_output_carries_producer_version_and_config(tmp_path, output_format, tiny_model):
    out = tmp_path / "out.onnx"
    result = bct_onnx.compress(stamped_source(tiny_model), out, calibration="none", weight_bits=3, format=output_format)
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


def test_unstamped_model_reads_as_none(tiny_model):
    import onnx_ir as ir

    assert model_metadata.read(ir.serde.deserialize_model(tiny_model())) is None
