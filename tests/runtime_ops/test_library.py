"""The library itself: registration, exported symbols, the old-runtime guard, build_info.json, CUDA."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import bct_onnx
from bct_onnx.block_format import BlockFormat, ScaleKind, dequantize, quantize

FMT = BlockFormat(4, 8, False, ScaleKind.FLOAT16)


def _build_info() -> dict:
    path = Path(bct_onnx.library_path()).with_name("build_info.json")
    assert path.is_file(), f"build_info.json missing next to {bct_onnx.library_path()}"
    return json.loads(path.read_text())


def test_register_twice_in_one_process(kit) -> None:
    """Two SessionOptions, each registering the library, both sessions usable (also interleaved)."""
    x = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    model = kit.quantize_model(FMT)
    first = bct_onnx.session(model)
    second = bct_onnx.session(model)
    want = quantize(x, FMT)
    for sess in (first, second, first):
        codes, scales, zero_points = sess.run(None, {"x": x})
        kit.assert_bits_equal(codes, want.codes, "codes")
        kit.assert_bits_equal(scales, want.scales, "scales")
        kit.assert_bits_equal(zero_points, want.zero_points, "zero_points")
    del first
    third = bct_onnx.session(model)  # the domain outlives released sessions
    kit.assert_bits_equal(third.run(None, {"x": x})[0], want.codes, "codes after a session was released")


def test_one_options_object_for_two_sessions(kit) -> None:
    options = bct_onnx.runtime.session_options()
    model = kit.quantize_model(FMT)
    x = np.ones((1, 8), np.float32)
    for _ in range(2):
        sess = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        assert sess.run(None, {"x": x})[0].shape == (1, 4)


def test_only_register_custom_ops_is_exported() -> None:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed: cannot list the dynamic symbols")
    out = subprocess.run(
        [nm, "-D", "--defined-only", bct_onnx.library_path()], capture_output=True, text=True, check=True
    ).stdout
    names = sorted({line.split()[-1] for line in out.splitlines() if line.strip()})
    assert names == ["RegisterCustomOps"], names


def test_old_runtime_is_refused_with_a_clear_error() -> None:
    """A runtime whose GetApi(21) answers NULL gets a status naming both versions, not a crash.

    The fake OrtApiBase answers only API version 20 with an OrtApi whose first member, CreateStatus,
    records the message (OrtApi's first member is CreateStatus in every version).
    """
    messages: list[str] = []
    create_status_t = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p)

    @create_status_t
    def create_status(code, message):
        messages.append(message.decode())
        return 0xB0C7  # an opaque non-NULL "status"

    class FakeApi(ctypes.Structure):
        _fields_ = [("CreateStatus", create_status_t)]

    fake_api = FakeApi(create_status)
    get_api_t = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_uint32)
    get_version_t = ctypes.CFUNCTYPE(ctypes.c_size_t)  # const char*; a size_t avoids ctypes' leak warning
    version_text = ctypes.create_string_buffer(b"1.20.9")

    @get_api_t
    def get_api(version):
        return ctypes.addressof(fake_api) if version == 20 else 0

    @get_version_t
    def get_version():
        return ctypes.addressof(version_text)

    class FakeApiBase(ctypes.Structure):
        _fields_ = [("GetApi", get_api_t), ("GetVersionString", get_version_t)]

    base = FakeApiBase(get_api, get_version)
    lib = ctypes.CDLL(bct_onnx.library_path())
    lib.RegisterCustomOps.restype = ctypes.c_void_p
    lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    status = lib.RegisterCustomOps(None, ctypes.addressof(base))
    assert status == 0xB0C7
    assert len(messages) == 1
    assert "C API version 21" in messages[0] and "onnxruntime 1.20.9" in messages[0], messages[0]


def test_build_info() -> None:
    info = _build_info()
    assert info["ort_api_version"] == 21
    assert isinstance(info["simd"], list)
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_architectures"], info


def test_cuda_variant_built_where_nvcc_exists() -> None:
    """In CI (nvcc on PATH) the CUDA kernels must have been compiled in."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: this build is allowed to be CPU-only")
    info = _build_info()
    assert info["cuda"] is True, f"nvcc is on PATH but the library was built without CUDA: {info}"


def _cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_available(), reason="no CUDAExecutionProvider (onnxruntime-gpu and a GPU) here")
def test_cuda_kernels_match_spec(kit) -> None:
    if not _build_info()["cuda"]:
        pytest.skip("library built without CUDA kernels")
    cuda = ["CUDAExecutionProvider"]
    rng = np.random.default_rng(11)
    for fmt in (FMT, BlockFormat(3, 5, True, ScaleKind.POW2), BlockFormat(8, 32, True, ScaleKind.FLOAT32)):
        x = rng.standard_normal((7, 45)).astype(np.float32)
        want = quantize(x, fmt)
        got = kit.run(kit.quantize_model(fmt), {"x": x}, providers=cuda)
        kit.assert_bits_equal(got[0], want.codes, "codes")
        kit.assert_bits_equal(got[1], want.scales, "scales")
        if not fmt.symmetric:
            kit.assert_bits_equal(got[2], want.zero_points, "zero_points")
        feeds = {"codes": want.codes, "scales": want.scales}
        if not fmt.symmetric:
            feeds["zero_points"] = want.zero_points
        (y,) = kit.run(kit.dequantize_model(fmt, 45), feeds, providers=cuda)
        kit.assert_bits_equal(y, dequantize(want), "y")
        indices = np.array([[0, -1], [3, 3]], np.int64)
        (g,) = kit.run(kit.gather_model(fmt, 45, want), {"indices": indices}, providers=cuda)
        kit.assert_bits_equal(g, dequantize(want)[indices], "gathered")


def test_baseline_simd_paths_match_spec() -> None:
    """The SSE2 row loops (used where AVX2 / AVX-512 are missing) are checked by rerunning the row tests in a
    process that sets BCT_ONNX_BASELINE_SIMD (read once when the library loads). BCT_ONNX_BASELINE_SIMD wins
    over BCT_ONNX_ISA, so there the tests that force an AVX path run the baseline path of their [scalar]
    case once more: they are left out (-k "not avx"), their [scalar] cases run."""
    import os
    import sys

    here = Path(__file__).parent
    env = dict(os.environ, BCT_ONNX_BASELINE_SIMD="1", BCT_ONNX_LIBRARY=bct_onnx.library_path())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "--import-mode=importlib",
            str(here / "test_block_dequantize.py"),
            str(here / "test_block_gather.py"),
            str(here / "test_block_quantize.py"),
            "-k",
            "not avx",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=here,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "deselected" in result.stdout and " passed" in result.stdout, result.stdout[-3000:]
