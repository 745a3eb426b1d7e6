"""Execution provider choice for compressed models: CUDA only where it can run, CPU otherwise,
each choice logged with its reason. This machine has no GPU: the CUDA case is simulated."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import bct_onnx
from bct_onnx import runtime

from .conftest import mlp_ids


@pytest.fixture(autouse=True)
def fresh_provider_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the provider choice logged (it is logged once per process)."""
    monkeypatch.setattr(runtime, "_LOGGED", set())


def test_cpu_build_runs_on_cpu_and_says_why(compressed_mlp: Path, caplog: pytest.LogCaptureFixture) -> None:
    if runtime.CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: the CPU-build case cannot be checked")
    with caplog.at_level(logging.INFO, logger="bct_onnx.runtime"):
        session = bct_onnx.session(compressed_mlp)  # providers chosen by default_providers()
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "has no CUDAExecutionProvider (install with BCT_ONNX_RUNTIME=gpu for onnxruntime-gpu)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bct_onnx.runtime"):
        assert bct_onnx.default_providers() == ["CPUExecutionProvider"]
    assert caplog.text == ""  # once per process, not once per session


def test_gpu_build_without_gpu_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime-gpu installed (simulated) on a machine whose driver sees no GPU (real check)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA_PROVIDER, runtime.CPU_PROVIDER])
    gpus, reason = runtime.cuda_devices()
    if gpus:
        pytest.skip("a GPU is visible here: the no-GPU fallback cannot be checked")
    with caplog.at_level(logging.INFO, logger="bct_onnx.runtime"):
        assert bct_onnx.default_providers() == ["CPUExecutionProvider"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (
        f"bct-onnx: falling back to CPUExecutionProvider: CUDAExecutionProvider is installed but {reason}"
    )


def test_gpu_build_with_gpu_puts_cuda_first(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA_PROVIDER, runtime.CPU_PROVIDER])
    monkeypatch.setattr(runtime, "cuda_devices", lambda: (2, ""))
    with caplog.at_level(logging.INFO, logger="bct_onnx.runtime"):
        assert bct_onnx.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "running on CUDAExecutionProvider (2 GPUs), CPUExecutionProvider as fallback" in caplog.text


def test_session_asked_for_cuda_without_it_runs_on_cpu(compressed_mlp: Path, caplog: pytest.LogCaptureFixture) -> None:
    if runtime.CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with caplog.at_level(logging.WARNING, logger="bct_onnx.runtime"):
        session = bct_onnx.session(compressed_mlp, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider could not start; the session runs on ['CPUExecutionProvider']" in caplog.text
    expected = bct_onnx.session(compressed_mlp, providers=["CPUExecutionProvider"]).run(None, {"ids": mlp_ids()})[0]
    np.testing.assert_array_equal(session.run(None, {"ids": mlp_ids()})[0], expected)
