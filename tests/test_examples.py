"""Every numbered example under examples/ runs (in a subprocess, writing into a temporary directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED = {  # a line each example must print: what it demonstrates happened
    "01_compress_and_run": "ratio ",
    "02_inspect": "would rewrite: MatMul 2",
    "03_standard_onnx_qdq": "plain onnxruntime: ratio",
    "04_one_pass_in_your_pipeline": "graphsurgeon round trip identical: True",
}


def test_every_example_folder_is_listed():
    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and p.name[:2].isdigit())
    assert folders == sorted(EXPECTED)
    for name in folders:
        assert (EXAMPLES / name / "README.md").is_file()
        assert name in (EXAMPLES / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name, tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name / "example.py"), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert EXPECTED[name] in done.stdout, done.stdout[-3000:]
