"""bct_onnx.analysis: sizes, weight errors and output errors, each checked against a value
computed independently here (the block format spec, and sessions run directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import bct_onnx
from bct_onnx import model_io
from bct_onnx.analysis import NON_LAYER, analyze, layer_of
from bct_onnx.block_format import BlockFormat, ScaleKind, fake_quantize

from .conftest import mlp_ids


def test_layer_of_exporters_names() -> None:
    assert layer_of("/bert/encoder/layer.3/attention/self/query/MatMul") == "layer 3"
    assert layer_of("/model/layers.11/mlp/down_proj/MatMul") == "layer 11"
    assert layer_of("/transformer/h.0/attn/c_attn/MatMul") == "layer 0"
    assert layer_of("/decoder/block.2/layer.0/SelfAttention/q/MatMul") == "layer 2"
    assert layer_of("/lm_head/MatMul") == NON_LAYER
    assert layer_of("/embeddings/word_embeddings/Gather") == NON_LAYER
    assert layer_of("/model/layers_norm/Mul") == NON_LAYER


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_analysis_of_the_mlp(mlp_path: Path) -> None:
    original = model_io.load(mlp_path)
    # Plain rounding with float16 scales everywhere: W' is then block_format.fake_quantize(W).
    result = bct_onnx.compress(
        mlp_path, calibration="none", weight_scale_search=False, embedding_scale_kind=ScaleKind.FLOAT16
    )
    analysis = analyze(original, result.model, [{"ids": mlp_ids()}], "ids")

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(mlp_path).graph.initializer}
    fmt = BlockFormat(bits=4, block_size=32, symmetric=True, scale_kind=ScaleKind.FLOAT16)
    expected = {
        "embedding": _relative(fake_quantize(weights["embedding"], fmt), weights["embedding"]),
        "w1": _relative(fake_quantize(weights["w1"].T, fmt), weights["w1"].T),
        "w2": _relative(fake_quantize(weights["w2"].T, fmt), weights["w2"].T),
    }
    measured = {e.source: e for e in analysis.weight_errors}
    assert sorted(measured) == ["embedding", "w1", "w2"]
    for name, value in expected.items():
        assert abs(measured[name].relative_error - value) <= 1e-6 * value, name
    assert [(e.node, e.layer, e.op_type, e.bits, e.elements) for e in analysis.weight_errors] == [
        ("/embed/Gather", NON_LAYER, "BlockGather", 4, 6400),
        ("/layers.0/fc1/MatMul", "layer 0", "BlockMatMul", 4, 8192),
        ("/layers.1/fc2/MatMul", "layer 1", "BlockMatMul", 4, 4096),
    ]

    sizes = {s.name: s for s in analysis.sizes}
    assert sorted(sizes) == ["b1", "embedding", "w1", "w2"]
    assert sizes["w1"].input_bytes == 64 * 128 * 4 and sizes["w1"].component == "MatMul weights"
    assert sizes["w1"].output_bytes == 128 * (64 * 4 // 8) + 128 * 2 * 2  # codes + float16 scales
    assert sizes["embedding"].component == "embedding tables" and sizes["embedding"].layer == NON_LAYER
    assert sizes["b1"].component == "float parameters of BlockMatMul" and sizes["b1"].output_bytes == 512

    # The last node's output is the graph output: its error is measurable from the two sessions.
    fp32 = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(None, {"ids": mlp_ids()})[0]
    ours = bct_onnx.session(_saved(result, mlp_path.parent)).run(None, {"ids": mlp_ids()})[0]
    by_output = {e.output: e for e in analysis.output_errors}
    assert sorted(by_output) == ["emb", "hb", "y"]
    assert abs(by_output["y"].relative_error - _relative(ours, fp32)) <= 1e-6
    assert analysis.output_error_note == "measured on 1 batch(es) of ids"


def _saved(result: bct_onnx.CompressResult, folder: Path) -> Path:
    path = folder / "analysed.bct.onnx"
    model_io.save(result.model, path)
    return path


def test_analysis_without_inputs_says_why(mlp_path: Path) -> None:
    result = bct_onnx.compress(mlp_path, calibration="none")
    analysis = analyze(model_io.load(mlp_path), result.model)
    assert analysis.output_errors == []
    assert analysis.output_error_note.startswith("not measured: no calibration inputs")
    assert len(analysis.weight_errors) == 3


def test_output_errors_of_a_model_with_external_data(tmp_path: Path, mlp_path: Path) -> None:
    """Weights in an external data file still reach the sessions the analysis opens."""
    external = tmp_path / "external" / "mlp.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(mlp_path)), str(external), save_as_external_data=True, size_threshold=0)
    original = model_io.load(external)
    result = bct_onnx.compress(external, calibration="none")
    analysis = analyze(original, result.model, [{"ids": mlp_ids()}], "ids")
    assert [e.output for e in analysis.output_errors] == ["emb", "hb", "y"]
    assert all(0 < e.relative_error < 0.3 for e in analysis.output_errors)
