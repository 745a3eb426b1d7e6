"""Where a model's time goes, per op type: ONNX Runtime's own profiler on the feeds compare_speed.py uses.

Runs the model (a bct-onnx file with the custom-op library registered, or any ONNX file) with
`--threads` intra-op threads (default 1: per-node times add up to the run), discards the warm-up runs,
and prints each op type's share of the summed node time, its calls per run and the graph's node
counts; matrix products (BlockMatMul, MatMulNBits, MatMul with a constant weight) are split by their
K x N weight shape. The wall time of a run next to its summed node time shows what ONNX Runtime
spends between nodes (dispatch, allocation, output copies); so does the fastest and the median run
split into its nodes' time in that run and the rest (with --fastest the first line's "between nodes"
also holds the nodes' slower calls). Profiling files go to a temporary directory.

    python benchmarks/profile_ops.py MODEL.onnx --model minilm|bert-base [--threads 1] [--runs 20]
    python benchmarks/profile_ops.py MODEL.onnx --model smollm2 --case decode|prefill [--top 10]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_speed

from bct_onnx import runtime


def op_shares(profile: Path, skip_runs: int) -> tuple[dict[str, float], dict[str, int], int]:
    """(microseconds per op type, node events per op type, runs) over the runs after skip_runs."""
    nodes, _ = node_times(profile, skip_runs)
    times: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for (_, op), (us, count) in nodes.items():
        times[op] += us
        calls[op] += count
    return times, calls, len(_runs(profile_events(profile), skip_runs))


def profile_events(profile: Path) -> list[dict[str, Any]]:
    return json.loads(profile.read_text())


def _runs(events: list[dict[str, Any]], skip_runs: int) -> list[dict[str, Any]]:
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if len(runs) <= skip_runs:
        raise SystemExit(f"profile: {len(runs)} runs profiled, need more than {skip_runs}")
    return runs[skip_runs:]


def node_times(
    profile: Path, skip_runs: int, fastest: bool = False
) -> tuple[dict[tuple[str, str], tuple[float, int]], list[float]]:
    """({(node name, op type): (microseconds, calls)}, wall microseconds of each run) after skip_runs.
    With fastest, a node's microseconds are its fastest call times its calls: on a machine others
    load, the mean of a short node is mostly the time it was preempted."""
    events = profile_events(profile)
    runs = _runs(events, skip_runs)
    start = runs[0]["ts"]
    times: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < start or not e["name"].endswith("_kernel_time"):
            continue
        key = (e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "?"))
        times.setdefault(key, []).append(float(e["dur"]))
    result = {k: ((min(v) * len(v)) if fastest else sum(v), len(v)) for k, v in times.items()}
    return result, [float(r["dur"]) for r in runs]


def run_breakdown(profile: Path, skip_runs: int) -> list[tuple[float, float, float]]:
    """(wall, summed node time, time between nodes) in microseconds of each run after skip_runs, from
    the node events inside the run: what a run spends outside its nodes (dispatch, allocation) apart
    from its nodes' own time, whatever that time was in this run."""
    events = profile_events(profile)
    nodes = sorted(
        (e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
        key=lambda e: e["ts"],
    )
    result = []
    for run in _runs(events, skip_runs):
        begin, end = run["ts"], run["ts"] + run["dur"]
        busy = sum(float(e["dur"]) for e in nodes if begin <= e["ts"] <= end)
        result.append((float(run["dur"]), busy, float(run["dur"]) - busy))
    return result


def weight_shapes(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> "KxN" (with " b<bits>" when the node says) for the matrix products with a weight
    (K and N attributes, or a constant B)."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    shapes = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if "K" in attrs and "N" in attrs:
            shapes[node.name] = f"{attrs['K']}x{attrs['N']}" + (
                f" b{attrs['bits']}" if "bits" in attrs else ""
            )
        elif node.op_type == "MatMul" and len(node.input) > 1 and len(inits.get(node.input[1], ())) == 2:
            shapes[node.name] = "x".join(str(d) for d in inits[node.input[1]])
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument(
        "--model-key", "--model", dest="key", choices=["minilm", "bert-base", "smollm2"], default="minilm"
    )
    parser.add_argument(
        "--case",
        choices=["first", "decode", "prefill"],
        default="first",
        help="which of the model's cases (smollm2: decode step after 128 tokens, or prefill 128)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=0, help="also list the N slowest nodes")
    parser.add_argument(
        "--fastest",
        action="store_true",
        help="each node's fastest call instead of its mean (a loaded machine inflates the mean)",
    )
    args = parser.parse_args(argv)
    proto = onnx.load(args.model, load_external_data=False)
    with tempfile.TemporaryDirectory() as tmp:
        (maker,) = compare_speed.make_models(Path(tmp), tiny=False, only={args.key})
        model = maker()
        custom = any(o.domain == "ai.bct_onnx" for o in proto.opset_import)
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = runtime.session(
            args.model, sess_options=options, threads=args.threads, with_library=custom, quiet=True
        )
        wanted = {"first": 0, "decode": 0, "prefill": 1}[args.case]
        if args.case != "first" and args.key != "smollm2":
            raise SystemExit(f"--case {args.case}: only for --model smollm2")
        label, make_feeds = model.cases[wanted]
        feeds = make_feeds(session)
        for _ in range(args.warmup + args.runs):
            session.run(None, feeds)
        profile = Path(session.end_profiling())
        nodes, walls = node_times(profile, args.warmup, fastest=args.fastest)
        breakdown = sorted(run_breakdown(profile, args.warmup))
    runs = len(walls)
    shapes = weight_shapes(proto)
    times: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for (name, op), (us, count) in nodes.items():
        group = f"{op} {shapes[name]}" if name in shapes else op
        times[group] += us
        calls[group] += count
    total = sum(times.values())
    counts = collections.Counter(n.op_type for n in proto.graph.node)
    print(
        f"{args.model.name}: {label}, {args.threads} thread(s), {runs} runs, "
        f"{'fastest call of each node' if args.fastest else 'mean'} node time "
        f"{total / runs / 1e3:.3f} ms per run, wall time median {statistics.median(walls) / 1e3:.3f} ms "
        f"(between nodes {(statistics.median(walls) - total / runs) / 1e3:.3f} ms)"
    )
    for label, (wall, busy, between) in (
        ("fastest", breakdown[0]),
        ("median", breakdown[len(breakdown) // 2]),
    ):
        print(
            f"  {label} run: {wall / 1e3:.3f} ms = nodes {busy / 1e3:.3f} ms (their time in that run) "
            f"+ between and around nodes {between / 1e3:.3f} ms"
        )
    for group, us in sorted(times.items(), key=lambda kv: -kv[1]):
        per_call = us / calls[group]
        print(
            f"  {group:32s} {100 * us / total:5.1f}%  {us / runs / 1e3:7.3f} ms  {calls[group] // runs:4d} calls"
            f"  {per_call:8.1f} us/call"
        )
    if args.top:
        print(f"slowest {args.top} nodes (us per run):")
        for (name, op), (us, _) in sorted(nodes.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {us / runs:8.1f}  {op:20s} {name}")
    print(f"graph nodes: {sum(counts.values())}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
