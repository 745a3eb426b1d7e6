"""Finds the compiled custom-op library and opens ONNX Runtime sessions with it registered."""

from __future__ import annotations

import importlib.resources
import os
import weakref
from pathlib import Path
from typing import Any

import onnxruntime as ort

LIBRARY_ENV = "BCT_ONNX_LIBRARY"  # overrides the packaged library (development builds)
LIBRARY_NAME = "libbct_onnx_ops.so"
MIN_ORT_VERSION = (1, 21)  # the C API version the library is built against


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

    Every session bct-onnx opens comes from here. providers defaults to the CPU provider; asking for
    CUDAExecutionProvider where onnxruntime-gpu finds no GPU falls back to the CPU kernels (ONNX
    Runtime's own provider fallback). with_library=False: a plain float model (no custom ops needed).
    threads, quiet: see session_options.
    """
    options = session_options(sess_options, threads=threads, with_library=with_library, quiet=quiet)
    if providers is None:
        providers = ["CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers)
