"""Helpers for pass tests: models from ONNX text, a numpy evaluator of our ops, ORT runs.

The numpy evaluator (onnx.reference with BlockMatMul / BlockGather implemented from
``bct_onnx.block_format``) is the spec side. When the custom-op library is available, the same
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

from bct_onnx.block_format import BlockFormat, ScaleKind, dequantize_codes, fake_quantize, unpack_codes
from bct_onnx.ops import DOMAIN

_SCALE_KINDS = {
    np.dtype(np.float16): ScaleKind.FLOAT16,
    np.dtype(np.float32): ScaleKind.FLOAT32,
    np.dtype(np.uint8): ScaleKind.POW2,
}


def _dequantized(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    symmetric: int,
    axis_size: int,
) -> np.ndarray:
    fmt = BlockFormat(int(bits), int(block_size), bool(symmetric), _SCALE_KINDS[scales.dtype])
    return dequantize_codes(unpack_codes(codes, fmt.bits, axis_size), scales, zero_points, fmt)


class BlockMatMul(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        A,
        W_codes,
        W_scales,
        W_zero_points=None,
        bias=None,
        K=None,
        N=None,
        bits=None,
        block_size=None,
        symmetric=None,
        act_bits=None,
    ):
        weight = _dequantized(W_codes, W_scales, W_zero_points, bits, block_size, symmetric, K)  # [N, K]
        a = A.astype(np.float32)
        if act_bits:
            a = fake_quantize(a, BlockFormat(int(act_bits), int(block_size), True, ScaleKind.FLOAT32))
        y = a.astype(np.float64) @ weight.T.astype(np.float64)
        if bias is not None:
            y = y + bias.astype(np.float64)
        return (y.astype(np.float32),)


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
    evaluator = ReferenceEvaluator(ir.to_proto(model), new_ops=[BlockMatMul, BlockGather])
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
