"""Run a compressed model in numpy, without the compiled library: onnx.reference plus our ops.

``OPS`` holds one ``onnx.reference`` op class per operator of the ``ai.bct_onnx`` domain, computed by
the numpy specification (``block_format``, ``reference_ops``, ``reference_nonlinear``), with the
operand convention of docs/ops.md (float or blockwise-quantized inputs and outputs). Standard ONNX
ops are onnx.reference's own::

    from bct_onnx import reference
    outputs = reference.run(model, {"input_ids": ids})  # model: path, ModelProto or onnx_ir.Model

Slow (numpy, one node at a time): meant for checking a kernel or a small model, not for serving.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bct_onnx import code_entropy, ops
from bct_onnx import reference_attention as spec_attention
from bct_onnx import reference_fused as spec_fused
from bct_onnx import reference_nonlinear as spec_nonlinear
from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    ScaleKind,
    ZeroPointKind,
    dequantize_codes,
    quantize,
    scale_kind_of,
    unpack_codes,
    unpack_zero_points,
)
from bct_onnx.reference_ops import block_matmul

__all__ = ["OPS", "evaluator", "run"]


def _stored_format(bits, block_size, symmetric, scales, zero_points) -> BlockFormat:
    """The format of stored codes; the dtypes of scales and zero points tell their kinds."""
    float_offsets = zero_points is not None and zero_points.dtype != np.uint8
    return BlockFormat(
        int(bits),
        int(block_size),
        True if symmetric is None else bool(symmetric),
        scale_kind_of(scales),
        ZeroPointKind.FLOAT if float_offsets else ZeroPointKind.INTEGER,
    )


def _packed(codes, attrs: dict[str, Any], row_length: int) -> np.ndarray:
    """Packed codes of a BlockMatMul / BlockGather codes input (decoded when codes_coding says so)."""
    coding = attrs.get("codes_coding") or "none"
    if isinstance(coding, bytes):
        coding = coding.decode()
    if coding == "none":
        return codes
    if coding != code_entropy.CODING:
        raise ValueError(f"codes_coding must be 'none' or '{code_entropy.CODING}', got {coding!r}")
    return code_entropy.decode_packed(codes, int(attrs["bits"]), row_length)


def _zero_points(zero_points, scales, attrs: dict[str, Any]):
    """One zero point a block (unpacked when zero_points_packed says they are stored packed)."""
    if zero_points is None or not attrs.get("zero_points_packed"):
        return zero_points
    return unpack_zero_points(zero_points, int(attrs["bits"]), np.shape(scales))


def _dequantized(codes, scales, zero_points, attrs: dict[str, Any]) -> np.ndarray:
    """The float32 values of a stored tensor (BlockDequantize, BlockGather) as its attributes describe it."""
    codes = _packed(codes, attrs, int(attrs["axis_size"]))
    zero_points = _zero_points(zero_points, scales, attrs)
    fmt = _stored_format(attrs["bits"], attrs["block_size"], attrs.get("symmetric"), scales, zero_points)
    return dequantize_codes(unpack_codes(codes, fmt.bits, int(attrs["axis_size"])), scales, zero_points, fmt)


def _operand(x, x_scales, x_zero_points, bits, block_size, symmetric, axis_size):
    """Inputs 0..2 of an op with the operand convention: float x, or a QuantizedTensor (in_bits > 0)."""
    if not bits:
        return x
    d = int(axis_size) if axis_size else x.shape[-1] * 8 // int(bits)
    fmt = _stored_format(bits, block_size, symmetric, x_scales, x_zero_points)
    return QuantizedTensor(x, x_scales, x_zero_points, d, fmt)


def _out_format(bits, block_size, symmetric, scale_kind) -> BlockFormat | None:
    """The format of a quantized result (out_bits > 0), None for a float result."""
    if not bits:
        return None
    sym = True if symmetric is None else bool(symmetric)
    return BlockFormat(int(bits), int(block_size), sym, ScaleKind(scale_kind or "float16"))


def _result(y: np.ndarray | QuantizedTensor) -> tuple[np.ndarray, ...]:
    if isinstance(y, QuantizedTensor):
        return (y.codes, y.scales) + (() if y.zero_points is None else (y.zero_points,))
    return (y,)


class _BlockOp(OpRun):
    op_domain = ops.DOMAIN


class BlockQuantize(_BlockOp):
    def _run(self, X, bits=None, block_size=None, symmetric=None, scale_kind=None):
        return _result(quantize(X, _out_format(bits, block_size, symmetric, scale_kind)))


class BlockDequantize(_BlockOp):
    def _run(self, codes, scales, zero_points=None, **attrs):
        return (_dequantized(codes, scales, zero_points, attrs),)


class BlockGather(_BlockOp):
    def _run(self, indices, codes, scales, zero_points=None, **attrs):
        return (np.take(_dequantized(codes, scales, zero_points, attrs), indices.astype(np.int64), axis=0),)


class BlockMatMul(_BlockOp):
    """A float or codes (inputs 0, 5, 6: the weight keeps inputs 1..4), Y float or codes."""

    def _run(
        self, A, W_codes, W_scales, W_zero_points=None, bias=None, A_scales=None, A_zero_points=None, **attrs
    ):
        k = int(attrs["K"])
        a = _operand(
            A,
            A_scales,
            A_zero_points,
            attrs.get("in_bits"),
            attrs.get("in_block_size"),
            attrs.get("in_symmetric"),
            k,
        )
        y = block_matmul(
            a,
            _packed(W_codes, attrs, k),
            W_scales,
            _zero_points(W_zero_points, W_scales, attrs),
            k=k,
            bits=int(attrs["bits"]),
            block_size=int(attrs["block_size"]),
            symmetric=bool(attrs.get("symmetric", 1)),
            act_bits=int(attrs.get("act_bits") or 0),
            bias=bias,
        )
        epilogue = attrs.get("epilogue") or "none"
        if isinstance(epilogue, bytes):
            epilogue = epilogue.decode()
        return _out(spec_fused.matmul_epilogue(y, epilogue), attrs)


def _in_operand(x, x_scales, x_zero_points, attrs: dict[str, Any]):
    """The operand of inputs 0..2 as the node's in_* attributes describe it."""
    return _operand(
        x,
        x_scales,
        x_zero_points,
        attrs.get("in_bits"),
        attrs.get("in_block_size"),
        attrs.get("in_symmetric"),
        attrs.get("in_axis_size"),
    )


def _out(y: np.ndarray, attrs: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """The float32 result y stored as the node's out_* attributes ask."""
    fmt = _out_format(
        attrs.get("out_bits"),
        attrs.get("out_block_size"),
        attrs.get("out_symmetric"),
        attrs.get("out_scale_kind"),
    )
    return _result(spec_nonlinear.store_result(y, fmt))


def _last_axis(axis, op_type: str) -> None:
    if axis is not None and int(axis) != -1:
        raise ValueError(f"{op_type}: axis must be -1, got {axis}")


class BlockGelu(_BlockOp):
    def _run(self, X, X_scales=None, X_zero_points=None, approximate=None, **attrs):
        x = spec_nonlinear.load_operand(_in_operand(X, X_scales, X_zero_points, attrs))
        return _out(spec_nonlinear.gelu(x, approximate or "none"), attrs)


class BlockSilu(_BlockOp):
    def _run(self, X, X_scales=None, X_zero_points=None, **attrs):
        x = spec_nonlinear.load_operand(_in_operand(X, X_scales, X_zero_points, attrs))
        return _out(spec_nonlinear.silu(x), attrs)


class BlockSoftmax(_BlockOp):
    def _run(self, X, X_scales=None, X_zero_points=None, axis=None, **attrs):
        _last_axis(axis, ops.BLOCK_SOFTMAX)
        x = spec_nonlinear.load_operand(_in_operand(X, X_scales, X_zero_points, attrs))
        return _out(spec_nonlinear.softmax(x), attrs)


class BlockLayerNorm(_BlockOp):
    def _run(
        self, X, X_scales=None, X_zero_points=None, scale=None, bias=None, epsilon=None, axis=None, **attrs
    ):
        _last_axis(axis, ops.BLOCK_LAYER_NORM)
        x = spec_nonlinear.load_operand(_in_operand(X, X_scales, X_zero_points, attrs))
        return _out(
            spec_nonlinear.layer_norm(x, scale, bias, 1e-5 if epsilon is None else float(epsilon)), attrs
        )


class BlockRMSNorm(_BlockOp):
    def _run(self, X, X_scales=None, X_zero_points=None, scale=None, epsilon=None, axis=None, **attrs):
        _last_axis(axis, ops.BLOCK_RMS_NORM)
        x = spec_nonlinear.load_operand(_in_operand(X, X_scales, X_zero_points, attrs))
        eps = 1e-5 if epsilon is None else float(epsilon)  # the kernel's default (docs/ops.md)
        return _out(spec_nonlinear.rms_norm(x, scale, eps), attrs)


def _with_sum(result, total: np.ndarray, attrs: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """Outputs 0..2 as _out gives them, zero-point slot padded, then the float32 sum as output 3."""
    outputs = _out(result, attrs)
    return (*outputs, *([np.zeros(0, np.uint8)] * (3 - len(outputs))), total)  # slot 2 omitted (named by evaluator)


class BlockAddLayerNorm(_BlockOp):
    def _run(
        self, X, X_scales=None, X_zero_points=None, skip=None, scale=None, bias=None, epsilon=None, axis=None,
        **attrs,
    ):  # fmt: skip
        _last_axis(axis, ops.BLOCK_ADD_LAYER_NORM)
        total = spec_fused.add_skip(_in_operand(X, X_scales, X_zero_points, attrs), skip)
        eps = 1e-5 if epsilon is None else float(epsilon)
        return _with_sum(spec_nonlinear.layer_norm(total, scale, bias, eps), total, attrs)[: len(self.output)]


class BlockAddRMSNorm(_BlockOp):
    def _run(self, X, X_scales=None, X_zero_points=None, skip=None, scale=None, epsilon=None, axis=None, **attrs):
        _last_axis(axis, ops.BLOCK_ADD_RMS_NORM)
        total = spec_fused.add_skip(_in_operand(X, X_scales, X_zero_points, attrs), skip)
        eps = 1e-5 if epsilon is None else float(epsilon)
        return _with_sum(spec_nonlinear.rms_norm(total, scale, eps), total, attrs)[: len(self.output)]


class BlockActMatMul(_BlockOp):
    def _run(
        self,
        A,
        A_scales=None,
        A_zero_points=None,
        B=None,
        act_bits=None,
        block_size=None,
        transpose_b=None,
        **attrs,
    ):
        a = spec_nonlinear.load_operand(_in_operand(A, A_scales, A_zero_points, attrs))
        y = spec_nonlinear.act_matmul(a, B, int(act_bits), int(block_size), bool(transpose_b or 0))
        return _out(y, attrs)


class BlockAttention(_BlockOp):
    """Q float32; K and V float32 or codes along the head size (kv_* attributes); optional mask."""

    def _run(
        self, Q, K, K_scales=None, K_zero_points=None, V=None, V_scales=None, V_zero_points=None, mask=None, **attrs
    ):
        dh = int(Q.shape[-1])
        kv = [attrs.get("kv_bits"), attrs.get("kv_block_size"), attrs.get("kv_symmetric"), dh]
        y = spec_attention.attention(
            Q,
            _operand(K, K_scales, K_zero_points, *kv),
            _operand(V, V_scales, V_zero_points, *kv),
            act_bits=int(attrs["act_bits"]),
            block_size=int(attrs["block_size"]),
            scale=float(attrs.get("scale", 1.0)),
            mask=mask,
            causal=bool(attrs.get("causal") or 0),
        )
        return (y,)


OPS: tuple[type[OpRun], ...] = (
    BlockQuantize,
    BlockDequantize,
    BlockMatMul,
    BlockGather,
    BlockGelu,
    BlockSilu,
    BlockSoftmax,
    BlockLayerNorm,
    BlockRMSNorm,
    BlockActMatMul,
    BlockAddLayerNorm,
    BlockAddRMSNorm,
    BlockAttention,
)
if {op.__name__ for op in OPS} != set(ops.OP_TYPES):  # onnx.reference finds an op by its class name
    raise ImportError(f"bct_onnx.reference covers {sorted(op.__name__ for op in OPS)}, not {ops.OP_TYPES}")


def evaluator(model: str | os.PathLike[str] | onnx.ModelProto | Any, **options: Any) -> ReferenceEvaluator:
    """An onnx.reference.ReferenceEvaluator of model (a path, a ModelProto or an onnx_ir.Model) with our ops."""
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        import onnx_ir as ir

        model = ir.to_proto(model)
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    return ReferenceEvaluator(_name_omitted_outputs(model), new_ops=list(OPS), **options)


def _name_omitted_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose omitted outputs before a present one (the Add + norm ops' zero-point slot before
    the sum) have names: onnx.reference would bind a value to the name '', which omitted inputs read."""
    if not any(
        "" in list(node.output)[:-1] for node in model.graph.node if node.domain == ops.DOMAIN
    ):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    count = 0
    for node in copy.graph.node:
        for index, name in enumerate(node.output):
            if not name and node.domain == ops.DOMAIN and index < len(node.output) - 1:
                node.output[index] = f"__bct_omitted_output_{count}"
                count += 1
    return copy


def run(
    model: str | os.PathLike[str] | onnx.ModelProto | Any, feeds: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """Every output of model for feeds, computed in numpy (see evaluator)."""
    return [np.asarray(out) for out in evaluator(model).run(None, feeds)]
