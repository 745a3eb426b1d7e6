"""The HTML report opened in a real headless browser (Debian's Chromium): every chart renders
(plotly draws its SVGs) and the page logs nothing to the console (no JavaScript error)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

import bct_onnx
from bct_onnx.calibration import Calibration

from .conftest import mlp_ids, save_word_level_tokenizer

pytest.importorskip("plotly", reason="the [report] extra (plotly) is not installed")

from bct_onnx.html_report import CHART_IDS

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0",
    "--virtual-time-budget=15000",
)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing and possible, else a visible skip."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    warnings.warn("chromium is missing: installing it with apt-get (Debian package chromium)", stacklevel=1)
    done = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or shutil.which("chromium") is None:
        pytest.skip(f"chromium is not installed and apt-get install chromium failed: {done.stderr.strip()[-300:]}")
    return str(shutil.which("chromium"))


def render(chromium: str, page: Path, profile: Path) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console messages of the page)."""
    done = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line and page.name in line]
    return done.stdout, console


def test_console_check_catches_a_script_error(chromium: str, tmp_path: Path) -> None:
    """The check below can fail: a page whose script throws shows up in the console lines."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>not_defined_anywhere();</script></body></html>", encoding="utf-8")
    _, console = render(chromium, page, tmp_path / "profile")
    assert any("Uncaught ReferenceError: not_defined_anywhere is not defined" in line for line in console), console


def test_html_report_renders_without_errors(chromium: str, tmp_path: Path, mlp_path: Path) -> None:
    page = tmp_path / "report.html"
    calibration = Calibration(({"ids": mlp_ids()},))
    result = bct_onnx.compress(mlp_path, tmp_path / "out.onnx", calibration=calibration, html_report=page)

    text = page.read_text(encoding="utf-8")
    assert "<script src=" not in text  # self-contained: plotly.js is inlined, nothing is fetched
    data = _page_data(page)
    assert data["report"]["output_bytes"] == result.report.output_bytes
    assert [e["source"] for e in data["analysis"]["weight_errors"]] == ["embedding", "w1", "w2"]
    assert [e["output"] for e in data["analysis"]["output_errors"]] == ["emb", "hb", "y"]

    dom, console = render(chromium, page, tmp_path / "profile")
    assert console == []
    for chart_id in CHART_IDS:
        # plotly adds js-plotly-plot to a div it has drawn into, and draws its SVG inside.
        match = re.search(rf'<div id="{chart_id}" class="[^"]*js-plotly-plot[^"]*"', dom)
        assert match is not None, f"chart {chart_id} was not drawn"
        following = dom[match.end():]
        next_chart = min((following.find(f'id="{c}"') for c in CHART_IDS if f'id="{c}"' in following), default=len(following))
        assert 'class="main-svg"' in following[:next_chart], f"chart {chart_id} has no SVG"
    assert dom.count('class="trace bars"') >= 5  # bar traces of the size, error and bits charts


def test_html_report_without_plotly_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mlp_path: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def no_plotly(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("plotly"):
            raise ImportError("No module named 'plotly'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_plotly)
    with pytest.raises(bct_onnx.errors.BctOnnxError, match=r"pip install 'bct-onnx\[report\]'"):
        bct_onnx.compress(mlp_path, tmp_path / "out.onnx", calibration="none", html_report=tmp_path / "r.html")
    assert not (tmp_path / "out.onnx").exists()  # failed before compressing


def test_axis_labels_are_unique_across_layers() -> None:
    from bct_onnx.html_report import _labels

    nodes = ["/enc/layer.0/attn/q/MatMul", "/enc/layer.1/attn/q/MatMul", "/embed/words/Gather"]
    assert _labels(nodes, ["layer 0", "layer 1", "outside layers"]) == [
        "layer 0: attn/q/MatMul", "layer 1: attn/q/MatMul", "embed/words/Gather"
    ]


def test_output_error_is_measured_on_text_even_without_gptq(tmp_path: Path) -> None:
    """--calibration none still measures the output error, on the text GPTQ would have used."""
    pytest.importorskip("transformers", reason="exporting the tiny BERT needs the [hf] extra")
    from bct_onnx.models.families import export_tiny

    (exported,) = export_tiny("bert", tmp_path / "bert", with_past=False)
    save_word_level_tokenizer(exported.parent)
    page = tmp_path / "report.html"
    result = bct_onnx.compress(exported, tmp_path / "out.onnx", calibration="none", html_report=page)
    assert result.report.calibration["method"] == "none"
    data = _page_data(page)
    assert data["analysis"]["output_error_note"] == "measured on 2 batch(es) of shipped calibration text"
    errors = data["analysis"]["output_errors"]
    assert {e["op_type"] for e in errors} >= {"BlockMatMul", "BlockGather", "BlockLayerNorm"}
    assert all(0 <= e["relative_error"] < 1 for e in errors)
    assert {e["layer"] for e in errors} == {"outside layers", "layer 0", "layer 1"}


def _page_data(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="bct-data">(.*?)</script>', text, re.DOTALL)
    assert found is not None
    return json.loads(found.group(1))
