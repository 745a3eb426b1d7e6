"""Helpers for pass tests: models from ONNX text, a numpy evaluator of our ops, ORT runs.

The numpy evaluator (onnx.reference with BlockMatMul, BlockGather, BlockLayerNorm and BlockGelu
implemented from ``bct_onnx.reference_ops`` / ``reference_nonlinear``, float or quantized operands
and results) is the spec side. When the custom-op library is available, the same
compressed models also run through ``bct_onnx.session`` and are compared with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bct_onnx import reference_nonlinear as spec_nonlinear
from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    ScaleKind,
    dequantize_codes,
    scale_kind_of,
    unpack_codes,
)
from bct_onnx.ops import DOMAIN
from bct_onnx.reference_ops import block_matmul


def _dequantized(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    symmetric: int,
    axis_size: int,
) -> np.ndarray:
    float_offsets = zero_points is not None and zero_points.dtype != np.uint8  # float16/float32 offsets
    fmt = BlockFormat(
        int(bits),
        int(block_size),
        bool(symmetric),
        scale_kind_of(scales),
        "float" if float_offsets else "integer",
    )
    return dequantize_codes(unpack_codes(codes, fmt.bits, axis_size), scales, zero_points, fmt)


class BlockMatMul(OpRun):
    """BlockMatMul with the operand convention: A float or codes (inputs 0, 5, 6), Y float or codes."""

    op_domain = DOMAIN

    def _run(
        self,
        A,
        W_codes,
        W_scales,
        W_zero_points=None,
        bias=None,
        A_scales=None,
        A_zero_points=None,
        K=None,
        N=None,
        bits=None,
        block_size=None,
        symmetric=None,
        act_bits=None,
        in_bits=None,
        in_block_size=None,
        in_symmetric=None,
        in_axis_size=None,
        out_bits=None,
        out_block_size=None,
        out_symmetric=None,
        out_scale_kind=None,
    ):
        a: np.ndarray | QuantizedTensor = A
        if in_bits:
            in_sym = True if in_symmetric is None else bool(in_symmetric)
            fmt = BlockFormat(int(in_bits), int(in_block_size), in_sym, scale_kind_of(A_scales))
            a = QuantizedTensor(A, A_scales, A_zero_points, int(K), fmt)
        y = block_matmul(
            a,
            W_codes,
            W_scales,
            W_zero_points,
            k=int(K),
            bits=int(bits),
            block_size=int(block_size),
            symmetric=bool(symmetric),
            act_bits=int(act_bits or 0),
            bias=bias,
            out_fmt=_out_format(out_bits, out_block_size, out_symmetric, out_scale_kind),
        )
        if isinstance(y, QuantizedTensor):
            return (y.codes, y.scales) + (() if y.zero_points is None else (y.zero_points,))
        return (y,)


def _out_format(bits, block_size, symmetric, scale_kind) -> BlockFormat | None:
    if not bits:
        return None
    sym = True if symmetric is None else bool(symmetric)
    return BlockFormat(int(bits), int(block_size), sym, ScaleKind(scale_kind or "float16"))


def _operand(X, X_scales, X_zero_points, bits, block_size, symmetric, axis_size):
    """Input 0..2 of an operand op as the spec's operand: float X or a QuantizedTensor."""
    if not bits:
        return X
    d = int(axis_size) if axis_size else X.shape[-1] * 8 // int(bits)
    sym = True if symmetric is None else bool(symmetric)
    fmt = BlockFormat(int(bits), int(block_size), sym, scale_kind_of(X_scales))
    return QuantizedTensor(X, X_scales, X_zero_points, d, fmt)


def _result(y) -> tuple:
    if isinstance(y, QuantizedTensor):
        return (y.codes, y.scales) + (() if y.zero_points is None else (y.zero_points,))
    return (y,)


class BlockLayerNorm(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        X,
        X_scales=None,
        X_zero_points=None,
        scale=None,
        bias=None,
        epsilon=None,
        axis=None,
        in_bits=None,
        in_block_size=None,
        in_symmetric=None,
        in_axis_size=None,
        out_bits=None,
        out_block_size=None,
        out_symmetric=None,
        out_scale_kind=None,
    ):
        x = _operand(X, X_scales, X_zero_points, in_bits, in_block_size, in_symmetric, in_axis_size)
        eps = 1e-5 if epsilon is None else float(epsilon)
        out = _out_format(out_bits, out_block_size, out_symmetric, out_scale_kind)
        return _result(spec_nonlinear.block_layer_norm(x, scale, bias, eps, out))


class BlockGelu(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        X,
        X_scales=None,
        X_zero_points=None,
        approximate=None,
        in_bits=None,
        in_block_size=None,
        in_symmetric=None,
        in_axis_size=None,
        out_bits=None,
        out_block_size=None,
        out_symmetric=None,
        out_scale_kind=None,
    ):
        x = _operand(X, X_scales, X_zero_points, in_bits, in_block_size, in_symmetric, in_axis_size)
        out = _out_format(out_bits, out_block_size, out_symmetric, out_scale_kind)
        return _result(spec_nonlinear.block_gelu(x, approximate or "none", out))


class BlockGather(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        indices,
        codes,
        scales,
        zero_points=None,
        bits=None,
        block_size=None,
        symmetric=None,
        axis_size=None,
    ):
        table = _dequantized(codes, scales, zero_points, bits, block_size, symmetric, axis_size)
        return (np.take(table, indices.astype(np.int64), axis=0),)


def model_from_text(
    text: str, initializers: dict[str, np.ndarray] | None = None, check: bool = True
) -> ir.Model:
    """An onnx_ir model from ONNX text plus named numpy initializers (onnx-checked unless check=False)."""
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    if check:
        onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def run_reference(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate a model (standard ops and ours) with numpy."""
    evaluator = ReferenceEvaluator(
        ir.to_proto(model), new_ops=[BlockMatMul, BlockGather, BlockLayerNorm, BlockGelu]
    )
    return [np.asarray(out) for out in evaluator.run(None, feeds)]


def run_ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model of standard ops only with plain onnxruntime."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _library_available() -> str | None:
    try:
        from bct_onnx.runtime import library_path

        library_path()
    except (ImportError, FileNotFoundError) as error:
        return str(error)
    return None


def run_bct_session(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a compressed model through onnxruntime with the custom-op library; skips visibly without it."""
    problem = _library_available()
    if problem is not None:
        pytest.skip(f"custom-op library not available, ORT run not possible: {problem}")
    from bct_onnx.runtime import session

    return session(ir.to_proto(model).SerializeToString()).run(None, feeds)


@pytest.fixture
def helpers() -> Any:
    class Helpers:
        model_from_text: Callable[..., ir.Model] = staticmethod(model_from_text)
        op_types: Callable[[ir.Model], list[str]] = staticmethod(op_types)
        run_reference = staticmethod(run_reference)
        run_ort = staticmethod(run_ort)
        run_bct_session = staticmethod(run_bct_session)

    return Helpers
