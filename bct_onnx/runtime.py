"""Finds the compiled custom-op library and opens ONNX Runtime sessions with it registered."""

from __future__ import annotations

import ctypes
import importlib.resources
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import onnxruntime as ort

LIBRARY_ENV = "BCT_ONNX_LIBRARY"  # overrides the packaged library (development builds)
LIBRARY_NAME = "libbct_onnx_ops.so"
MIN_ORT_VERSION = (1, 21)  # the C API version the library is built against
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

logger = logging.getLogger(__name__)


# SessionOptions that already carry our library: ONNX Runtime refuses a second registration of
# the same domain on one options object ("Domain already set in registry").
_REGISTERED: weakref.WeakSet[Any] = weakref.WeakSet()


class LibraryNotFoundError(FileNotFoundError):
    """The custom-op library is neither where BCT_ONNX_LIBRARY says nor inside the package."""


def _candidates() -> list[Path]:
    found: list[Path] = []
    override = os.environ.get(LIBRARY_ENV)
    if override:
        found.append(Path(override))
    package = importlib.resources.files("bct_onnx")
    found.append(Path(str(package / "_lib" / LIBRARY_NAME)))
    return found


def library_path() -> str:
    """Absolute path of the custom-op library to pass to SessionOptions.register_custom_ops_library."""
    candidates = _candidates()
    if os.environ.get(LIBRARY_ENV):
        # An explicit override that does not exist is an error, not a silent fallback.
        if not candidates[0].is_file():
            raise LibraryNotFoundError(f"{LIBRARY_ENV}={candidates[0]} does not name a file")
        return str(candidates[0].resolve())
    for path in candidates:
        if path.is_file():
            return str(path.resolve())
    looked = ", ".join(str(p) for p in candidates)
    raise LibraryNotFoundError(
        f"bct-onnx custom-op library {LIBRARY_NAME} not found (looked at: {looked}). "
        "Install the package with `pip install .` so the library is built, or set "
        f"{LIBRARY_ENV} to a built copy."
    )


def check_onnxruntime_version() -> None:
    """Refuse an onnxruntime older than the C API the library needs, with a clear message."""
    parts = []
    for piece in ort.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < MIN_ORT_VERSION:
        need = ".".join(map(str, MIN_ORT_VERSION))
        raise RuntimeError(f"bct-onnx needs onnxruntime >= {need}; this is onnxruntime {ort.__version__}")


def session_options(
    sess_options: Any = None, *, threads: int | None = None, with_library: bool = True, quiet: bool = False
) -> Any:
    """SessionOptions (given or new) with the custom-op library registered (unless with_library is False).

    threads: intra-op threads (inter-op 1); default ONNX Runtime's (all cores). quiet: log errors only.
    """
    options = sess_options if sess_options is not None else ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if quiet:
        options.log_severity_level = 3
    if with_library and options not in _REGISTERED:
        check_onnxruntime_version()
        options.register_custom_ops_library(library_path())
        _REGISTERED.add(options)
    return options


def cuda_devices() -> tuple[int, str]:
    """(number of CUDA GPUs the NVIDIA driver sees, why none when 0), asked through libcuda's C API.

    Cheap and safe without a GPU: no driver library means 0. CUDA_VISIBLE_DEVICES is honoured by
    the driver itself.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    status = driver.cuInit(0)
    if status != 0:
        return 0, f"the NVIDIA driver found no usable GPU (cuInit error {status})"
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no GPU"
    return count.value, ""


def default_providers() -> list[str]:
    """Execution providers for a compressed model on this machine: CUDA first when it can run, CPU last.

    CUDA is chosen when onnxruntime is the onnxruntime-gpu build (``BCT_ONNX_RUNTIME=gpu pip install .``)
    and a GPU is visible; the library's ops then run on CUDA where it has CUDA kernels, on CPU
    otherwise. The choice and its reason are logged once per process (INFO; WARNING when
    onnxruntime-gpu is installed but no GPU can be used).
    """
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        _log_once(
            logging.INFO,
            f"bct-onnx: running on {CPU_PROVIDER}: onnxruntime {ort.__version__} has no {CUDA_PROVIDER} "
            "(install with BCT_ONNX_RUNTIME=gpu for onnxruntime-gpu)",
        )
        return [CPU_PROVIDER]
    gpus, reason = cuda_devices()
    if gpus == 0:
        _log_once(logging.WARNING, f"bct-onnx: falling back to {CPU_PROVIDER}: {CUDA_PROVIDER} is installed but {reason}")
        return [CPU_PROVIDER]
    plural = "s" if gpus > 1 else ""
    _log_once(logging.INFO, f"bct-onnx: running on {CUDA_PROVIDER} ({gpus} GPU{plural}), {CPU_PROVIDER} as fallback")
    return [CUDA_PROVIDER, CPU_PROVIDER]


_LOGGED: set[str] = set()  # provider messages already logged: every session asks, one line is enough


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def session(
    model: str | os.PathLike[str] | bytes,
    providers: list[Any] | None = None,
    sess_options: Any = None,
    *,
    threads: int | None = None,
    with_library: bool = True,
    quiet: bool = False,
) -> Any:
    """An onnxruntime.InferenceSession for a model file or serialized bytes, with our ops registered.

    Every session bct-onnx opens comes from here. providers defaults to ``default_providers()``:
    CUDA with onnxruntime-gpu and a visible GPU, CPU otherwise; a requested CUDA provider that ONNX
    Runtime could not start is logged as a warning (ONNX Runtime then runs everything on CPU).
    with_library=False: a plain float model (no custom ops needed). threads, quiet: see session_options.
    """
    options = session_options(sess_options, threads=threads, with_library=with_library, quiet=quiet)
    if providers is None:
        providers = default_providers()
    source = model if isinstance(model, bytes) else os.fspath(model)
    created = ort.InferenceSession(source, sess_options=options, providers=providers)
    wanted = [p if isinstance(p, str) else p[0] for p in providers]
    if CUDA_PROVIDER in wanted and CUDA_PROVIDER not in created.get_providers():
        logger.warning("bct-onnx: %s could not start; the session runs on %s", CUDA_PROVIDER, created.get_providers())
    return created
