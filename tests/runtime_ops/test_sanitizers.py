"""The op library under AddressSanitizer and UndefinedBehaviorSanitizer: a debug build (CMake option
BCT_SANITIZE=address,undefined, -O1, every UB check fatal) runs the kernel fuzzer's seed set and a set of
the op tests, on every CPU path they force. Python is not sanitized, so libasan is preloaded and leak
detection is off (the interpreter's own allocations are not ours).

The steps (tests/sanitized_ops.py: build, fuzzer, op tests) take a few minutes of CPU, the build most of
it; a run that collects this file starts them at its beginning in a background process at nice 19
(tests/conftest.py), so they use the core the rest of the suite leaves idle, and the tests below wait for
their results. BCT_SANITIZE_BUILD_DIR keeps the build between runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sanitized_ops import MIN_OP_TESTS_RUN, OP_TESTS, STASH, Steps, sanitized_env, unavailable

REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module")
def sanitized_steps(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Steps:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    started = request.config.stash.get(STASH, None)
    if started is not None:
        return started
    import os

    return Steps(None, None, Path(os.environ.get("BCT_SANITIZE_BUILD_DIR") or tmp_path_factory.mktemp("asan_build")))


def _check(result: dict[str, Any], what: str) -> None:
    output = result["stdout"] + result["stderr"]
    reports = [line for line in output.splitlines() if any(r in line for r in REPORTS)]
    assert not reports and result["returncode"] == 0, (
        f"{what}: exit {result['returncode']}\n" + "\n".join(reports[:20]) + "\n" + output[-4000:]
    )


@pytest.fixture(scope="module")
def sanitized_library(sanitized_steps: Steps) -> Path:
    built = sanitized_steps.result("build")
    assert built["returncode"] == 0, (
        f"{' '.join(built['command'])} failed:\n{built['stdout'][-3000:]}\n{built['stderr'][-3000:]}"
    )
    library = Path(built["library"])
    assert library.is_file()
    return library


def test_library_is_sanitized(sanitized_library: Path, tmp_path: Path) -> None:
    """The build really is instrumented, and the preloaded runtime reports a bad access (so a clean run
    below means something)."""
    info = json.loads((sanitized_library.parent / "build_info.json").read_text())
    assert info["sanitize"] == "address,undefined"
    needed = subprocess.run(["ldd", str(sanitized_library)], capture_output=True, text=True, check=False).stdout
    assert "libasan" in needed and "libubsan" in needed, needed
    probe = "import ctypes; b = ctypes.create_string_buffer(8); ctypes.memset(ctypes.addressof(b), 0, 8)"
    done = subprocess.run([sys.executable, "-c", probe], env=sanitized_env(sanitized_library), cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kernel_fuzzer_under_sanitizers(sanitized_library: Path, sanitized_steps: Steps) -> None:
    _check(sanitized_steps.result("fuzz"), "tools/fuzz_ops.py under ASan/UBSan")


def test_op_tests_under_sanitizers(sanitized_library: Path, sanitized_steps: Steps) -> None:
    result = sanitized_steps.result("op_tests")
    _check(result, f"pytest {' '.join(result['command'][3:])} under ASan/UBSan")
    ran = re.search(r"(\d+) passed", result["stdout"])
    assert ran is not None and int(ran.group(1)) >= MIN_OP_TESTS_RUN, result["stdout"][-2000:]
    assert set(OP_TESTS) <= {Path(arg).name for arg in result["command"]}
