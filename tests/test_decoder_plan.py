"""Defaults by kind of model: decoders (an output over the vocabulary) get config.DECODER_*, encoders not."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

import bct_onnx
from bct_onnx.block_format import ScaleKind, ZeroPointKind, unpack_zero_points
from bct_onnx.calibration import Calibration
from bct_onnx.config import (
    DECODER_GPTQ_SCALE_KIND,
    DECODER_SCALE_KIND,
    DECODER_TIED_TABLE_EXTRA_BITS,
    DECODER_TIED_TABLE_ZERO_POINTS,
    DECODER_WIDER_WEIGHTS,
    CompressConfig,
    NodeOverride,
    OpSettings,
)
from bct_onnx.model_defaults import ModelKind, apply_decoder_plan, model_kind

V, D = 64, 32
RNG = np.random.default_rng(5)
ARRAYS = {
    "table": RNG.standard_normal((V, D)).astype(np.float32),
    "w_mid": RNG.standard_normal((D, D)).astype(np.float32),
}


V_PROJ = "/model/layers.0/self_attn/v_proj/MatMul"  # optimum's name of a Llama value projection


def _model(body: str, outputs: str, mid_name: str = "") -> ir.Model:
    text = f'<ir_version: 8, opset_import: ["" : 17]>\ng (int64[N, S] input_ids) => ({outputs}) {{{body}}}'
    proto = onnx.parser.parse_model(text)
    proto.graph.node[1].name = mid_name
    for name, array in ARRAYS.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def tied_decoder(mid_name: str = "") -> ir.Model:
    """Embedding table tied to the output projection (read through a Transpose), as optimum exports it."""
    return _model(
        "  e = Gather <axis = 0> (table, input_ids)\n  h = MatMul(e, w_mid)\n"
        "  table_t = Transpose <perm = [1, 0]> (table)\n  logits = MatMul(h, table_t)\n",
        f"float[N, S, {V}] logits",
        mid_name,
    )


def encoder() -> ir.Model:
    return _model("  e = Gather <axis = 0> (table, input_ids)\n  h = MatMul(e, w_mid)\n", f"float[N, S, {D}] h")


def _table_settings(config: CompressConfig, model: ir.Model) -> dict[str, object]:
    """Settings of every node reading the table, by op kind."""
    settings = {}
    for node in model.graph:
        if node.op_type == "Gather":
            settings["Gather"] = config.settings_for("Gather", node.name or node.outputs[0].name)
        if node.op_type == "MatMul" and node.inputs[1].name == "table_t":
            settings["MatMul"] = config.settings_for("MatMul", node.name or node.outputs[0].name)
    return settings


def _table_bits(config: CompressConfig, model: ir.Model) -> dict[str, int]:
    """Weight bits of every node reading the table, by op kind."""
    return {kind: settings.weight_bits for kind, settings in _table_settings(config, model).items()}


def test_kind_is_decided_by_an_output_over_the_vocabulary():
    assert model_kind(tied_decoder()) is ModelKind.DECODER
    assert model_kind(encoder()) is ModelKind.ENCODER


def test_decoder_gets_one_byte_scales_and_a_wider_tied_table():
    model = tied_decoder()
    config, note = apply_decoder_plan(model, CompressConfig())
    assert config.scale_kind is DECODER_SCALE_KIND
    wide = 4 + DECODER_TIED_TABLE_EXTRA_BITS
    assert _table_bits(config, model) == {"Gather": wide, "MatMul": wide}
    # the other weight keeps the configured width
    mid = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name == "w_mid")
    assert config.settings_for("MatMul", mid.name or mid.outputs[0].name).weight_bits == 4
    assert note["kind"] == ModelKind.DECODER.value
    assert DECODER_TIED_TABLE_ZERO_POINTS is ZeroPointKind.PACKED
    for settings in _table_settings(config, model).values():  # asymmetric, zero points packed
        assert not settings.symmetric and settings.weight_format.packed_zero_points
    assert config.settings_for("MatMul", mid.name or mid.outputs[0].name).symmetric
    assert note["changed"] == [
        f"weight scales {DECODER_SCALE_KIND.value}",
        f"table: {wide}-bit, packed integer zero points",
    ]


def test_gptq_rounded_decoder_gets_the_gptq_scale_kind():
    model = tied_decoder()
    config, note = apply_decoder_plan(model, CompressConfig(), gptq=True)
    assert DECODER_GPTQ_SCALE_KIND is not DECODER_SCALE_KIND
    assert config.scale_kind is DECODER_GPTQ_SCALE_KIND
    assert note["changed"][0] == f"weight scales {DECODER_GPTQ_SCALE_KIND.value}"
    assert apply_decoder_plan(model, CompressConfig(scale_kind="pow2"), gptq=True)[0].scale_kind is ScaleKind.POW2


def test_compress_picks_the_scale_kind_by_calibration_method(tmp_path):
    """GPTQ-rounded weights (here: the caller's calibration inputs) get DECODER_GPTQ_SCALE_KIND, plain
    rounding DECODER_SCALE_KIND; the tied table is stored once in the MatMul's kind either way."""
    model_path = tmp_path / "decoder.onnx"
    ir.save(tied_decoder(), model_path)
    feeds = Calibration(({"input_ids": np.random.default_rng(0).integers(0, V, (2, 16)).astype(np.int64)},))
    for calibration, kind in ((feeds, DECODER_GPTQ_SCALE_KIND), ("none", DECODER_SCALE_KIND)):
        result = bct_onnx.compress(model_path, tmp_path / "out.onnx", calibration=calibration)
        assert result.report.config["scale_kind"] == kind.value, calibration
        assert f"weight scales {kind.value}" in result.report.model_kind["changed"]
        compressed = onnx.load(tmp_path / "out.onnx")
        assert len([t for t in compressed.graph.initializer if t.name.startswith("table.") and t.name.endswith(".codes")]) == 1
        ids = np.array([[1, 5, 63, 0]], np.int64)
        (logits,) = bct_onnx.session(tmp_path / "out.onnx").run(None, {"input_ids": ids})
        assert np.isfinite(logits).all()


def test_8_bit_tied_table_stays_symmetric():
    model = tied_decoder()
    config, note = apply_decoder_plan(model, CompressConfig(weight_bits=8))
    assert {(s.weight_bits, s.symmetric) for s in _table_settings(config, model).values()} == {(8, True)}
    assert "table: 8-bit" in note["changed"]


def test_decoder_widens_the_weights_its_rules_name():
    model = tied_decoder(V_PROJ)
    config, note = apply_decoder_plan(model, CompressConfig())
    extra = next(bits for pattern, bits in DECODER_WIDER_WEIGHTS if pattern in V_PROJ)
    assert config.settings_for("MatMul", V_PROJ).weight_bits == 4 + extra
    assert f"w_mid: {4 + extra}-bit" in note["changed"]


def test_encoder_off_switch_budget_and_explicit_choices_are_left_alone():
    assert apply_decoder_plan(encoder(), CompressConfig())[0] == CompressConfig()
    for config in (CompressConfig(kind_defaults=False), CompressConfig(target_ratio=6.0), CompressConfig(symmetric=False)):
        assert apply_decoder_plan(tied_decoder(), config)[0] is config
    model = tied_decoder()
    explicit, _ = apply_decoder_plan(model, CompressConfig(scale_kind="pow2", embedding_bits=8))
    assert explicit.scale_kind is ScaleKind.POW2
    assert _table_bits(explicit, model) == {"Gather": 8, "MatMul": 4}
    pinned_config = CompressConfig(overrides=(NodeOverride("*", OpSettings(weight_bits=6), op="MatMul"),))
    pinned, _ = apply_decoder_plan(model, pinned_config)
    assert pinned.overrides == pinned_config.overrides  # the user's override already sets the table's width


def test_compressed_decoder_stores_the_tied_table_once_at_the_wider_width(tmp_path):
    model_path = tmp_path / "decoder.onnx"
    ir.save(tied_decoder(), model_path)
    out = tmp_path / "out.onnx"
    result = bct_onnx.compress(model_path, out, calibration="none")
    assert result.report.model_kind["kind"] == ModelKind.DECODER.value
    compressed = onnx.load(out)
    table_codes = [t for t in compressed.graph.initializer if t.name.startswith("table.") and t.name.endswith(".codes")]
    assert len(table_codes) == 1  # shared by the Gather and the output projection
    wide = 4 + DECODER_TIED_TABLE_EXTRA_BITS
    assert tuple(table_codes[0].dims) == (V, D * wide // 8)
    readers = [n for n in compressed.graph.node if any(name.startswith("table") for name in n.input[1:])]
    assert {n.op_type for n in readers} == {"BlockGather", "BlockMatMul"}
    for node in readers:
        attrs = {a.name: a.i for a in node.attribute}
        assert (attrs["bits"], attrs["symmetric"], attrs["zero_points_packed"]) == (wide, 0, 1)
    zero_points = next(t for t in compressed.graph.initializer if t.name.startswith("table.") and t.name.endswith(".zero_points"))
    blocks = V * -(-D // 32)
    assert tuple(zero_points.dims) == (-(-blocks * wide // 8),)  # one stream at the code width
    stored = onnx.numpy_helper.to_array(zero_points)
    assert unpack_zero_points(stored, wide, (V, -(-D // 32))).max() < 1 << wide
    # the session unpacks them: the compressed decoder runs
    ids = np.array([[1, 5, 63, 0]], np.int64)
    (logits,) = bct_onnx.session(out).run(None, {"input_ids": ids})
    assert logits.shape == (1, 4, V) and np.isfinite(logits).all()
    assert "decoder defaults" in result.report.summary()


def test_tied_table_block_size_and_asymmetric_weights_of_the_plan(monkeypatch):
    from bct_onnx import model_defaults

    monkeypatch.setattr(model_defaults, "DECODER_TIED_TABLE_BLOCK_SIZE", 16)
    monkeypatch.setattr(model_defaults, "DECODER_ASYMMETRIC_WEIGHTS", (r"/up_proj/",))
    up = "/model/layers.0/mlp/up_proj/MatMul"
    model = tied_decoder(mid_name=up)
    config, note = apply_decoder_plan(model, CompressConfig())
    table = _table_settings(config, model)
    assert {s.block_size for s in table.values()} == {16}
    assert {s.symmetric for s in table.values()} == {False}
    mid = config.settings_for("MatMul", up)
    assert (mid.weight_bits, mid.symmetric, mid.zero_points) == (4, False, ZeroPointKind.PACKED)
    assert mid.block_size == CompressConfig().block_size
    assert any("w_mid: 4-bit, packed integer zero points" in c for c in note["changed"])
    assert any("blocks of 16" in c for c in note["changed"])


def test_by_default_only_the_tied_table_is_asymmetric_in_the_configs_blocks():
    up = "/model/layers.0/mlp/up_proj/MatMul"
    model = tied_decoder(mid_name=up)
    config, _ = apply_decoder_plan(model, CompressConfig())
    assert config.settings_for("MatMul", up).symmetric is True
    assert {s.block_size for s in _table_settings(config, model).values()} == {CompressConfig().block_size}
