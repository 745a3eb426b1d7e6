"""Peak memory and time of `bct-onnx compress`, each run in a child process, against the model's size.

    python benchmarks/compile_memory.py MODEL.onnx [MODEL.onnx ...] [--calibration none] [other bct-onnx compress flags]
    python benchmarks/compile_memory.py --synthetic 2048,5632,18,16,49152 --workdir /tmp/big --calibration none

--synthetic hidden,intermediate,layers,heads,vocab builds a Llama-shaped model of that size first
(bct_onnx.models.synthetic_llama, random weights, external data). Peak RSS is the child's maximum
resident set (getrusage of children); CPU is its user + system time. Per-pass seconds come from the
compile report. Prints one Markdown row per model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bct_onnx import model_io


def measure(model: Path, workdir: Path, flags: list[str]) -> dict[str, object]:
    """Compress model in a child process; its peak RSS, CPU and wall time, and the report's pass times."""
    out, report = workdir / "out.onnx", workdir / "report.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bct_onnx", "compress", str(model), "-o", str(out), "--report", str(report), *flags], check=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    data = json.loads(report.read_text())
    passes = sorted(((p["name"], p["seconds"]) for p in data["passes"]), key=lambda item: -item[1])
    return {
        "model_mb": model_io.file_bytes(model) / 2**20,
        "output_mb": data["output_bytes"] / 2**20,
        "peak_mb": after.ru_maxrss / 1024,  # the largest child so far: run one model per process for exact figures
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "wall_s": wall,
        "calibration": data["calibration"].get("method"),
        "slowest_passes": passes[:4],
        "steps": data["timings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--synthetic", help="hidden,intermediate,layers,heads,vocab of a synthetic Llama to build")
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic model and outputs go")
    parser.add_argument("--calibration", default="auto")
    args, extra = parser.parse_known_args()  # flags it does not know go to bct-onnx compress
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bct_compile_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = list(args.models)
    if args.synthetic:
        from bct_onnx.models.synthetic_llama import LlamaShape, build

        hidden, intermediate, layers, heads, vocab = (int(v) for v in args.synthetic.split(","))
        shape = LlamaShape(hidden, intermediate, layers, heads, vocab)
        print(f"building {shape} ({shape.total_bytes() / 2**30:.2f} GiB, layer {shape.layer_bytes() / 2**20:.0f} MiB)")
        models.append(build(workdir / "synthetic" / "model.onnx", shape))
    flags = ["--calibration", args.calibration, *[flag for flag in extra if flag != "--"]]
    print("| model | model MB | output MB | calibration | peak RSS MB | peak / model | CPU s | wall s | slowest passes (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in models:
        row = measure(model, workdir, flags)
        slow = ", ".join(f"{name} {seconds:.1f}" for name, seconds in row["slowest_passes"])
        print(
            f"| {model} | {row['model_mb']:.0f} | {row['output_mb']:.0f} | {row['calibration']} | {row['peak_mb']:.0f} | "
            f"{row['peak_mb'] / row['model_mb']:.2f}x | {row['cpu_s']:.1f} | {row['wall_s']:.0f} | {slow} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
