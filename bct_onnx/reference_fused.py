"""Numpy specification of the fused ops: each is the chain of unfused ops it replaces, written in the
kernels' order (docs/ops.md says where a fused op is bit-exact to that chain and where not).

- BlockMatMul's ``epilogue`` attribute: BlockMatMul (float Y) -> GELU, or -> SiLU(gate) * up for a
  weight holding the gate rows, then the up rows (Llama's MLP), -> optional requantization.
- BlockAddLayerNorm / BlockAddRMSNorm: dequantize the operand -> Add (float32) the residual ->
  BlockLayerNorm / BlockRMSNorm's compute step -> optional requantization; the sum is a second output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bct_onnx import reference_nonlinear as nl
from bct_onnx.block_format import BlockFormat, QuantizedTensor
from bct_onnx.reference_ops import block_matmul

EPILOGUES = ("none", "gelu", "gelu_tanh", "silu_gate")


def epilogue_width(epilogue: str, n: int) -> int:
    """Output columns of an epilogue over n product columns (silu_gate halves them)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if epilogue == "silu_gate":
        if n % 2:
            raise ValueError(f"epilogue silu_gate needs an even N (gate rows, then up rows), got {n}")
        return n // 2
    return n


def matmul_epilogue(p: np.ndarray, epilogue: str) -> np.ndarray:
    """The float32 epilogue of the product p [..., N]: BlockGelu's / BlockSilu's formulas
    (reference_nonlinear), silu_gate as ``silu(p[..., :N/2]) * p[..., N/2:]`` (one float32 product)."""
    p = np.asarray(p, np.float32)
    width = epilogue_width(epilogue, p.shape[-1])
    if epilogue == "gelu":
        return nl.gelu(p, "none")
    if epilogue == "gelu_tanh":
        return nl.gelu(p, "tanh")
    if epilogue == "silu_gate":
        return (nl.silu(p[..., :width]) * p[..., width:]).astype(np.float32)
    return p


def block_matmul_epilogue(
    a: np.ndarray | QuantizedTensor,
    w_codes: np.ndarray,
    w_scales: np.ndarray,
    w_zero_points: np.ndarray | None,
    *,
    epilogue: str = "none",
    out_fmt: BlockFormat | None = None,
    **matmul_args: Any,
) -> np.ndarray | QuantizedTensor:
    """BlockMatMul with an epilogue: block_matmul (float Y, bias included) -> matmul_epilogue ->
    store_result. As for block_matmul, the kernels' float product may differ from this one by
    accumulation order; given the same product the epilogue and the requantization are exact."""
    p = block_matmul(a, w_codes, w_scales, w_zero_points, **matmul_args)
    return nl.store_result(matmul_epilogue(p, epilogue), out_fmt)


def concat_gate_up(
    gate: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    up: tuple[np.ndarray, np.ndarray, np.ndarray | None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The weight of a silu_gate BlockMatMul: gate's (codes, scales, zero points) rows, then up's."""
    codes = np.concatenate([gate[0], up[0]], axis=0)
    scales = np.concatenate([gate[1], up[1]], axis=0)
    if (gate[2] is None) != (up[2] is None):
        raise ValueError("gate and up weights must both have zero points or neither")
    zero_points = None if gate[2] is None else np.concatenate([gate[2], up[2]], axis=0)
    return codes, scales, zero_points


def add_skip(x: np.ndarray | QuantizedTensor, skip: np.ndarray) -> np.ndarray:
    """The residual sum of the Add + norm ops: load_operand(x) + skip in float32 (ONNX Add). skip has
    x's shape or broadcasts to it over leading dims only (SkipLayerNormalization's [1, S, D] or [S, D]):
    without its leading 1s, its shape is a suffix of x's."""
    v = nl.load_operand(x)
    skip = np.asarray(skip, np.float32)
    dims = list(skip.shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    if not dims or len(dims) > v.ndim or tuple(dims) != v.shape[v.ndim - len(dims) :]:
        raise ValueError(
            f"skip must have the operand's shape {v.shape} or broadcast to it over leading dims, got {skip.shape}"
        )
    return (v + skip.reshape(dims)).astype(np.float32)


def block_add_layer_norm(
    x, skip, scale, bias=None, epsilon: float = 1e-5, out_fmt: BlockFormat | None = None
) -> tuple[np.ndarray | QuantizedTensor, np.ndarray]:
    """BlockAddLayerNorm: (the normalized result, stored as out_fmt asks; the float32 sum x + skip)."""
    v = add_skip(x, skip)
    return nl.store_result(nl.layer_norm(v, scale, bias, epsilon), out_fmt), v


def block_add_rms_norm(
    x, skip, scale, epsilon: float = 1e-5, out_fmt: BlockFormat | None = None
) -> tuple[np.ndarray | QuantizedTensor, np.ndarray]:
    """BlockAddRMSNorm: (the normalized result, stored as out_fmt asks; the float32 sum x + skip)."""
    v = add_skip(x, skip)
    return nl.store_result(nl.rms_norm(v, scale, epsilon), out_fmt), v
