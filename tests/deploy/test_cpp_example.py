"""examples/cpp: builds the C++ program against the onnxruntime wheel's libonnxruntime, runs a
compressed model with the library registered through the C++ API, and compares every printed
value with the same model run from Python."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import bct_onnx

from .conftest import mlp_ids

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "cpp"


def _ort_library() -> str:
    found = sorted(glob.glob(os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime.so.*")))
    if not found:
        pytest.skip(f"the onnxruntime package at {os.path.dirname(ort.__file__)} ships no libonnxruntime.so.*")
    return found[0]


def _ort_headers() -> list[str]:
    """-DORT_INCLUDE_DIR when headers are already here (env, or the project's pip build tree);
    otherwise the example's CMake fetches them as the project's build does."""
    candidates = [os.environ.get("ORT_INCLUDE_DIR", "")]
    candidates += sorted(glob.glob(str(REPO / "build" / "*" / "_ort_headers" / "root" / "usr" / "include" / "onnxruntime")))
    for candidate in candidates:
        if candidate and (Path(candidate) / "onnxruntime_cxx_api.h").is_file():
            return [f"-DORT_INCLUDE_DIR={candidate}"]
    return []


def _parse(stdout: str) -> dict[str, np.ndarray]:
    lines = stdout.splitlines()
    outputs: dict[str, np.ndarray] = {}
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        _, name, dims = header.split(" ")
        shape = tuple(int(d) for d in dims.strip("[]").split(","))
        outputs[name] = np.array([float(v) for v in values.split()], dtype=np.float32).reshape(shape)
    return outputs


@pytest.fixture(scope="module")
def bct_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example program, configured and built once for this module."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' and no '.join(missing)} on PATH: the C++ example cannot be built here")
    build = tmp_path_factory.mktemp("cpp_example")
    configure = ["cmake", "-S", str(EXAMPLE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DORT_LIBRARY={_ort_library()}", *_ort_headers()]
    for command in (configure, ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build / "bct_run"


def test_cpp_example_matches_python(bct_run: Path, compressed_mlp: Path) -> None:
    ids = mlp_ids(batch=2, seq=5)
    run = subprocess.run([str(bct_run), str(compressed_mlp), bct_onnx.library_path(), "2", "5"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    from_cpp = _parse(run.stdout)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the C++ program
    session = bct_onnx.session(compressed_mlp, providers=["CPUExecutionProvider"], sess_options=options)
    from_python = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"ids": ids}), strict=True))
    assert list(from_cpp) == ["y"]
    assert from_cpp["y"].shape == (2, 5, 32)
    # The same library and runtime on the same input: the values agree exactly (%.9g round-trips float32).
    np.testing.assert_array_equal(from_cpp["y"], from_python["y"])


def test_cpp_example_reports_a_missing_library(bct_run: Path, tmp_path: Path, compressed_mlp: Path) -> None:
    """A library that cannot be loaded comes back as one line and status 1, not a crash."""
    run = subprocess.run([str(bct_run), str(compressed_mlp), str(tmp_path / "nope.so")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.startswith("bct_run: ") and "nope.so" in run.stderr


def test_cpp_example_runs_every_op_family(bct_run: Path, tmp_path: Path) -> None:
    """A tiny BERT compressed with the defaults (attention MatMuls, Softmax, LayerNorm, GELU too)."""
    pytest.importorskip("transformers", reason="exporting the tiny BERT needs the [hf] extra")
    from bct_onnx.models.families import export_tiny

    (exported,) = export_tiny("bert", tmp_path / "bert", with_past=False)
    compressed = tmp_path / "bert.bct.onnx"
    bct_onnx.compress(exported, compressed, calibration="none")
    run = subprocess.run([str(bct_run), str(compressed), bct_onnx.library_path(), "2", "5"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    from_cpp = _parse(run.stdout)

    ids = ((np.arange(10, dtype=np.int64) * 13 + 1) % 100).reshape(2, 5)  # as bct_run fills input_ids
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = bct_onnx.session(compressed, providers=["CPUExecutionProvider"], sess_options=options)
    names = [o.name for o in session.get_outputs()]
    from_python = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    assert list(from_cpp) == names
    for name, expected in zip(names, from_python, strict=True):
        np.testing.assert_array_equal(from_cpp[name], expected, err_msg=name)
