"""GPTQ (Frantar et al., 2022) rounding of a MatMul weight into the block format, post-training.

Plain rounding picks each code on its own. GPTQ walks along the reduction axis K and, after each
column is rounded, spreads that column's rounding error over the columns not yet rounded, weighted
by the inverse Hessian ``H = X^T X`` of the layer's calibration inputs, so the layer's *output*
error is what is minimised. Scales (and zero points) of a block are chosen, with the same clipped
scale search as plain rounding, when the walk reaches the block's first column. The result is an
ordinary spec-conform QuantizedTensor: the runtime never knows how the codes were chosen.

The walk is the paper's lazy-batch form, two levels deep: a column's error reaches the rest of its
quantization block at once (a rank-1 update of at most ``block_size`` columns), the rest of its
lazy batch once per block (one matmul) and the rest of the weight once per batch (one matmul).
Each column still sees every earlier column's correction before it is rounded, so the codes are
those of the textbook per-column loop (up to floating-point summation order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import scipy.linalg
from threadpoolctl import ThreadpoolController

from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    _inverse,
    choose_scales,
    pack_codes,
    pad_to_blocks,
    round_half_to_even,
    scales_to_float32,
)
from bct_onnx.weight_quantizer import search_scales

# Columns corrected together before the rest of the weight is (the paper's "lazy batch").
_LAZY_BATCH = 128
# Bytes of the float64 working copy of weight rows walked at once.
_CHUNK_BYTES = 1 << 25

ColumnQuantizer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@functools.cache
def blas_controller() -> ThreadpoolController:
    """The process's BLAS thread pools. GPTQ and the Hessian sums run on one BLAS thread: their
    matrices are small (K <= a few thousand) and OpenBLAS's spinning threads make Cholesky and
    triangular inversion about 8x slower on a machine whose cores are busy (measured on 2 cores)."""
    return ThreadpoolController()


def inverse_hessian_factor(hessian: np.ndarray, damping: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of the dampened H^-1 (H^-1 = U^T U), and the mask of dead inputs.

    U is computed without forming H^-1: with J the reversal permutation and J H J = L L^T,
    H^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper triangular with a positive diagonal, so it
    is the Cholesky factor (one Cholesky and one triangular inverse, a third of inv + cholesky).
    """
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    damp = damping * (mean_diag if mean_diag > 0 else 1.0)
    h[np.diag_indices_from(h)] += damp
    for _ in range(4):  # grow the damping until H is positive definite
        try:
            lower = np.linalg.cholesky(h[::-1, ::-1])
        except np.linalg.LinAlgError:
            h[np.diag_indices_from(h)] += damp
            damp *= 10
            continue
        inverse_lower, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
        if info == 0:
            return np.ascontiguousarray(inverse_lower[::-1, ::-1]), dead
        h[np.diag_indices_from(h)] += damp
        damp *= 10
    raise np.linalg.LinAlgError("GPTQ: the calibration Hessian is not positive definite even after damping")


def _column_quantizer(scales: np.ndarray, zero_points: np.ndarray | None, fmt: BlockFormat) -> ColumnQuantizer:
    """Codes and dequantized values of one float32 column [N] of a block with stored scales [N].

    The arithmetic of block_format.codes_for followed by dequantize_codes, with the per-block work
    (float32 scale, its inverse, zero point) done once instead of once per column.
    """
    scale = scales_to_float32(scales, fmt.scale_kind)
    inverse = _inverse(scale)
    if fmt.float_offsets:
        assert zero_points is not None
        offset = zero_points.astype(np.float32)

        def quantize_offset(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            q = round_half_to_even(np.clip((column - offset) * inverse, 0, fmt.qmax))
            return q.astype(np.uint8), (q * scale).astype(np.float32) + offset

        return quantize_offset
    if fmt.symmetric:
        implicit_zero = np.float32(fmt.implicit_zero_point)

        def quantize_symmetric(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            q = np.clip(round_half_to_even(column * inverse), fmt.qmin, fmt.qmax)
            return (q + implicit_zero).astype(np.uint8), q * scale

        return quantize_symmetric
    assert zero_points is not None
    zero = zero_points.astype(np.float32)

    def quantize_asymmetric(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(round_half_to_even(column * inverse) + zero, 0, fmt.qmax)
        return q.astype(np.uint8), (q - zero) * scale

    return quantize_asymmetric


def gptq_quantize(
    weight_nk: np.ndarray,
    hessian: np.ndarray,
    fmt: BlockFormat,
    *,
    damping: float = 0.01,
    scale_search: bool = True,
    keep_dead_inputs: bool = False,
) -> QuantizedTensor:
    """Quantize a transposed MatMul weight [N, K] (rows are output columns) along K with GPTQ.

    hessian is the [K, K] sum of x^T x over calibration rows x of the MatMul's activation input.
    Inputs never active in calibration (zero Hessian diagonal) contribute nothing to the output, so
    their weights are zeroed, unless keep_dead_inputs (a tied embedding table, whose Gather reads
    those values too): then they are rounded plainly (no error flows into them either way).
    """
    weight = np.asarray(weight_nk)
    if weight.ndim != 2:
        raise ValueError(f"gptq_quantize expects a 2-D weight [N, K], got shape {weight.shape}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"gptq_quantize: Hessian shape {hessian.shape} does not match K={k}")
    codes = np.empty((n, fmt.row_bytes(k)), dtype=np.uint8)
    scales = np.empty((n, fmt.num_blocks(k)), dtype=fmt.scale_dtype)
    zero_points = None if fmt.zero_point_dtype is None else np.empty(scales.shape, dtype=fmt.zero_point_dtype)
    # Rows (output columns) are independent: walk them in chunks so the float64 working copy stays
    # small (an output projection of 49152 x 576 would take 226 MB at once) and cache-friendly; the
    # chunk's codes are packed before the next one (unpacked codes of the whole weight, and
    # pack_codes' bit planes of them, would take 10x the packed bytes).
    rows = max(1, _CHUNK_BYTES // (8 * k))
    with blas_controller().limit(limits=1, user_api="blas"):
        hinv, dead = inverse_hessian_factor(hessian, damping)
        for r in range(0, n, rows):
            # K-major: a column of the weight (one input channel over the chunk's rows) is contiguous.
            w_t = np.array(weight[r : r + rows].T, dtype=np.float64, order="C")
            if not keep_dead_inputs:
                w_t[dead] = 0.0
            codes_t = np.empty(w_t.shape, dtype=np.uint8)
            _gptq_walk(
                w_t, hinv, fmt, scale_search, codes_t, scales[r : r + rows],
                None if zero_points is None else zero_points[r : r + rows],
            )
            codes[r : r + rows] = pack_codes(codes_t.T, fmt.bits)
    return QuantizedTensor(codes, scales, zero_points, k, fmt)


def _gptq_walk(
    w_t: np.ndarray,
    hinv: np.ndarray,
    fmt: BlockFormat,
    scale_search: bool,
    codes_t: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
) -> None:
    """The GPTQ walk over a K-major float64 copy w_t [K, rows] of weight rows (corrected in place),
    writing their unpacked codes codes_t [K, rows], scales and zero points [rows, nb]."""
    k, n = w_t.shape
    bs = fmt.block_size
    batch = bs * max(1, _LAZY_BATCH // bs)  # a multiple of the block size: blocks never straddle batches
    errors = np.empty((batch, n), dtype=np.float64)  # scaled rounding errors of the current batch

    for start in range(0, k, batch):
        stop = min(k, start + batch)
        for first in range(start, stop, bs):
            last = min(first + bs, k)
            b = first // bs
            block = w_t[first:last]  # a view: corrections inside the block land in w_t
            padded = pad_to_blocks(block.T.astype(np.float32), fmt)
            s, zp = search_scales(padded, fmt) if scale_search else choose_scales(padded, fmt)
            scales[:, b] = s[:, 0]
            if zero_points is not None:
                assert zp is not None
                zero_points[:, b] = zp[:, 0]
            quantize_column = _column_quantizer(scales[:, b], None if zp is None else zero_points[:, b], fmt)
            for col in range(first, last):
                i = col - first
                codes_t[col], dequantized = quantize_column(block[i].astype(np.float32))
                err = (block[i] - dequantized) / hinv[col, col]
                errors[col - start] = err
                if col + 1 < last:
                    block[i + 1 :] -= np.outer(hinv[col, col + 1 : last], err)
            if last < stop:  # the rest of the batch, once per block
                w_t[last:stop] -= hinv[first:last, last:stop].T @ errors[first - start : last - start]
        if stop < k:  # the rest of the weight, once per batch
            w_t[stop:] -= hinv[start:stop, stop:].T @ errors[: stop - start]
