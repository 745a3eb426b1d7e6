"""Per-op-kind and per-node control: CompressConfig.settings_for, config files, CLI strings."""

from __future__ import annotations

import numpy as np
import pytest
from bct_onnx.passes import compress_model
from support import model_from_text, op_types

from bct_onnx.config import SUPPORTED_OPS, CompressConfig, NodeOverride, OpSettings
from bct_onnx.config_file import (
    ConfigFileError,
    apply_controls,
    load_config_file,
    parse_op_bits,
    parse_override,
)

ZEROQUANT = """
weight_bits = 4
act_bits = 8
[op.Gelu]
act_bits = 6
block_size = 64
[[override]]
pattern = "*attention*"
op = "MatMul"
weight_bits = 8
[[override]]
pattern = "re:^/lm_head/"
act_bits = "none"
"""


def test_everything_is_compressed_by_default():
    config = CompressConfig()
    assert config.ops == SUPPORTED_OPS
    assert all(config.enabled(kind) for kind in SUPPORTED_OPS)


def test_settings_resolve_kind_then_overrides_in_order(tmp_path):
    path = tmp_path / "zq.toml"
    path.write_text(ZEROQUANT)
    config = load_config_file(path)
    assert config.settings_for("MatMul", "/layer.0/attention/q/MatMul").weight_bits == 8
    assert config.settings_for("MatMul", "/layer.0/mlp/fc1/MatMul").weight_bits == 4
    assert config.settings_for("Softmax", "/layer.0/attention/Softmax").weight_bits == 4  # op= restricts
    gelu = config.settings_for("Gelu", "/layer.0/mlp/act/Mul_1")
    assert (gelu.act_bits, gelu.block_size) == (6, 64)
    assert config.settings_for("MatMul", "/lm_head/MatMul").act_bits is None
    later = CompressConfig(
        overrides=(
            NodeOverride("*", OpSettings(weight_bits=3)),
            NodeOverride("*mlp*", OpSettings(weight_bits=5)),
        )
    )
    assert later.settings_for("MatMul", "/mlp/fc").weight_bits == 5
    assert later.settings_for("MatMul", "/attn/q").weight_bits == 3


def test_yaml_config(tmp_path):  # PyYAML is in the test extra
    path = tmp_path / "c.yaml"
    path.write_text(
        "weight_bits: 8\nop:\n  Softmax:\n    enabled: false\noverride:\n  - pattern: '*q_proj*'\n    weight_bits: 4\n"
    )
    config = load_config_file(path)
    assert config.weight_bits == 8 and not config.settings_for("Softmax", "s").enabled
    assert config.settings_for("MatMul", "/a/q_proj/MatMul").weight_bits == 4


@pytest.mark.parametrize(
    "text,message",
    [
        ("bogus = 1\n", "key 'bogus': unknown key (value 1)"),
        ("[op.Gelu]\nact_bits = 9\n", "key 'op.Gelu.act_bits': 9: act_bits must be an integer in [2, 8]"),
        ("[op.Gelux]\nact_bits = 8\n", "key 'op.Gelux': 'Gelux' is not an op kind"),
        ("[op.Gelu]\nbits = 8\n", "key 'op.Gelu.bits': unknown key (value 8)"),
        ("[[override]]\nweight_bits = 8\n", "key 'override[0]': {'weight_bits': 8} needs a 'pattern'"),
        (
            "[[override]]\npattern = 're:('\n",
            "key 'override[0].pattern': override pattern 're:(' is not a valid regex",
        ),
        ("[op.MatMul]\nenabled = 'maybe'\n", "key 'op.MatMul.enabled': 'maybe' is not true/false"),
        ("weight_bits = 1\n", "weight_bits must be an integer in [2, 8], got 1"),
        ('symmetric = false\nzero_points = "fraction"\n', "zero_points must be one of integer, packed, float"),
        ('zero_points = "float"\n', "zero_points='float' (float offsets) applies to asymmetric weights"),
        ("weight_bits = ", "not valid TOML"),
    ],
)
def test_bad_files_name_file_key_and_value(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as error:
        load_config_file(path)
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)


def test_cli_strings():
    assert parse_op_bits("Gelu=8, MatMul=3,Softmax=off") == {
        "Gelu": OpSettings(act_bits=8),
        "MatMul": OpSettings(weight_bits=3),
        "Softmax": OpSettings(enabled=False),
    }
    override = parse_override("re:layer\\.1/.*:block_size=64,op=MatMul")
    assert override == NodeOverride("re:layer\\.1/.*", OpSettings(block_size=64), "MatMul")
    assert parse_override("*:act_bits=none").act_bits_none
    config = apply_controls(CompressConfig(), ["Gelu=5"], ["*x*:weight_bits=6"])
    assert (
        config.settings_for("Gelu", "g").act_bits == 5 and config.settings_for("MatMul", "x").weight_bits == 6
    )
    for bad, message in [
        ("Gelu", "is not KIND=BITS"),
        ("Gelu=12", "act_bits must be an integer in [2, 8]"),
        ("Relu=4", "'Relu' is not an op kind"),
    ]:
        with pytest.raises(ConfigFileError, match="--op-bits") as error:
            parse_op_bits(bad)
        assert message in str(error.value)
    with pytest.raises(ConfigFileError, match="is not PATTERN:key=value"):
        parse_override("weight_bits=8")
    with pytest.raises(ConfigFileError, match="unknown key"):
        parse_override("*:bits=8")


def test_overrides_reach_the_nodes():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 64] x) => (float[2, 64] y) {
      a = MatMul(x, w1)
      y = MatMul(a, w2)
    }"""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.standard_normal((64, 64)).astype(np.float32),
        "w2": rng.standard_normal((64, 64)).astype(np.float32),
    }
    config = apply_controls(
        CompressConfig(), ["MatMul=4"], ["y:weight_bits=8,act_bits=none", "a:block_size=16"]
    )
    result = compress_model(model_from_text(text, inits), config)
    first, second = list(result.model.graph)
    assert (first.attributes["bits"].as_int(), first.attributes["block_size"].as_int()) == (4, 16)
    assert first.attributes["act_bits"].as_int() == 8
    assert (second.attributes["bits"].as_int(), second.attributes["act_bits"].as_int()) == (8, 0)
    off = compress_model(
        model_from_text(text, inits), apply_controls(CompressConfig(), [], ["y:enabled=false"])
    )
    assert op_types(off.model) == ["BlockMatMul", "MatMul"]
    assert [s.reason for s in off.skipped] == ["MatMul compression is disabled for this node by the config"]


def test_zero_points_key_reaches_weight_and_table_formats(tmp_path):
    """zero_points = "float" (with symmetric = false): float offsets for MatMul weights and Gather tables."""
    path = tmp_path / "offsets.toml"
    path.write_text('symmetric = false\nzero_points = "float"\nembedding_scale_kind = "pow2"\n')
    config = load_config_file(path)
    assert config.weight_format.float_offsets and config.embedding_format.float_offsets
    assert config.settings_for("MatMul", "/x/MatMul").weight_format.zero_point_dtype == np.float16
    assert config.settings_for("Gather", "/emb/Gather").weight_format.zero_point_dtype == np.float16
    assert not CompressConfig(symmetric=False).weight_format.float_offsets  # integer zero points by default
    f32 = CompressConfig(symmetric=False, zero_points="float", scale_kind="float32")
    assert f32.weight_format.zero_point_dtype == np.float32


def test_config_file_switches_the_rotation_on(tmp_path):
    path = tmp_path / "rotate.toml"
    path.write_text("rotation = true\n", encoding="utf-8")
    assert load_config_file(path).rotation is True
