"""Defaults per model kind (bct_onnx/model_defaults.py): encoders get an 8x budget with one-byte scales."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bct_onnx.models import families

import bct_onnx
from bct_onnx.api import make_config
from bct_onnx.block_format import ScaleKind
from bct_onnx.config import CompressConfig
from bct_onnx.config_file import config_from_mapping
from bct_onnx.model_defaults import MODEL_KIND_DEFAULTS, ModelKind, apply_model_kind_defaults, model_kind
from bct_onnx.report import config_to_dict

V, D = 512, 64
RNG = np.random.default_rng(3)
TABLES = {
    "table": RNG.standard_normal((V, D)).astype(np.float32),
    "w1": RNG.standard_normal((D, 4 * D)).astype(np.float32),
    "w2": RNG.standard_normal((4 * D, D)).astype(np.float32),
    "w_head": RNG.standard_normal((D, V)).astype(np.float32),
}
ENCODER_BODY = "  e = Gather(table, input_ids)\n  h = MatMul(e, w1)\n  hidden = MatMul(h, w2)\n"


def _model(body: str, outputs: str, inputs: str = "int64[N, S] input_ids") -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : 17]>\ng ({inputs}) => ({outputs}) {{{body}}}')
    used = {name: array for name, array in TABLES.items() if name in body}
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in used.items())
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def encoder() -> ir.Model:
    return _model(ENCODER_BODY, f"float[N, S, {D}] hidden")


def decoder() -> ir.Model:
    return _model(ENCODER_BODY + "  logits = MatMul(hidden, w_head)\n", f"float[N, S, {V}] logits")


def mlp() -> ir.Model:
    return _model("  h = MatMul(x, w1)\n  y = MatMul(h, w2)\n", f"float[N, {D}] y", f"float[N, {D}] x")


def test_model_kind_from_the_graph():
    assert model_kind(encoder()) is ModelKind.ENCODER
    assert model_kind(decoder()) is ModelKind.DECODER
    assert model_kind(mlp()) is ModelKind.OTHER


def test_ids_reshaped_before_the_embedding_still_make_a_text_model():
    """T5 and BART encoders export input_ids -> Reshape -> Gather."""
    body = "  shape = Constant<value: tensor = int64[2] {-1, 7}>()\n  flat = Reshape(input_ids, shape)\n" + ENCODER_BODY.replace(
        "Gather(table, input_ids)", "Gather(table, flat)"
    )
    assert model_kind(_model(body, f"float[N, 7, {D}] hidden")) is ModelKind.ENCODER


def test_encoder_defaults_are_an_8x_budget_with_one_byte_scales():
    assert MODEL_KIND_DEFAULTS[ModelKind.ENCODER] == {
        "target_ratio": 8.0, "scale_kind": ScaleKind.FLOAT8E5M2, "budget_floor": False
    }
    resolved, applied = apply_model_kind_defaults(make_config(), ModelKind.ENCODER)
    assert applied == dict(MODEL_KIND_DEFAULTS[ModelKind.ENCODER])
    assert resolved.target_ratio == 8.0 and resolved.scale_kind is ScaleKind.FLOAT8E5M2 and not resolved.budget_floor
    assert resolved.explicit_fields is None  # resolved: what the pipeline runs
    for kind in (ModelKind.DECODER, ModelKind.OTHER):
        same, applied = apply_model_kind_defaults(make_config(), kind)
        assert applied == {} and same.target_ratio is None and same.scale_kind is ScaleKind.FLOAT16


def test_named_fields_keep_the_callers_value():
    # --weight-bits 4: fixed widths (the budget is named off), the encoder's one-byte scales still apply
    resolved, applied = apply_model_kind_defaults(make_config(weight_bits=4), ModelKind.ENCODER)
    assert resolved.target_ratio is None and resolved.weight_bits == 4
    assert applied == {"scale_kind": ScaleKind.FLOAT8E5M2, "budget_floor": False}
    resolved, _ = apply_model_kind_defaults(make_config(scale_kind="float16", target_ratio=6.0), ModelKind.ENCODER)
    assert resolved.scale_kind is ScaleKind.FLOAT16 and resolved.target_ratio == 6.0
    resolved, _ = apply_model_kind_defaults(make_config(target_ratio=None), ModelKind.ENCODER)
    assert resolved.target_ratio is None and resolved.scale_kind is ScaleKind.FLOAT8E5M2


def test_a_config_built_directly_is_used_as_given():
    config = CompressConfig()
    resolved, applied = apply_model_kind_defaults(config, ModelKind.ENCODER)
    assert resolved is config and applied == {}
    assert make_config(config, weight_bits=3).explicit_fields is None  # built on a direct config: still exact


def test_config_file_keys_are_explicit_and_the_rest_take_kind_defaults():
    config = config_from_mapping({"scale_kind": "pow2"}, "test.toml")
    assert config.explicit_fields == {"scale_kind"}
    resolved, _ = apply_model_kind_defaults(config, ModelKind.ENCODER)
    assert resolved.scale_kind is ScaleKind.POW2 and resolved.target_ratio == 8.0


def test_explicit_fields_stay_out_of_equality_and_the_report():
    assert make_config(weight_bits=4) == dataclasses.replace(CompressConfig(), weight_bits=4)
    assert "explicit_fields" not in config_to_dict(make_config(weight_bits=4))
    with pytest.raises(ValueError, match="unknown config fields"):
        CompressConfig(explicit_fields=frozenset({"no_such_field"}))


def test_compress_applies_the_encoder_defaults_and_reports_them(tmp_path):
    _, report = bct_onnx.compress(encoder(), calibration="none")
    assert report.model_kind["kind"] == "encoder" and report.model_kind["changed"] == []
    assert report.model_kind["applied"] == {"target_ratio": 8.0, "scale_kind": "float8e5m2", "budget_floor": False}
    assert report.config["target_ratio"] == 8.0 and report.config["scale_kind"] == "float8e5m2"
    assert report.budget is not None and report.budget["target_ratio"] == 8.0
    assert "defaults for an encoder: target_ratio 8.0, scale_kind float8e5m2" in report.summary()
    assert "budget: target 8x:" in report.summary()
    _, report = bct_onnx.compress(decoder(), calibration="none")
    assert report.model_kind["kind"] == "decoder" and report.model_kind["applied"] == {} and report.budget is None
    assert "defaults for" not in report.summary()
    _, report = bct_onnx.compress(encoder(), config=CompressConfig(), calibration="none")
    assert report.model_kind["applied"] == {} and report.config["target_ratio"] is None
    _, report = bct_onnx.compress(encoder(), calibration="none", kind_defaults=False)
    assert report.model_kind["applied"] == {} and report.config["target_ratio"] is None


# The bound of tests/passes/test_families_e2e.py (every float output's cosine to FP32), which the
# encoder defaults must keep on every seed family's encoder graph.
MIN_FAMILY_COSINE = 0.97


@pytest.mark.parametrize("name", [n for n, f in families.FAMILIES.items() if f.kind != "decoder"])
def test_encoder_defaults_keep_the_family_bounds(name, tmp_path):
    graphs = [p for p in families.export_tiny(name, tmp_path, with_past=False) if p.name in ("model.onnx", "encoder_model.onnx")]
    assert graphs, f"{name}: no encoder graph exported"
    for path in graphs:
        out = tmp_path / f"{path.stem}.bct.onnx"
        _, report = bct_onnx.compress(path, out)
        assert report.model_kind["kind"] == "encoder" and report.config["scale_kind"] == "float8e5m2"
        feeds = families.dummy_inputs(path)
        reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in reference.get_outputs()]
        for output, a, b in zip(names, reference.run(names, feeds), bct_onnx.session(out).run(names, feeds)):
            if a.dtype.kind == "f" and a.size:
                a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
                cosine = a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64))
                assert cosine >= MIN_FAMILY_COSINE, f"{name} {path.name} {output}: cosine {cosine:.4f}"
