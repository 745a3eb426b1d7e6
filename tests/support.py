"""What the tests share: models from ONNX text, runs through ONNX Runtime and the numpy reference, checks.

Imported as ``support`` (pyproject's pytest ``pythonpath`` puts tests/ on sys.path; importlib mode
cannot import a conftest). The numpy side is ``bct_onnx.reference``, the library's own evaluator.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import bct_onnx
from bct_onnx import reference
from bct_onnx.ops import BLOCK_MATMUL, DOMAIN


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
    """The op types of the main graph's nodes, in order."""
    return [node.op_type for node in model.graph]


def run_reference(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate a model (standard ops and ours) in numpy: bct_onnx.reference."""
    return reference.run(model, feeds)


def run_ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model of standard ops only with plain onnxruntime."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_bct_session(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a compressed model through onnxruntime with the custom-op library (tests/conftest.py checks it)."""
    return bct_onnx.session(ir.to_proto(model).SerializeToString()).run(None, feeds)


def ort_feed(value: np.ndarray) -> np.ndarray | ort.OrtValue:
    """value as ONNX Runtime takes it: float8e5m2 arrays (ml_dtypes) go in as typed OrtValues."""
    if isinstance(value, np.ndarray) and value.dtype == np.dtype(ml_dtypes.float8_e5m2):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(value).view(np.uint8), onnx_element_type=TensorProto.FLOAT8E5M2
        )
    return value


def run(model: bytes, feeds: dict[str, np.ndarray], providers: list[str] | None = None) -> list[np.ndarray]:
    """Run serialized model bytes through bct_onnx.session (float8e5m2 feeds allowed)."""
    return bct_onnx.session(model, providers=providers).run(None, {k: ort_feed(v) for k, v in feeds.items()})


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Same dtype, shape and raw bits (so -0.0 != 0.0 and NaNs compare by payload)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.size == 0:
        return
    a = np.ascontiguousarray(actual).view(np.uint8).reshape(actual.size, -1)
    e = np.ascontiguousarray(expected).view(np.uint8).reshape(expected.size, -1)
    bad = np.flatnonzero(np.any(a != e, axis=1))
    if bad.size:
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.size} of {actual.size} elements differ; first at flat {i}: "
            f"got {actual.reshape(-1)[i]!r}, expected {expected.reshape(-1)[i]!r}"
        )


def weight_matmul_model(
    *, k: int, n: int, bits: int, block_size: int, symmetric: bool, act_bits: int, codes: np.ndarray,
    scales: np.ndarray, zero_points: np.ndarray | None, bias: np.ndarray | None, constant_weights: bool = True,
    node_name: str = "mm", **attrs: Any,
) -> bytes:
    """One BlockMatMul; weights as initializers (constant) or graph inputs; extra attributes as given."""
    weights = {"W_codes": codes, "W_scales": scales, "W_zero_points": zero_points, "bias": bias}
    names = [name if value is not None else "" for name, value in weights.items()]
    while names[-1] == "":
        names.pop()
    node = helper.make_node(
        BLOCK_MATMUL, ["A", *names], ["Y"], domain=DOMAIN, name=node_name, K=k, N=n, bits=bits,
        block_size=block_size, symmetric=int(symmetric), act_bits=act_bits, **attrs,
    )
    present = {name: value for name, value in weights.items() if value is not None}
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)]
    if not constant_weights:
        inputs += [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), None)
            for name, v in present.items()
        ]
    inits = [numpy_helper.from_array(v, name) for name, v in present.items()] if constant_weights else []
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return model.SerializeToString()


def run_matmul(model: bytes, a: np.ndarray) -> np.ndarray:
    return bct_onnx.session(model).run(None, {"A": a})[0]


def covering_pairs(*axes: Any) -> list[tuple[Any, ...]]:
    """Rows (one value per axis) in which every pair of values of any two axes appears at least once:
    a pairwise covering set in place of the full cross product (every value of every axis runs, and
    every two-axis combination, in about max |axis_i| * |axis_j| rows instead of prod |axis_i|).

    Deterministic (greedy, ties to the first value), so test ids stay stable between runs. An axis
    of one value is allowed; tests/test_support_covering.py checks the covering property.
    """
    axes_list = [list(axis) for axis in axes]
    sizes = [len(axis) for axis in axes_list]
    n = len(sizes)
    if n == 0 or min(sizes) == 0:
        return []
    if n == 1:
        return [(value,) for value in axes_list[0]]
    uncovered = {(i, a, j, b) for i in range(n) for j in range(i + 1, n) for a in range(sizes[i]) for b in range(sizes[j])}
    rows: list[list[int]] = []
    while uncovered:
        # start from the first uncovered pair, then give every other axis the value covering most new pairs
        i0, a0, j0, b0 = min(uncovered)
        row: list[int | None] = [None] * n
        row[i0], row[j0] = a0, b0
        for k in range(n):
            if row[k] is not None:
                continue
            best, best_gain = 0, -1
            for v in range(sizes[k]):
                gain = sum(
                    ((min(k, m), v if k < m else row[m], max(k, m), row[m] if k < m else v) in uncovered)
                    for m in range(n) if row[m] is not None
                )
                if gain > best_gain:
                    best, best_gain = v, gain
            row[k] = best
        full = [int(v) for v in row if v is not None]
        rows.append(full)
        uncovered -= {(i, full[i], j, full[j]) for i in range(n) for j in range(i + 1, n)}
    return [tuple(axes_list[k][v] for k, v in enumerate(row)) for row in rows]
