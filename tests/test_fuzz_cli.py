"""The CI seed set of the model-mutation fuzzer (tools/fuzz_cli.py) over `bct-onnx compress`.

Every hand-written case of issue 11 and a few seeded random mutations, each in its own process
with a timeout and a memory limit: no traceback, crash, hang, touched input, partial output or bad
output; the inputs the CLI must refuse are refused, the ones it must take compress and run.
"""

from __future__ import annotations

import fuzz_cli


def test_ci_fuzz_set() -> None:
    cases = fuzz_cli.ci_cases()
    results = fuzz_cli.run_cases(cases, jobs=2)
    table = fuzz_cli.table(results)
    failures = [r for r in results if r["outcome"] in fuzz_cli.FAILURES or r["outcome"] == "skipped"]
    assert not failures, f"{table}\n" + "\n".join(
        f"{r['case']}: {r['outcome']} {r.get('detail', '')} {str(r.get('stderr', ''))[-300:]}" for r in failures
    )
    expected = {case.name: "clean-error" if case.expect_error else "ok" for case in fuzz_cli.named_cases()}
    got = {str(r["case"]): r["outcome"] for r in results if r["case"] in expected}
    assert got == expected, table
