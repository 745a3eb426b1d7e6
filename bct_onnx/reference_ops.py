"""numpy references of the custom ops' arithmetic, built on the block format specification.

block_format.py specifies the format (quantize, pack, dequantize); this module specifies what an
op computes from it, in float64 so that the kernels' float32 results can be compared against an
accurate value (exactly equal on data whose sums are exact in float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bct_onnx import block_format
from bct_onnx.block_format import BlockFormat, QuantizedTensor, ScaleKind, ZeroPointKind


def activation_format(act_bits: int, block_size: int) -> BlockFormat:
    """The format BlockMatMul quantizes A into at run time (act_bits > 0): symmetric, float32 scales."""
    return BlockFormat(bits=act_bits, block_size=block_size, symmetric=True, scale_kind=ScaleKind.FLOAT32)


def activation_scales(scales: np.ndarray) -> np.ndarray:
    """The float32 scales an activation block is multiplied by: the stored scale when finite, NaN when
    the block held a NaN or an infinity (its scale m / -2**(bits-1) is then NaN or +-inf).

    Every output that uses such a block is NaN, whatever its codes: float matmul gives NaN for a NaN
    and +-inf or NaN for an infinity, and integer codes cannot carry an infinity (docs/ops.md).
    """
    scales = np.asarray(scales, dtype=np.float32)
    return np.where(np.isfinite(scales), scales, np.float32(np.nan)).astype(np.float32)


def quantize_activations(x: np.ndarray, act_bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The run-time activation quantizer of both matmuls along the last axis: unsigned codes of
    ``quantize_codes(x, activation_format(act_bits, block_size))`` and activation_scales of its scales."""
    codes, scales, _ = block_format.quantize_codes(x, activation_format(act_bits, block_size))
    return codes, activation_scales(scales)


def matmul_operands(
    a: np.ndarray | QuantizedTensor,
    w_codes: np.ndarray,
    w_scales: np.ndarray,
    w_zero_points: np.ndarray | None,
    *,
    k: int,
    bits: int,
    block_size: int,
    symmetric: bool,
    act_bits: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The two float64 operands BlockMatMul multiplies: A' [..., K] and W' [N, K].

    W' is the dequantized weight. A' is A when act_bits == 0; otherwise the values of A's codes from
    ``quantize_codes(A, BlockFormat(act_bits, block_size, True, "float32"))``, (ua - za) * a_scale,
    computed without rounding, where a block holding a NaN or an infinity has a_scale NaN
    (activation_scales): its row of Y is NaN.

    A quantized A (a QuantizedTensor along K, BlockMatMul's in_bits > 0) whose format is that
    run-time activation format is used as it is: its codes are A's codes. Any other quantized A is
    first dequantized (``block_format.dequantize``) and then treated as a float A.
    """
    if isinstance(a, QuantizedTensor):
        if a.axis_size != k:
            raise ValueError(f"quantized a must have axis_size K={k}, got {a.axis_size}")
        if act_bits and a.fmt == activation_format(act_bits, block_size):
            a_codes = block_format.unpack_codes(a.codes, act_bits, k)
            a_scales = a.scales
        else:
            a = block_format.dequantize(a)
            a_codes = None
    else:
        a_codes = None
    a = np.asarray(a, dtype=np.float32) if a_codes is None else a_codes
    if a.shape[-1] != k:
        raise ValueError(f"a must have last dimension K={k}, got shape {a.shape}")
    scale_kind = block_format.scale_kind_of(w_scales)
    # W_zero_points' dtype tells integer zero points (uint8) from float offsets (float16 / float32).
    float_offsets = w_zero_points is not None and np.asarray(w_zero_points).dtype != np.uint8
    w_fmt = BlockFormat(
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        scale_kind=scale_kind,
        zero_point_kind=ZeroPointKind.FLOAT if float_offsets else ZeroPointKind.INTEGER,
    )
    codes = block_format.unpack_codes(w_codes, bits, k)
    weight = block_format.dequantize_codes(codes, w_scales, w_zero_points, w_fmt).astype(np.float64)
    if not act_bits:
        return a.astype(np.float64), weight
    a_fmt = activation_format(act_bits, block_size)
    with np.errstate(invalid="ignore", over="ignore"):
        if a_codes is None:
            a_codes, a_scales = quantize_activations(a, act_bits, block_size)
        a_scale = np.repeat(activation_scales(a_scales).astype(np.float64), block_size, axis=-1)[..., :k]
    return (a_codes.astype(np.float64) - a_fmt.implicit_zero_point) * a_scale, weight


def matmul_reference(
    a: np.ndarray | QuantizedTensor,
    w_codes: np.ndarray,
    w_scales: np.ndarray,
    w_zero_points: np.ndarray | None,
    *,
    k: int,
    bits: int,
    block_size: int,
    symmetric: bool,
    act_bits: int = 0,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """BlockMatMul (docs/ops.md): Y[..., N] = A' x W'^T + bias in float64 (see matmul_operands).

    With act_bits > 0 this is the sum over blocks of a_scale * w_scale * sum((ua - za) * (uw - zw)),
    the integer form the kernels compute.
    """
    a_used, weight = matmul_operands(
        a,
        w_codes,
        w_scales,
        w_zero_points,
        k=k,
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        act_bits=act_bits,
    )
    y = a_used @ weight.T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y


WEIGHT_ROW_LIMIT = 2.0**126  # K * max|W'[n, :]| below it: sums of A (scaled to |a| < 1) times W' stay in range


def matmul_in_range(
    a: np.ndarray,
    w_codes: np.ndarray,
    w_scales: np.ndarray,
    w_zero_points: np.ndarray | None,
    *,
    k: int,
    bits: int,
    block_size: int,
    symmetric: bool,
    act_bits: int = 0,
) -> np.ndarray:
    """Where BlockMatMul's float32 range guarantee holds (docs/ops.md), bool [..., N] for a float A.

    Per output: its row of A is finite, and its weight row W'[n] (dequantized in float32) is finite
    with K * max|W'[n]| <= 2**126. There Y agrees with matmul_reference within the tolerance, a
    reference beyond the float32 range giving +-inf of its sign, however large A is: the kernels
    compute a row whose sums overflowed again from A scaled by a power of two.
    """
    a = np.asarray(a, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        _, weight = matmul_operands(
            np.zeros(a.shape[-1:], np.float32), w_codes, w_scales, w_zero_points,
            k=k, bits=bits, block_size=block_size, symmetric=symmetric,
        )  # fmt: skip
        w_ok = np.isfinite(weight).all(axis=-1) & (k * np.abs(weight).max(axis=-1, initial=0.0) <= WEIGHT_ROW_LIMIT)
    a_ok = np.isfinite(a).all(axis=-1)
    return a_ok[..., None] & w_ok


def block_matmul(
    a: np.ndarray | QuantizedTensor,
    w_codes: np.ndarray,
    w_scales: np.ndarray,
    w_zero_points: np.ndarray | None,
    *,
    out_fmt: BlockFormat | None = None,
    **matmul_args: Any,
) -> np.ndarray | QuantizedTensor:
    """BlockMatMul with its operand convention (docs/ops.md): A float or quantized (see matmul_operands),
    Y float32 (out_fmt None) or ``block_format.quantize(Y, out_fmt)`` along N; matmul_args are
    matmul_reference's keyword arguments (k, bits, block_size, symmetric, act_bits, bias).

    Y here is matmul_reference rounded once to float32; the kernels' float32 Y may differ from it by
    accumulation order (tolerance in docs/ops.md), and the requantization of a given Y is exact.
    """
    y = matmul_reference(a, w_codes, w_scales, w_zero_points, **matmul_args).astype(np.float32)
    return y if out_fmt is None else block_format.quantize(y, out_fmt)
