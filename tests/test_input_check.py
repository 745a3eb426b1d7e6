"""Bad inputs of `bct_onnx.compress` (issue 11): each is refused with one error naming the file and
the node or tensor, or repaired so the output loads and agrees with FP32; never a traceback, never
a model that computes NaN where FP32 does not, never a quantized model compressed again."""

from __future__ import annotations

import os
from pathlib import Path

import fuzz_cli as fuzz
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bct_onnx
from bct_onnx.calibration import Calibration
from bct_onnx.errors import InvalidModelError, QuantizedModelError

IDS = np.random.default_rng(1).integers(0, fuzz.VOCAB, size=(2, 5), dtype=np.int64)


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def _mutated(tmp_path: Path, mutate: object) -> Path:
    proto = fuzz.base_model()
    mutate(proto)  # type: ignore[operator]
    return _save(proto, tmp_path / "in.onnx")


def _fp32(path: Path) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": IDS})


def _compressed(path: Path) -> list[np.ndarray]:
    return bct_onnx.session(path).run(None, {"ids": IDS})


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


# ---- invalid inputs: one error naming the file and what is wrong ---------------------------------------

@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (fuzz._dangling, "input 'nowhere' of node"),
        (fuzz._cycle, "input 'act' of node"),
        (fuzz._drop_initializer, "input 'w1' of node"),
        (fuzz._short_initializer, "initializer 'w1': its data does not hold dtype FLOAT x dims [32, 64]"),
        (fuzz._bad_utf8_name, "is not valid UTF-8"),
        (fuzz._unknown_op, "No Op registered for Relux"),
        (fuzz._wrong_dtype, "node name: fc2"),
    ],
)
def test_invalid_model_is_one_error_naming_file_and_culprit(tmp_path: Path, mutation: object, expected: str) -> None:
    path = _mutated(tmp_path, mutation)
    with pytest.raises(InvalidModelError) as info:
        bct_onnx.compress(path, tmp_path / "out.onnx", calibration="none")
    message = str(info.value)
    assert message.startswith(f"the input model is invalid: {path}: ")
    assert expected in message
    assert "\n" not in message
    assert not (tmp_path / "out.onnx").exists()


def test_model_onnx_runtime_rejects_is_refused_before_compressing(tmp_path: Path) -> None:
    """The checker accepts an op of an unknown domain; ONNX Runtime does not: refused before any pass
    (its load waits for the calibration forward to start, check_runtime_loads), no output written."""
    work = tmp_path / "work"
    work.mkdir()
    args = fuzz._text_calibration_ort_rejects(work)
    with pytest.raises(InvalidModelError, match="ONNX Runtime cannot load it: .*example.unknown"):
        bct_onnx.compress(args[0], tmp_path / "out.onnx", calibration="text", tokenizer=args[args.index("--tokenizer") + 1])
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("escapes", "stores its data in '../outside/secret.bin', outside the model's folder"),
        ("absolute", "an absolute path"),
        ("symlink", "stores its data in 'link.bin', a link to"),
        ("past-end", "past the end of the file"),
    ],
)
def test_bad_external_data_reference_names_tensor_and_file(tmp_path: Path, case: str, expected: str) -> None:
    setup = {
        "escapes": fuzz._ext_location(lambda w: "../outside/secret.bin"),
        "absolute": fuzz._ext_location(lambda w: str(w / "outside" / "secret.bin")),
        "symlink": fuzz._ext_location(fuzz._symlink_location),
        "past-end": fuzz._ext_location(lambda w: "in.onnx.data", offset=1 << 20),
    }[case]
    model = Path(setup(tmp_path)[0])
    with pytest.raises(InvalidModelError) as info:
        bct_onnx.compress(model, tmp_path / "out.onnx", calibration="none")
    assert str(info.value).startswith(f"{model}: tensor 'w1' ")
    assert expected in str(info.value)


# ---- quantized and compressed inputs are refused --------------------------------------------------------

@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (fuzz._quantize_dynamic, "is already quantized (2 DynamicQuantizeLinear, 2 MatMulInteger"),
        (fuzz._dq_matmul, "is already quantized (1 DequantizeLinear, e.g. node 'w2_dq')"),
        (fuzz._matmulnbits, "is already quantized (1 MatMulNBits, e.g. node 'fc2')"),
    ],
)
def test_quantized_input_is_refused(tmp_path: Path, setup: object, expected: str) -> None:
    model = Path(setup(tmp_path)[0])  # type: ignore[operator]
    with pytest.raises(QuantizedModelError) as info:
        bct_onnx.compress(model, tmp_path / "out.onnx", calibration="none")
    assert str(info.value).startswith(str(model))
    assert expected in str(info.value)
    assert "give it the float model" in str(info.value)
    assert not (tmp_path / "out.onnx").exists()


def test_compressed_input_is_refused(tmp_path: Path) -> None:
    first = tmp_path / "first.onnx"
    bct_onnx.compress(_save(fuzz.base_model(), tmp_path / "in.onnx"), first, calibration="none", weight_bits=8)
    with pytest.raises(QuantizedModelError, match=r"is already compressed by bct-onnx \(2 BlockMatMul.*compress the original"):
        bct_onnx.compress(first, tmp_path / "again.onnx", calibration="none", weight_bits=3)


# ---- inputs ONNX Runtime runs that are repaired, so the output runs too ------------------------------

def test_negative_declared_dims_become_unknown(tmp_path: Path) -> None:
    """x [batch, -5, 16] into attention-like x @ x^T: the output once carried in_axis_size=-5."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", -5, 16])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"], name="proj"),
        helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "xt"], ["y"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes, "attn", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "s", "s"])], initializer=[w]
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "in.onnx")
    result = bct_onnx.compress(path, tmp_path / "out.onnx", calibration="none")
    assert any("negative dimensions made unknown: x" in w for w in result.report.warnings)
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 6, 16)).astype(np.float32)}
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = onnx.load(str(tmp_path / "out.onnx"))
    for node in out.graph.node:
        for attr in node.attribute:
            assert not (attr.type == onnx.AttributeProto.INT and attr.name.endswith("size") and attr.i < 0), node
    got = bct_onnx.session(tmp_path / "out.onnx").run(None, feeds)[0]
    assert _rel(got, ref) < 0.1  # 4-bit weights, 8-bit activations on random data: about 0.03


def test_negative_layer_norm_epsilon_is_left_float_with_a_reason(tmp_path: Path) -> None:
    path = _mutated(tmp_path, fuzz._negative_epsilon)
    result = bct_onnx.compress(path, tmp_path / "out.onnx", calibration="none", weight_bits=8)
    reasons = [s.reason for s in result.report.skipped if s.op_type == "LayerNormalization"]
    assert reasons == ["epsilon -9.999999747378752e-06 is not a finite number >= 0 (BlockLayerNorm needs one)"]
    ref, got = _fp32(path), _compressed(tmp_path / "out.onnx")
    assert _rel(got[0], ref[0]) < 0.05  # 8-bit weights and activations: about 0.01


def test_value_info_contradicting_inference_is_dropped(tmp_path: Path) -> None:
    path = _mutated(tmp_path, fuzz._bogus_value_info)
    _fp32(path)  # ONNX Runtime runs the input (with warnings)
    result = bct_onnx.compress(path, tmp_path / "out.onnx", calibration="none", weight_bits=8)
    assert any("intermediate value_info shapes that contradict shape inference" in w for w in result.report.warnings)
    assert _rel(_compressed(tmp_path / "out.onnx")[0], _fp32(path)[0]) < 0.05  # 8-bit: about 0.01


# ---- values too large for float16 / float8 scales ---------------------------------------------------

@pytest.mark.parametrize(("scale", "table_scale", "tensor"), [(5e5 * 6, 1.0, "w1"), (1.0, 1e6, "embedding")])
def test_large_values_get_float32_scales_and_stay_finite(
    tmp_path: Path, scale: float, table_scale: float, tensor: str
) -> None:
    path = _save(fuzz.base_model(scale=scale, table_scale=table_scale), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    result = bct_onnx.compress(path, out, calibration="none", weight_bits=4)
    assert result.report.rules["float32 scales (values too large for the configured scale kind)"] == 1
    assert any("stored with float32 scales" in w for w in result.report.warnings)
    scales = {t.name: t for t in onnx.load(str(out)).graph.initializer if t.name.endswith(".scales")}
    widened = [name for name, t in scales.items() if name.startswith(f"{tensor}.") and t.data_type == TensorProto.FLOAT]
    assert len(widened) == 1, sorted(scales)
    narrow = [name for name, t in scales.items() if not name.startswith(f"{tensor}.")]
    assert all(scales[name].data_type != TensorProto.FLOAT for name in narrow)  # only that tensor widened
    ref, got = _fp32(path), _compressed(out)
    assert np.isfinite(got[0]).all() and np.isfinite(got[1]).all()
    assert _rel(got[0], ref[0]) < 0.3  # 4-bit weights: 0.16 here; infinite float16 scales gave 0.98


# ---- GPTQ calibration of a model with external data, from another working directory ----------------

def test_gptq_calibration_with_external_data_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = fuzz._save_external(fuzz.base_model(), model_dir / "in.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    calibration = Calibration(({"ids": IDS},))
    result = bct_onnx.compress(path, tmp_path / "out.onnx", calibration=calibration)
    assert result.report.rules["MatMul weight rounded by GPTQ (calibrated)"] == 2
    assert os.listdir(elsewhere) == []
