"""The op library under AddressSanitizer and UndefinedBehaviorSanitizer: a debug build (CMake option
BCT_SANITIZE=address,undefined, -O1, every UB check fatal) runs the kernel fuzzer's seed set and a set of
the op tests, on every CPU path they force. Python is not sanitized, so libasan is preloaded and leak
detection is off (the interpreter's own allocations are not ours).

Takes a few minutes (the build is most of it); BCT_SANITIZE_BUILD_DIR keeps the build between runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bct_onnx.ops import OP_TYPES

REPO = Path(__file__).resolve().parents[2]
# Seeds cycle over ops x the 4 CPU paths: twice round = every op on every path twice (the unsanitized CI set
# runs 400; sanitized kernels run about 3x slower, and the suite keeps near 10 minutes).
FUZZ_SEEDS = 2 * len(OP_TYPES) * 4
# The op tests run under the sanitizers, in one pytest process (each start under ASan costs seconds):
# file -> -k selection (None: all of it). Kept: every test that forces a CPU path, the edge cases
# (sizes, partial and oversized blocks, empty, non-finite, magnitudes, bad inputs and attributes, the
# fast and parallel paths). Left to the kernel fuzzer (FUZZ_SEEDS), which draws them on every path: the value sweeps
# over bits x block size x scale kind on the default path (`matches_spec`, `of_quantize`).
OP_TESTS: dict[str, str | None] = {
    "test_errors.py": None,
    # every path with the byte-straddling 3- and 5-bit codes and the 4-bit nibbles (2 and 8 bits: fuzzer)
    "test_block_quantize.py": "not matches_spec and not isa_paths[2- and not isa_paths[8-",
    "test_block_gather.py": "not matches_spec or float16-True-4-5-33 or float32-False-3-8-37",
    "test_act_matmul.py": "not cuda",
    "test_block_dequantize.py": "fast_paths or bad or rank1 or extreme or picks_kind or float32_offsets"
    " or b4-bs5-asym-float32 or b3-bs8-asym-float32",
    "test_matmul.py": "exact_block_sizes or empty or non_finite or magnitudes or beyond or bad or ranks_and_rows"
    " or exact_k_below",
    "test_nonlinear.py": "empty or nan or inf or bad or error or edge",
}

# At least the tests of that selection that force no SIMD path (213) pass on any x86-64: a selection
# that matches (nearly) nothing fails instead of passing quietly.
MIN_OP_TESTS_RUN = 200


def op_test_selection() -> str:
    """One -k expression for every file of OP_TESTS (a test's keywords include its module's file name)."""
    return " or ".join(f"({name} and ({select}))" if select else f"({name})" for name, select in OP_TESTS.items())


REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


def _runtime(name: str) -> str | None:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=False).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("BCT_SKIP_SANITIZERS"):
        pytest.skip("BCT_SKIP_SANITIZERS is set")
    if shutil.which("cmake") is None or _runtime("libasan.so") is None or _runtime("libstdc++.so") is None:
        pytest.skip("no cmake or no libasan.so of the C++ compiler: the sanitized build is not possible here")
    build = Path(os.environ.get("BCT_SANITIZE_BUILD_DIR") or tmp_path_factory.mktemp("asan_build"))
    configure = [
        "cmake", "-S", str(REPO / "runtime_ops"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Debug",
        "-DBCT_WITH_CUDA=OFF", "-DBCT_SANITIZE=address,undefined", "-DBCT_BUILD_TEST_HELPERS=OFF",
        # Warnings stay warnings here: at -O1 with the sanitizers GCC 12 flags its own AVX-512 header
        # (_mm512_undefined_ps in avx512fintrin.h) as -Wuninitialized; CI's release build keeps BCT_WERROR.
        "-DBCT_WERROR=OFF",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"] if not (build / "CMakeCache.txt").exists() else []
    for command in (configure, ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    library = build / "libbct_onnx_ops.so"
    assert library.is_file()
    return library


def _sanitized_env(library: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BCT_ONNX_ISA", None)
    env.update(
        # libstdc++ too: Python does not link it, and ASan's __cxa_throw interceptor needs it at start-up
        # (else "CHECK failed: real___cxa_throw != 0" at the first C++ exception).
        LD_PRELOAD=f"{_runtime('libasan.so')}:{_runtime('libstdc++.so')}",
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98",
        BCT_ONNX_LIBRARY=str(library),
    )
    return env


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    output = done.stdout + done.stderr
    reports = [line for line in output.splitlines() if any(r in line for r in REPORTS)]
    assert not reports and done.returncode == 0, (
        f"{what}: exit {done.returncode}\n" + "\n".join(reports[:20]) + "\n" + output[-4000:]
    )


def test_library_is_sanitized(sanitized_library: Path, tmp_path: Path) -> None:
    """The build really is instrumented, and the preloaded runtime reports a bad access (so a clean run
    below means something)."""
    import json

    info = json.loads((sanitized_library.parent / "build_info.json").read_text())
    assert info["sanitize"] == "address,undefined"
    needed = subprocess.run(["ldd", str(sanitized_library)], capture_output=True, text=True, check=False).stdout
    assert "libasan" in needed and "libubsan" in needed, needed
    probe = "import ctypes; b = ctypes.create_string_buffer(8); ctypes.memset(ctypes.addressof(b), 0, 8)"
    done = subprocess.run([sys.executable, "-c", probe], env=_sanitized_env(sanitized_library), cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kernel_fuzzer_under_sanitizers(sanitized_library: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fuzz_ops.py"), "--seeds", str(FUZZ_SEEDS)],
        env=_sanitized_env(sanitized_library), cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    _check(done, "tools/fuzz_ops.py under ASan/UBSan")


def test_op_tests_under_sanitizers(sanitized_library: Path) -> None:
    args = [f"tests/runtime_ops/{name}" for name in OP_TESTS] + ["-k", op_test_selection()]
    done = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
        env=_sanitized_env(sanitized_library), cwd=REPO, capture_output=True, text=True, check=False,  # -P: not the source tree
    )
    _check(done, f"pytest {' '.join(args)} under ASan/UBSan")
    ran = re.search(r"(\d+) passed", done.stdout)
    assert ran is not None and int(ran.group(1)) >= MIN_OP_TESTS_RUN, done.stdout[-2000:]
