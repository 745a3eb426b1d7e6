"""`bct-onnx compress` with the deployment flags: -o DIR/, --html, a Hub id, a JSONL calibration file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bct_onnx import cli

from .conftest import save_word_level_tokenizer


def test_compress_into_a_directory_with_an_html_report(
    tmp_path: Path, mlp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("plotly", reason="the [report] extra (plotly) is not installed")
    from bct_onnx.html_report import CHART_IDS

    html = tmp_path / "report.html"
    status = cli.main(["compress", str(mlp_path), "-o", f"{tmp_path}/out/", "--html", str(html), "-q"])
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]
    assert capsys.readouterr().out.splitlines()[-1] == f"html report: {html}"
    page = html.read_text(encoding="utf-8")
    assert all(f'id="{chart_id}"' in page for chart_id in CHART_IDS)


def test_uncached_hub_id_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("huggingface_hub", reason="the [hf] extra is not installed")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = cli.main(["compress", "tiny-org/absent", "-o", str(tmp_path / "out.onnx"), "-q"])
    assert status == 1
    assert capsys.readouterr().err == (
        f"bct-onnx: error: 'tiny-org/absent' is neither a local path nor cached in the Hugging Face cache "
        f"{tmp_path / 'hub'} (HF_HUB_OFFLINE is set, so nothing is downloaded)\n"
    )


def test_bad_jsonl_calibration_file_is_one_line_error(
    tmp_path: Path, mlp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --calibration text the file is read; a record without "text" names file and line."""
    pytest.importorskip("transformers", reason="text calibration needs the [hf] extra")

    save_word_level_tokenizer(tmp_path / "tok")
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"text": "w1 w2 w3"}) + "\n" + json.dumps({"txt": "w4"}) + "\n", encoding="utf-8")
    status = cli.main([
        "compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), "--calibration", "text",
        "--tokenizer", str(tmp_path / "tok"), "--calibration-text", str(calib), "-q",
    ])
    assert status == 1
    assert capsys.readouterr().err == f'bct-onnx: error: {calib}:2: a record needs a string field "text"\n'
