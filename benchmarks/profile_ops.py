"""Where a model's time goes, per op type: ONNX Runtime's own profiler on the feeds compare_speed.py uses.

Runs the model (a bct-onnx file with the custom-op library registered, or any ONNX file) with
`--threads` intra-op threads (default 1: per-node times add up to the run), discards the warm-up runs,
and prints each op type's share of the summed node time, its calls per run and the graph's node
counts. Profiling files go to a temporary directory.

    python benchmarks/profile_ops.py MODEL.onnx --model minilm|bert-base [--threads 1] [--runs 20]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_speed

from bct_onnx import runtime


def op_shares(profile: Path, skip_runs: int) -> tuple[dict[str, float], dict[str, int], int]:
    """(microseconds per op type, node events per op type, runs) over the runs after skip_runs."""
    events = json.loads(profile.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if len(runs) <= skip_runs:
        raise SystemExit(f"{profile}: {len(runs)} runs profiled, need more than {skip_runs}")
    start = runs[skip_runs]["ts"]
    times: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < start or not e["name"].endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        times[op] += e["dur"]
        calls[op] += 1
    return times, calls, len(runs) - skip_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument(
        "--model-key", "--model", dest="key", choices=["minilm", "bert-base"], default="minilm"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        (maker,) = compare_speed.make_models(Path(tmp), tiny=False, only={args.key})
        model = maker()
        custom = any(
            o.domain == "ai.bct_onnx" for o in onnx.load(args.model, load_external_data=False).opset_import
        )
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = runtime.session(
            args.model, sess_options=options, threads=args.threads, with_library=custom, quiet=True
        )
        label, make_feeds = model.cases[0]
        feeds = make_feeds(session)
        for _ in range(args.warmup + args.runs):
            session.run(None, feeds)
        times, calls, runs = op_shares(Path(session.end_profiling()), args.warmup)
    total = sum(times.values())
    nodes = collections.Counter(n.op_type for n in onnx.load(args.model, load_external_data=False).graph.node)
    print(
        f"{args.model.name}: {label}, {args.threads} thread(s), {runs} runs, node time {total / runs / 1e3:.2f} ms per run"
    )
    for op, us in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {op:24s} {100 * us / total:5.1f}%  {us / runs / 1e3:7.3f} ms  {calls[op] // runs:4d} calls")
    print(f"graph nodes: {sum(nodes.values())}: " + ", ".join(f"{k} {v}" for k, v in nodes.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
