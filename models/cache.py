"""Where bct_onnx.models keeps what it builds or fetches once (dequantized models, Debian text)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Cache root: $BCT_ONNX_CACHE, else ~/.cache/bct_onnx."""
    configured = os.environ.get("BCT_ONNX_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "bct_onnx"
