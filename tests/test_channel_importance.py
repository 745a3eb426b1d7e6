"""Measured input-channel importance (a diagonal Hessian on random token ids): the data-free default of decoders."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
from bct_onnx.passes import QuantizeMatMulPass
from bct_onnx.passes.quantize_matmul import RULE_GPTQ, RULE_IMPORTANCE

import bct_onnx
from bct_onnx.block_format import dequantize
from bct_onnx.calibration import Calibration
from bct_onnx.channel_importance import (
    IMPORTANCE_FLOOR,
    IMPORTANCE_LENGTH,
    IMPORTANCE_METHOD,
    IMPORTANCE_SEQUENCES,
    ImportanceCalibration,
    collect_channel_importance,
    normalized_importance,
    random_token_importance,
)
from bct_onnx.config import CompressConfig
from bct_onnx.weight_quantizer import quantize_tensor

V, D = 48, 64
RNG = np.random.default_rng(5)
TABLE = RNG.standard_normal((V, D)).astype(np.float32)
TABLE[:, ::16] *= 30.0  # four loud channels, as a decoder's residual stream has
W_MID = RNG.standard_normal((D, D)).astype(np.float32)
W_HEAD = RNG.standard_normal((D, V)).astype(np.float32)


def decoder() -> ir.Model:
    """Embedding -> MatMul -> output over the vocabulary: a decoder to bct-onnx (logits [N, S, V])."""
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"g (int64[N, S] input_ids) => (float[N, S, {V}] logits) {{\n"
        "  e = Gather(table, input_ids)\n  h = MatMul(e, w_mid)\n  logits = MatMul(h, w_head)\n}"
    )
    proto = onnx.parser.parse_model(text)
    for name, array in {"table": TABLE, "w_mid": W_MID, "w_head": W_HEAD}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def test_normalized_importance_has_mean_one_a_floor_and_a_uniform_fallback():
    got = normalized_importance(np.array([0.0, 1.0, 3.0, 4.0]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [IMPORTANCE_FLOOR, 0.5, 1.5, 2.0])
    np.testing.assert_array_equal(normalized_importance(np.zeros(3)), np.ones(3, np.float32))
    np.testing.assert_array_equal(normalized_importance(np.array([np.nan, 1.0])), np.ones(2, np.float32))


def test_collected_importance_is_the_mean_square_of_each_input_channel():
    model = decoder()
    calibration = random_token_importance(model)
    assert isinstance(calibration, ImportanceCalibration) and isinstance(calibration, Calibration)
    assert len(calibration.feeds) == IMPORTANCE_SEQUENCES
    assert calibration.feeds[0]["input_ids"].shape == (1, IMPORTANCE_LENGTH)
    got = collect_channel_importance(model, calibration)
    ids = np.concatenate([f["input_ids"].reshape(-1) for f in calibration.feeds])
    e = TABLE[ids].astype(np.float64)
    h = e @ W_MID
    expected_mid = normalized_importance((e * e).mean(0))
    expected_head = normalized_importance((h * h).mean(0))
    assert set(got) == {("e", "w_mid"), ("h", "w_head")}
    np.testing.assert_allclose(got[("e", "w_mid")], expected_mid, rtol=1e-4)
    np.testing.assert_allclose(got[("h", "w_head")], expected_head, rtol=1e-4)
    assert got[("e", "w_mid")][::16].min() > 100 * np.median(got[("e", "w_mid")])  # the loud channels


def test_quantize_matmul_pass_weighs_the_scale_search_by_the_given_importance():
    model = decoder()
    importance = normalized_importance(np.where(np.arange(D) % 16 == 0, 900.0, 1.0))
    config = CompressConfig(act_bits=None)
    result = QuantizeMatMulPass(config, importances={("e", "w_mid"): importance})(model)
    assert result.rewritten == {"MatMul": 2, RULE_IMPORTANCE: 1}
    node = next(n for n in result.model.graph if n.op_type == "BlockMatMul" and n.inputs[0].name == "e")
    expected = quantize_tensor(W_MID.T, config.weight_format, importance=importance)
    plain = quantize_tensor(W_MID.T, config.weight_format)
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), expected.codes)
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), expected.scales)
    assert not np.array_equal(expected.scales, plain.scales)
    # The output error on inputs with those loud channels goes down.
    x = TABLE[RNG.integers(0, V, 512)]
    exact = x @ W_MID
    err_aware = np.square(x @ dequantize(expected).T - exact).mean()
    err_plain = np.square(x @ dequantize(plain).T - exact).mean()
    assert err_aware < err_plain


def test_importance_of_the_wrong_length_or_with_a_hessian_is_not_used():
    config = CompressConfig(act_bits=None)
    wrong = QuantizeMatMulPass(config, importances={("e", "w_mid"): np.ones(D + 1, np.float32)})(decoder())
    assert RULE_IMPORTANCE not in wrong.rewritten
    hessian = np.eye(D, dtype=np.float32)
    both = QuantizeMatMulPass(
        config, hessians={("e", "w_mid"): hessian}, importances={("e", "w_mid"): np.ones(D, np.float32)}
    )(decoder())
    assert both.rewritten.get(RULE_GPTQ) == 1 and RULE_IMPORTANCE not in both.rewritten


def test_a_decoder_without_tokenizer_gets_channel_importance_and_the_report_says_so():
    result = bct_onnx.compress(decoder(), ops=frozenset({"MatMul"}), act_bits=None)
    report = result.report.calibration
    assert report["method"] == IMPORTANCE_METHOD
    assert "random token ids" in report["source"] and "data-free" in report["source"]
    assert report["tokens"] == IMPORTANCE_SEQUENCES * IMPORTANCE_LENGTH
    assert result.report.rules.get(RULE_IMPORTANCE) == 2 and RULE_GPTQ not in result.report.rules
    summary = result.report.summary()
    assert "channel importance (data-free)" in summary and "--tokenizer" in summary
    explicit = bct_onnx.compress(decoder(), ops=frozenset({"MatMul"}), act_bits=None, calibration="data-free")
    assert explicit.report.calibration["method"] == IMPORTANCE_METHOD
    plain = bct_onnx.compress(decoder(), ops=frozenset({"MatMul"}), act_bits=None, calibration="none")
    assert plain.report.calibration["method"] == "none" and RULE_IMPORTANCE not in plain.report.rules


def test_given_importance_calibration_is_reported_as_such():
    model = decoder()
    given = random_token_importance(model, seed=3)
    result = bct_onnx.compress(model, ops=frozenset({"MatMul"}), act_bits=None, calibration=given)
    assert result.report.calibration == {"method": IMPORTANCE_METHOD, "batches": IMPORTANCE_SEQUENCES, "source": "given inputs"}
    assert result.report.rules.get(RULE_IMPORTANCE) == 2


def test_a_budget_keeps_its_own_data_free_path():
    result = bct_onnx.compress(decoder(), ops=frozenset({"MatMul"}), act_bits=None, target_ratio=3.0)
    assert result.report.calibration["method"] == "none"


def test_cli_data_free_ignores_a_tokenizer_beside_the_model(tmp_path, capsys):
    from bct_onnx import cli

    path = tmp_path / "model.onnx"
    ir.save(decoder(), path)
    (tmp_path / "tokenizer.json").write_text("{}")  # found beside the model, but never read
    report_path = tmp_path / "r.json"
    argv = ["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--ops", "MatMul", "--act-bits", "none", "-q"]
    code = cli.main([*argv, "--calibration", "data-free", "--report", str(report_path)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["calibration"]["method"] == IMPORTANCE_METHOD
    assert report["rules"][RULE_IMPORTANCE] == 2
