"""How much lossless entropy coding of the stored codes could save: empirical code entropy per tensor.

Quantizes every 2-D float initializer of a model (MatMul weights along K, tables along their rows)
as the passes would (symmetric, scale search, one-byte float8e5m2 scales) and reports the order-0
empirical entropy of the codes, per tensor weighted by size, against the stored ``bits``: the bits a
value that an ideal per-tensor coder (rANS / Huffman over code symbols) would need.

    python benchmarks/code_entropy.py MODEL.onnx [--bits 4] [--block-size 32]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from bct_onnx.block_format import BlockFormat, codes_for, pad_to_blocks
from bct_onnx.weight_quantizer import search_scales

ROWS_PER_CHUNK = 4096


def code_histogram(values: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Counts of each code when values [rows, D] are quantized along D."""
    counts = np.zeros(1 << fmt.bits, dtype=np.int64)
    for start in range(0, values.shape[0], ROWS_PER_CHUNK):
        blocks = pad_to_blocks(values[start : start + ROWS_PER_CHUNK], fmt)
        scales, zero_points = search_scales(blocks, fmt)
        codes = codes_for(blocks, scales, zero_points, fmt)[..., : values.shape[1]]
        counts += np.bincount(codes.ravel(), minlength=1 << fmt.bits)
    return counts


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args(argv)
    fmt = BlockFormat(args.bits, args.block_size, True, "float8e5m2")
    model = onnx.load(args.model)
    weighted = 0.0
    total = 0
    pooled = np.zeros(1 << fmt.bits, dtype=np.int64)
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or min(init.dims) < args.block_size:
            continue
        array = numpy_helper.to_array(init).astype(np.float32)
        # Tables ([V, D], read by Gather) are quantized along rows; MatMul weights [K, N] along K.
        layout = array if "embed" in init.name else np.ascontiguousarray(array.T)
        counts = code_histogram(layout, fmt)
        weighted += entropy_bits(counts) * counts.sum()
        total += int(counts.sum())
        pooled += counts
    print(
        f"{args.model}: {total} values, {args.bits}-bit codes in blocks of {args.block_size}: order-0 entropy "
        f"{weighted / total:.3f} bits a value per tensor ({entropy_bits(pooled):.3f} pooled) against {args.bits}"
    )
    print("code histogram (%):", np.round(100 * pooled / pooled.sum(), 2).tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
