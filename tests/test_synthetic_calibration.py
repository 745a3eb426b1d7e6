"""Data-free calibration: token ids made up from the model file alone, and the API's use of them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

import bct_onnx
from bct_onnx.calibration import CalibrationError
from bct_onnx.synthetic_calibration import (
    SYNTHETIC_DAMPING,
    SyntheticSettings,
    data_free_calibration,
    decoder_logits_output,
    random_token_calibration,
    self_generated_calibration,
    vocabulary_size,
)

V, D = 40, 32
RNG = np.random.default_rng(11)
TABLE = RNG.standard_normal((V, D)).astype(np.float32)
W_OUT = RNG.standard_normal((D, D)).astype(np.float32)
W_HEAD = (3 * RNG.standard_normal((D, V))).astype(np.float32)


def model(text_body: str, outputs: str, inputs: str = "int64[N, S] input_ids, int64[N, S] attention_mask") -> ir.Model:
    text = f'<ir_version: 8, opset_import: ["" : 17]>\ng ({inputs}) => ({outputs}) {{{text_body}}}'
    proto = onnx.parser.parse_model(text)
    for name, array in {"table": TABLE, "w_out": W_OUT, "w_head": W_HEAD}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def encoder() -> ir.Model:
    return model("  e = Gather(table, input_ids)\n  hidden = MatMul(e, w_out)\n", f"float[N, S, {D}] hidden")


def decoder() -> ir.Model:
    """A bigram model: logits at position t depend on token t only."""
    return model("  e = Gather(table, input_ids)\n  logits = MatMul(e, w_head)\n", f"float[N, S, {V}] logits")


def test_vocabulary_size_and_decoder_output():
    assert vocabulary_size(encoder()) == V
    assert decoder_logits_output(encoder(), V) is None
    assert decoder_logits_output(decoder(), V) == "logits"


def test_no_input_ids_is_a_clear_error():
    m = model("  e = Gather(table, ids)\n  hidden = MatMul(e, w_out)\n", f"float[N, S, {D}] hidden", "int64[N, S] ids")
    with pytest.raises(CalibrationError, match="no graph input named input_ids"):
        vocabulary_size(m)


def test_random_token_feeds_follow_the_graph_inputs():
    calibration = random_token_calibration(encoder(), SyntheticSettings(sequences=10, length=6, batch_size=4))
    assert calibration.damping == SYNTHETIC_DAMPING
    assert [batch["input_ids"].shape for batch in calibration.feeds] == [(4, 6), (4, 6), (2, 6)]
    for batch in calibration.feeds:
        assert sorted(batch) == ["attention_mask", "input_ids"]
        assert batch["input_ids"].dtype == np.int64 and 0 <= batch["input_ids"].min() <= batch["input_ids"].max() < V
        np.testing.assert_array_equal(batch["attention_mask"], np.ones((len(batch["input_ids"]), 6)))
    again = random_token_calibration(encoder(), SyntheticSettings(sequences=10, length=6, batch_size=4))
    np.testing.assert_array_equal(again.feeds[0]["input_ids"], calibration.feeds[0]["input_ids"])  # seeded


def test_fixed_input_dims_are_respected():
    m = model("  e = Gather(table, input_ids)\n  hidden = MatMul(e, w_out)\n", f"float[3, 5, {D}] hidden", "int64[3, 5] input_ids")
    calibration = random_token_calibration(m, SyntheticSettings(sequences=6, length=32))
    assert [batch["input_ids"].shape for batch in calibration.feeds] == [(3, 5), (3, 5)]


def test_unknown_input_is_named():
    m = model(
        "  e = Gather(table, input_ids)\n  h = MatMul(e, w_out)\n  hidden = Add(h, extra)\n",
        f"float[N, S, {D}] hidden",
        f"int64[N, S] input_ids, float[N, S, {D}] extra",
    )
    with pytest.raises(CalibrationError, match="'extra'"):
        random_token_calibration(m)


def test_self_generated_greedy_sequences_are_the_models_own():
    m = decoder()
    settings = SyntheticSettings(sequences=3, length=6, batch_size=3, rounds=6, top_k=1)
    (batch,) = self_generated_calibration(m, settings).feeds
    ids = batch["input_ids"]
    following = np.argmax(TABLE @ W_HEAD, axis=-1)  # the bigram model's greedy next token
    np.testing.assert_array_equal(ids[:, 1:], following[ids[:, :-1]])


def test_data_free_choice_per_model_kind():
    calibration, description = data_free_calibration(encoder())
    assert calibration is not None and description.startswith("random token ids")
    calibration, description = data_free_calibration(decoder())
    assert calibration is None and "decoder" in description


def test_compress_without_tokenizer_calibrates_an_encoder_on_random_ids():
    result = bct_onnx.compress(encoder(), ops=frozenset({"MatMul"}), act_bits=None)
    report = result.report.calibration
    assert report["method"] == "gptq" and report["damping"] == SYNTHETIC_DAMPING
    assert "random token ids" in report["source"] and "data-free" in report["source"]
    assert "--tokenizer" in result.report.summary()
    assert result.report.rules.get("MatMul weight rounded by GPTQ (calibrated)") == 1


def test_compress_without_tokenizer_gives_a_decoder_no_gptq_and_says_why():
    # No GPTQ for a decoder; its scale search is weighted by channel importance (tests/test_channel_importance.py).
    result = bct_onnx.compress(decoder(), ops=frozenset({"MatMul"}), act_bits=None)
    report = result.report.calibration
    assert report["method"] == "channel-importance" and "decoder" in report["reason"]
    assert "--tokenizer" in report["tokenizer_would_add"]
    assert "MatMul weight rounded by GPTQ (calibrated)" not in result.report.rules


def test_external_data_model_calibrates_from_any_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(
        ir.to_proto(encoder()), folder / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = bct_onnx.compress(folder / "m.onnx", ops=frozenset({"MatMul"}), act_bits=None)
    assert result.report.calibration["method"] == "gptq"
    assert result.report.rules.get("MatMul weight rounded by GPTQ (calibrated)") == 1
