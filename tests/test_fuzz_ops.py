"""The CI seed set of the kernel-input fuzzer (tools/fuzz_ops.py) over every custom op.

Each case is one node with bad or extreme inputs, run in a forked child with a timeout and a memory
limit on one forced CPU path: no crash, hang, unclear error, refused valid input or result that
differs from the numpy spec.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import fuzz_ops
import numpy as np
import pytest

from bct_onnx import ops


def test_ci_seed_set() -> None:
    cases = fuzz_ops.ci_cases()
    # The set covers every op, every mutation kind and every CPU path this machine has.
    assert {c.op_type for c in cases} == set(ops.OP_TYPES)
    assert {c.isa for c in cases} == set(fuzz_ops.available_isas())
    kinds = Counter(name.split(" ")[0] for c in cases for name in c.name.split(":", 3)[3].split("+"))
    assert {"valid", "non-finite", "magnitude", "empty", "dtype", "rank", "shape", "missing", "attribute"} <= set(kinds)
    # In its own process: the children fork from a parent without threads (this one may hold ONNX
    # Runtime sessions of other tests, whose thread pools a fork would copy mid-state).
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "results.json"
        done = subprocess.run(
            [sys.executable, str(Path(fuzz_ops.__file__)), "--json", str(report)],
            cwd=work, capture_output=True, text=True, check=False,
        )
        assert report.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
        results = json.loads(report.read_text())
    assert len(results) == len(cases)
    failures = [r for r in results if r["outcome"] not in ("ok", "clean-error")]
    assert not failures and done.returncode == 0, fuzz_ops.table(results, fuzz_ops.OUTCOMES) + "\n" + "\n".join(
        f"{r['case']}: {r['outcome']} {str(r.get('detail', ''))[:300]}" for r in failures
    )
    outcomes = Counter(r["outcome"] for r in results)
    assert outcomes["ok"] >= len(cases) // 4 and outcomes["clean-error"] >= len(cases) // 4, outcomes


def test_the_fuzzer_sees_a_crash_a_hang_and_a_wrong_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The classification itself: a child killed by a signal, one that never answers, and a session
    whose output differs from the spec are reported as such."""

    def crash(_: object) -> dict[str, object]:
        os.kill(os.getpid(), signal.SIGSEGV)
        return {}

    def hang(_: object) -> dict[str, object]:
        time.sleep(60)
        return {}

    assert fuzz_ops.run_forked(crash, [0])[0]["outcome"] == "crash"
    assert fuzz_ops.run_forked(hang, [0], timeout=1.0)[0]["outcome"] == "hang"
    monkeypatch.setenv("BCT_ONNX_ISA", "scalar")  # run_case sets it; restored afterwards
    case = fuzz_ops.BASES[ops.BLOCK_DEQUANTIZE](random.Random(1), np.random.default_rng(1))  # valid, no mutation
    assert fuzz_ops.run_case(case)["outcome"] == "ok"
    spec = fuzz_ops.reference.run
    monkeypatch.setattr(fuzz_ops.reference, "run", lambda *a, **k: [np.nextafter(y, np.inf) for y in spec(*a, **k)])
    result = fuzz_ops.run_case(case)
    assert result["outcome"] == "wrong-result" and "differ" in result["detail"], result
