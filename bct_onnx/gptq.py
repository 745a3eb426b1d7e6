"""GPTQ (Frantar et al., 2022) rounding of a MatMul weight into the block format, post-training.

Plain rounding picks each code on its own. GPTQ walks along the reduction axis K and, after each
column is rounded, spreads that column's rounding error over the columns not yet rounded, weighted
by the inverse Hessian ``H = X^T X`` of the layer's calibration inputs, so the layer's *output*
error is what is minimised. Scales (and zero points) of a block are chosen, with the same clipped
scale search as plain rounding, when the walk reaches the block's first column. The result is an
ordinary spec-conform QuantizedTensor: the runtime never knows how the codes were chosen.
"""

from __future__ import annotations

import numpy as np

from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    choose_scales,
    codes_for,
    dequantize_codes,
    pack_codes,
    pad_to_blocks,
)
from bct_onnx.weight_quantizer import search_scales

# Columns updated together before the rest of the weight is corrected (the paper's "lazy batch").
_LAZY_BATCH = 128


def _inverse_hessian_cholesky(hessian: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of H^-1 after dampening, and the mask of dead (never active) inputs."""
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    damp = damping * (mean_diag if mean_diag > 0 else 1.0)
    h[np.diag_indices_from(h)] += damp
    for _ in range(4):  # grow the damping until H is positive definite
        try:
            inverse = np.linalg.inv(h)
            return np.linalg.cholesky(inverse).T, dead
        except np.linalg.LinAlgError:
            h[np.diag_indices_from(h)] += damp
            damp *= 10
    raise np.linalg.LinAlgError("GPTQ: the calibration Hessian is not positive definite even after damping")


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
    w = np.array(weight_nk, dtype=np.float64, copy=True)
    if w.ndim != 2:
        raise ValueError(f"gptq_quantize expects a 2-D weight [N, K], got shape {w.shape}")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"gptq_quantize: Hessian shape {hessian.shape} does not match K={k}")
    hinv, dead = _inverse_hessian_cholesky(hessian, damping)
    if not keep_dead_inputs:
        w[:, dead] = 0.0

    bs = fmt.block_size
    nb = fmt.num_blocks(k)
    codes = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=fmt.scale_dtype)
    zero_points = None if fmt.zero_point_dtype is None else np.empty((n, nb), dtype=fmt.zero_point_dtype)
    batch = bs * max(1, _LAZY_BATCH // bs)  # a multiple of the block size: blocks never straddle batches

    for start in range(0, k, batch):
        stop = min(k, start + batch)
        w_batch = w[:, start:stop]  # a view: corrections inside the batch land in w
        err_batch = np.zeros((n, stop - start), dtype=np.float64)
        h_batch = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % bs == 0:  # first column of a block: choose its scale from the corrected values
                b = col // bs
                block = pad_to_blocks(w[:, col : min(col + bs, k)].astype(np.float32), fmt)
                if scale_search:
                    s, zp = search_scales(block, fmt)
                else:
                    s, zp = choose_scales(block, fmt)
                scales[:, b] = s[:, 0]
                if zero_points is not None:
                    assert zp is not None
                    zero_points[:, b] = zp[:, 0]
            column = w_batch[:, i].astype(np.float32)
            b = col // bs
            col_zp = None if zero_points is None else zero_points[:, b : b + 1]
            code = codes_for(column[:, None, None], scales[:, b : b + 1], col_zp, fmt)[:, 0, 0]
            codes[:, col] = code
            dequantized = dequantize_codes(code[:, None], scales[:, b : b + 1], col_zp, fmt)[:, 0]
            err = (w_batch[:, i] - dequantized.astype(np.float64)) / h_batch[i, i]
            w_batch[:, i:] -= np.outer(err, h_batch[i, i:])
            err_batch[:, i] = err
        w[:, stop:] -= err_batch @ hinv[start:stop, stop:]
    return QuantizedTensor(pack_codes(codes, fmt.bits), scales, zero_points, k, fmt)
