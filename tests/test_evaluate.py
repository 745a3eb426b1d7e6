"""bct_onnx.evaluate without the real model: greedy decoding with and without KV cache agree on a tiny
Llama, text calibration feeds a decoder an empty KV cache, and the CLI names a missing model/tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bct_onnx.models.families import export_tiny

from bct_onnx import cli, evaluate
from bct_onnx.calibration import text_feeds


def _decoder(path: Path) -> evaluate.GreedyDecoder:
    return evaluate.GreedyDecoder(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))


def test_kv_cache_and_recompute_decode_the_same_tokens(tmp_path: Path) -> None:
    (plain,) = export_tiny("llama", tmp_path / "plain", with_past=False)
    (past,) = export_tiny("llama", tmp_path / "past", with_past=True)
    prompt = np.array([5, 17, 99, 3, 42, 7], dtype=np.int64)
    recomputed = _decoder(plain)
    cached = _decoder(past)
    assert not recomputed.uses_cache and cached.uses_cache
    expected = recomputed.generate(prompt, 12, eos=None)
    assert len(expected) == 12
    assert cached.generate(prompt, 12, eos=None) == expected


class _NoPadTokenizer:
    pad_token = None

    def __call__(self, texts, padding=False, truncation=True, max_length=128, return_tensors="np"):
        assert not padding
        ids = np.array([[1 + len(w) for w in t.split()][:max_length] for t in texts], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_decoder_calibration_feeds_an_empty_kv_cache(tmp_path: Path) -> None:
    (past,) = export_tiny("llama", tmp_path, with_past=True)
    calibration = text_feeds(ir.load(past), _NoPadTokenizer())
    inputs = {i.name for i in onnx.load(str(past), load_external_data=False).graph.input}
    session = ort.InferenceSession(str(past), providers=["CPUExecutionProvider"])
    for feeds in calibration.feeds[:3]:
        assert set(feeds) == inputs
        assert all(v.shape[2] == 0 for k, v in feeds.items() if k.startswith("past_key_values"))
        session.run(None, dict(feeds))


def test_cli_names_a_missing_model_and_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", str(tmp_path / "nothing.onnx")]) == 1
    assert "model not found" in capsys.readouterr().err
    (plain,) = export_tiny("llama", tmp_path / "t", with_past=False)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    model = lonely / "model.onnx"
    model.write_bytes(plain.read_bytes())
    assert cli.main(["eval", str(model)]) == 1
    assert "--tokenizer" in capsys.readouterr().err


def test_calibration_text_that_overlaps_the_evaluation_text_is_refused(tmp_path: Path) -> None:
    novel = " ".join(f"w{i % 5000}x{i // 5000}" for i in range(20000))
    copied = tmp_path / "copied.txt"
    copied.write_text(novel[: len(novel) // 3], encoding="utf-8")
    with pytest.raises(evaluate.EvalError, match="overlaps the evaluation text"):
        evaluate._check_no_overlap(novel, str(copied))
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"v{i}" for i in range(5000)), encoding="utf-8")
    evaluate._check_no_overlap(novel, str(other))
    evaluate._check_no_overlap(novel, "shipped")


def test_perplexity_through_the_kv_cache_equals_the_no_cache_path(tmp_path: Path) -> None:
    (plain,) = export_tiny("llama", tmp_path / "plain", with_past=False)
    (past,) = export_tiny("llama", tmp_path / "past", with_past=True)
    ids = np.random.default_rng(2).integers(0, 200, 40)
    whole, _ = evaluate.fp32_perplexity(plain, tmp_path, ids, "test", 16, 8, use_cache=False)
    for step in (1, 3):
        cached, _ = evaluate.fp32_perplexity(past, tmp_path, ids, "test", 16, 8, use_cache=False, kv_step=step)
        assert cached == pytest.approx(whole, rel=1e-5)
