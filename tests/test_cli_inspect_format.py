"""CLI: `compress --format qdq` and `inspect MODEL [--json] [--nodes]`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bct_onnx import cli


def save_tiny(path, tiny_model):
    onnx.save(tiny_model(node_name="/model/layers.0/mlp/MatMul", seed=7), path)
    return path


def test_compress_format_qdq_writes_standard_onnx(tmp_path, capsys, tiny_model):
    source = save_tiny(tmp_path / "m.onnx", tiny_model)
    out = tmp_path / "m.qdq.onnx"
    assert cli.main(["compress", str(source), "-o", str(out), "--format", "qdq", "-q"]) == 0
    assert "standard ONNX (opset 21" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # no library
    assert session.run(None, {"A": np.ones((1, 64), np.float32)})[0].shape == (1, 16)


def test_qdq_activations_flag(tmp_path, capsys, tiny_model):
    source = save_tiny(tmp_path / "m.onnx", tiny_model)
    out = tmp_path / "m.qdq.onnx"
    argv = ["compress", str(source), "-o", str(out), "--format", "qdq", "--qdq-activations", "-q"]
    assert cli.main(argv) == 0
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QuantizeLinear" in ops and ops.count("DequantizeLinear") == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compress", str(source), "-o", str(tmp_path / "x.onnx"), "--qdq-activations", "-q"])
    assert exit_.value.code == 2
    assert "applies to format 'qdq' only" in capsys.readouterr().err


def test_inspect_text_json_and_nodes(tmp_path, capsys, tiny_model):
    source = save_tiny(tmp_path / "m.onnx", tiny_model)
    out = tmp_path / "m.bct.onnx"
    assert cli.main(["compress", str(source), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bct model" in text and "layer 0" in text
    assert cli.main(["inspect", str(out), "--nodes"]) == 0
    assert "BlockMatMul" in capsys.readouterr().out
    assert cli.main(["inspect", str(source), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "float" and data["prediction"]["rewritten"] == {"MatMul": 1}
    assert data["nodes"][0]["reason"].startswith("compressible")


def test_inspect_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bct-onnx: error:") and "nope.onnx" in err[0]
