"""The sanitized op library's steps for tests/runtime_ops/test_sanitizers.py, and their background run.

The steps: build the library under AddressSanitizer and UndefinedBehaviorSanitizer (CMake option
BCT_SANITIZE=address,undefined, a debug build at -O1), run the kernel fuzzer's seed set and then a set of
the op tests with it. They are subprocesses that need nothing from the pytest process, and they take
minutes of CPU (the build is most of it), most of it on one core while the rest of the suite, which runs
on the other core for most of its time, leaves that core idle. So when a run collects
test_sanitizers.py, tests/conftest.py starts them at once, at the lowest CPU priority (nice 19), in one
child process (``python tests/sanitized_ops.py OUT_DIR``), and the tests wait for their step's result
(OUT_DIR/<step>.json). A run of test_sanitizers.py on its own does the same; without a background run
(e.g. the module imported in another way) the fixture runs the steps itself.

Imported as ``sanitized_ops`` (pyproject's pytest ``pythonpath`` puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from bct_onnx.ops import OP_TYPES

REPO = Path(__file__).resolve().parents[1]
TEST_FILE = "test_sanitizers.py"

# Seeds cycle over ops x the 4 CPU paths: twice round = every op on every path twice (the unsanitized CI set
# runs 400; sanitized kernels run about 3x slower).
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
    " or exact_k_below or amx_prefill",
    "test_nonlinear.py": "empty or nan or inf or bad or error or edge",
}

# At least the tests of that selection that force no SIMD path (213) pass on any x86-64: a selection
# that matches (nearly) nothing fails instead of passing quietly.
MIN_OP_TESTS_RUN = 200


def op_test_selection() -> str:
    """One -k expression for every file of OP_TESTS (a test's keywords include its module's file name)."""
    return " or ".join(f"({name} and ({select}))" if select else f"({name})" for name, select in OP_TESTS.items())


def runtime(name: str) -> str | None:
    """The C++ compiler's copy of a runtime library (libasan.so, libstdc++.so), or None."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=False).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def unavailable() -> str | None:
    """Why the sanitized steps cannot run here (a skip reason), or None."""
    if os.environ.get("BCT_SKIP_SANITIZERS"):
        return "BCT_SKIP_SANITIZERS is set"
    if shutil.which("cmake") is None or runtime("libasan.so") is None or runtime("libstdc++.so") is None:
        return "no cmake or no libasan.so of the C++ compiler: the sanitized build is not possible here"
    return None


def sanitized_env(library: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BCT_ONNX_ISA", None)
    env.pop("BCT_ONNX_NO_GFNI", None)
    env.update(
        # libstdc++ too: Python does not link it, and ASan's __cxa_throw interceptor needs it at start-up
        # (else "CHECK failed: real___cxa_throw != 0" at the first C++ exception).
        LD_PRELOAD=f"{runtime('libasan.so')}:{runtime('libstdc++.so')}",
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98",
        BCT_ONNX_LIBRARY=str(library),
    )
    return env


def _run(command: list[str], **kwargs: Any) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    return {"command": command, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def build(build: Path) -> dict[str, Any]:
    """Configure and build; the result of the first command that fails, else of the build (with "library")."""
    configure = [
        "cmake", "-S", str(REPO / "runtime_ops"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Debug",
        "-DBCT_WITH_CUDA=OFF", "-DBCT_SANITIZE=address,undefined", "-DBCT_BUILD_TEST_HELPERS=OFF",
        # Warnings stay warnings here: at -O1 with the sanitizers GCC 12 flags its own AVX-512 header
        # (_mm512_undefined_ps in avx512fintrin.h) as -Wuninitialized; CI's release build keeps BCT_WERROR.
        "-DBCT_WERROR=OFF",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"] if not (build / "CMakeCache.txt").exists() else []
    result: dict[str, Any] = {}
    for command in (configure, ["cmake", "--build", str(build), "-j2"]):
        result = _run(command)
        if result["returncode"] != 0:
            return result
    result["library"] = str(build / "libbct_onnx_ops.so")
    return result


def fuzz(library: Path, seeds: int, work: Path) -> dict[str, Any]:
    """tools/fuzz_ops.py's first ``seeds`` seeds on the sanitized library."""
    work.mkdir(parents=True, exist_ok=True)
    return _run([sys.executable, str(REPO / "tools" / "fuzz_ops.py"), "--seeds", str(seeds)],
                env=sanitized_env(library), cwd=work)


def op_tests(library: Path, files: list[str], selection: str) -> dict[str, Any]:
    """The op tests of ``files`` (tests/runtime_ops/) matching the -k ``selection``, in one pytest process."""
    args = [f"tests/runtime_ops/{name}" for name in files] + ["-k", selection]
    return _run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
        env=sanitized_env(library), cwd=REPO,  # -P: not the source tree
    )


def run_steps(out: Path, build_dir: Path) -> None:
    """Every step in order, each result written to out/<step>.json as it ends (a failed build ends the run)."""
    def write(step: str, result: dict[str, Any]) -> None:
        tmp = out / f"{step}.json.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out / f"{step}.json")

    built = build(build_dir)
    write("build", built)
    if built["returncode"] != 0:
        return
    library = Path(built["library"])
    write("fuzz", fuzz(library, FUZZ_SEEDS, out / "fuzz_work"))
    write("op_tests", op_tests(library, list(OP_TESTS), op_test_selection()))


class Steps:
    """The results of a background run in ``out`` (waited for), or of steps run here when there is none."""

    def __init__(self, out: Path | None, process: subprocess.Popen[bytes] | None, build_dir: Path) -> None:
        self.out, self.process, self.build_dir = out, process, build_dir
        self._here: dict[str, dict[str, Any]] = {}

    def result(self, step: str) -> dict[str, Any]:
        if self.process is None or self.out is None:
            return self._run_here(step)
        path = self.out / f"{step}.json"
        while not path.exists():
            if self.process.poll() is not None and not path.exists():
                log = (self.out / "driver.log").read_text(errors="replace")[-4000:]
                return {"command": ["background run"], "returncode": -1, "stdout": "",
                        "stderr": f"the background run ended (exit {self.process.returncode}) without a {step} "
                                  f"result (an earlier step failed?):\n{log}"}
            time.sleep(0.5)
        return json.loads(path.read_text())

    def _run_here(self, step: str) -> dict[str, Any]:
        if step not in self._here:
            if step == "build":
                self._here[step] = build(self.build_dir)
            else:
                library = Path(self.result("build")["library"])
                if step == "fuzz":
                    work = Path(tempfile.mkdtemp(prefix="bct_sanitized_fuzz_"))
                    try:
                        self._here[step] = fuzz(library, FUZZ_SEEDS, work)
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                else:
                    self._here[step] = op_tests(library, list(OP_TESTS), op_test_selection())
        return self._here[step]


# The background run of this pytest process (tests/conftest.py), where the fixture finds it.
STASH: pytest.StashKey[Steps] = pytest.StashKey()


def start_background() -> Steps:
    """Start every step in a child process at nice 19."""
    out = Path(tempfile.mkdtemp(prefix="bct_sanitized_"))
    build_dir = Path(os.environ.get("BCT_SANITIZE_BUILD_DIR") or out / "build")
    log = open(out / "driver.log", "wb")  # noqa: SIM115  # the child's; closed below, the child keeps its copy
    try:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(out), str(build_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            start_new_session=True,  # its own process group: stopped as one at the end of the run
        )
    finally:
        log.close()
    return Steps(out, process, build_dir)


def stop_background(steps: Steps) -> None:
    """End the child's process group if it still runs (an interrupted or -x run) and remove the results."""
    out, process = steps.out, steps.process
    assert out is not None and process is not None
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait()
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    os.nice(19)  # the lowest CPU priority: the suite's own tests go first
    run_steps(Path(sys.argv[1]), Path(sys.argv[2]))
