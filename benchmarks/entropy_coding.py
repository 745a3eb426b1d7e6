"""What --entropy-code buys and costs on a compressed model: bits a value, file ratio, session creation.

Takes a bct-compressed .onnx, entropy-codes its stored weight and table codes (EntropyCodeWeightsPass,
as ``--entropy-code`` would at the end of compression), saves the copy next to a scratch directory,
then reports the bits per value of the coded tensors before and after, both files' sizes (and
ratios to the FP32 file when given), the encode time, ONNX Runtime session creation time of both
files timed interleaved (median of ``--rounds``), and whether both give identical outputs on the
random token ids.

    python benchmarks/entropy_coding.py COMPRESSED.onnx [--fp32 FP32.onnx] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bct_onnx.passes import EntropyCodeWeightsPass

import bct_onnx
from bct_onnx import code_entropy, model_io
from bct_onnx.report import format_bytes


def text_feeds(session, rows: int = 2, length: int = 16, vocab: int = 1000) -> dict[str, np.ndarray]:
    """Random token ids (below ``vocab``) and the usual companions for a text model's inputs."""
    ids = np.random.default_rng(0).integers(0, vocab, (rows, length))
    made = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "position_ids": np.broadcast_to(np.arange(length), ids.shape).copy(),
    }
    return {i.name: made[i.name] for i in session.get_inputs()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--fp32", type=Path, help="the FP32 file, for whole-file ratios")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model = model_io.load(args.model)
    start = time.perf_counter()
    result = EntropyCodeWeightsPass()(model)
    encode_s = time.perf_counter() - start
    summary = code_entropy.coded_summary(result.model)
    if summary is None:
        print("nothing was entropy-coded (no BlockMatMul / BlockGather codes, or none shrank)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bct_entropy_") as tmp:
        coded = Path(tmp) / "coded.onnx"
        model_io.save(result.model, coded)
        plain_bytes, coded_bytes = model_io.file_bytes(args.model), model_io.file_bytes(coded)
        create = {"packed": [], "coded": []}
        for _ in range(args.rounds):  # interleaved: load on a shared machine moves both alike
            for key, path in (("packed", args.model), ("coded", coded)):
                t = time.perf_counter()
                bct_onnx.session(path, threads=args.threads)
                create[key].append(time.perf_counter() - t)
        feeds = text_feeds(bct_onnx.session(args.model, threads=args.threads))
        same = all(
            np.array_equal(a, b)
            for a, b in zip(
                bct_onnx.session(args.model, threads=args.threads).run(None, feeds),
                bct_onnx.session(coded, threads=args.threads).run(None, feeds),
            )
        )
    fp32_bytes = model_io.file_bytes(args.fp32) if args.fp32 is not None else None
    ratio = (lambda n: f" ({fp32_bytes / n:.2f}x)") if fp32_bytes else (lambda n: "")
    packed_s, coded_s = statistics.median(create["packed"]), statistics.median(create["coded"])
    print(f"model: {args.model}")
    print(
        f"coded tensors: {summary['tensors']}, {summary['values']} codes: {summary['bits_before']:.3f} -> "
        f"{summary['bits_after']:.3f} bits a value ({format_bytes(summary['packed_bytes'])} -> "
        f"{format_bytes(summary['coded_bytes'])}, {100 * (1 - summary['coded_bytes'] / summary['packed_bytes']):.1f}% less)"
    )
    print(f"file: {format_bytes(plain_bytes)}{ratio(plain_bytes)} -> {format_bytes(coded_bytes)}{ratio(coded_bytes)}")
    print(f"encode (once, at compression): {encode_s:.1f} s")
    print(
        f"session creation, median of {args.rounds} interleaved: packed {packed_s:.3f} s, coded {coded_s:.3f} s "
        f"(+{coded_s - packed_s:.3f} s, {coded_s / packed_s:.2f}x)"
    )
    print(f"outputs identical on random token ids: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
