"""`bct-onnx compress` never loses a file and answers every bad start with one line (issue 11).

Each test runs the command in its own interpreter, as a user would: the report naming the input or a
FIFO, and ^C or SIGTERM while the command is still importing its modules.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import fuzz_cli
import pytest


def _bct_onnx(*args: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m bct_onnx ARGS``, after running ``prelude`` (Python) in the same interpreter."""
    code = f"import sys\n{prelude}\nimport runpy\nsys.argv = ['bct-onnx', *sys.argv[1:]]\nrunpy.run_module('bct_onnx', run_name='__main__')"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
        stdin=subprocess.DEVNULL,
    )


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bct-onnx: error: "), done.stderr
    return lines[0]


def test_report_naming_the_input_is_refused_and_the_input_kept(tmp_path: Path) -> None:
    model = fuzz_cli._save(fuzz_cli.base_model(), tmp_path / "in.onnx")
    original = model.read_bytes()
    done = _bct_onnx("compress", str(model), "-o", str(tmp_path / "out.onnx"), "--report", str(model), "-q", cwd=tmp_path)
    assert done.returncode == 1
    assert f"refusing to overwrite the input: report {model} would replace {model}" in _one_error_line(done)
    assert model.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_report_naming_the_input_data_file_is_refused(tmp_path: Path) -> None:
    model = fuzz_cli._save_external(fuzz_cli.base_model(), tmp_path / "in.onnx")
    data = tmp_path / "in.onnx.data"
    original = data.read_bytes()
    done = _bct_onnx("compress", str(model), "-o", str(tmp_path / "out.onnx"), "--report", str(data), "-q", cwd=tmp_path)
    assert done.returncode == 1
    assert "refusing to overwrite the input: report" in _one_error_line(done)
    assert data.read_bytes() == original


def test_report_naming_a_fifo_is_refused_and_the_fifo_kept(tmp_path: Path) -> None:
    model = fuzz_cli._save(fuzz_cli.base_model(), tmp_path / "in.onnx")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = _bct_onnx("compress", str(model), "-o", str(tmp_path / "out.onnx"), "--report", str(fifo), "-q", cwd=tmp_path)
    assert done.returncode == 1
    assert f"report {fifo} is a FIFO, not a regular file; refusing to replace it" in _one_error_line(done)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert not (tmp_path / "out.onnx").exists()


# A finder that delivers a signal to the process when the command first imports onnx: the moment
# a ^C or a SIGTERM lands during start-up, made deterministic.
_SIGNAL_ON_IMPORT = """
import os, signal
class _SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "onnx":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{signal})
        return None
sys.meta_path.insert(0, _SignalOnImport())
"""


@pytest.mark.parametrize(
    ("signal_name", "status", "line"), [("SIGINT", 130, "bct-onnx: interrupted"), ("SIGTERM", 143, "bct-onnx: terminated")]
)
def test_signal_during_start_up_is_one_line(tmp_path: Path, signal_name: str, status: int, line: str) -> None:
    model = fuzz_cli._save(fuzz_cli.base_model(), tmp_path / "in.onnx")
    done = _bct_onnx(
        "compress", str(model), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path,
        prelude=_SIGNAL_ON_IMPORT.format(signal=signal_name),
    )
    assert (done.returncode, done.stderr) == (status, f"{line}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_report_naming_the_output_is_refused(tmp_path: Path) -> None:
    model = fuzz_cli._save(fuzz_cli.base_model(), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    done = _bct_onnx("compress", str(model), "-o", str(out), "--report", str(out), "-q", cwd=tmp_path)
    assert done.returncode == 1
    assert f"report {out} is where the output model goes" in _one_error_line(done)
    assert not out.exists()
