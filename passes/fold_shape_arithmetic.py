"""FoldShapeArithmeticPass: one copy of a decoder's shape arithmetic instead of one per layer.

Exporters (optimum's with-past decoders above all) compute every Reshape target and attention mask
from ``Shape -> Gather -> Unsqueeze -> Concat`` chains, once per layer, on per-layer values. Each
dimension such a chain reads is either static or one of the graph's symbolic dimensions (batch
size, sequence length, past length), whose value is the same wherever it appears (ONNX: one
dim_param, one value). This pass
  1. replaces ``Gather(Shape(x), i)`` (and ``Shape(x, start=i, end=i+1)``) by a constant when dim i
     of x is static, and by one shared value per symbolic dimension, read once from the graph input
     that declares it, when dim i of x is that symbolic dimension (shapes from ONNX shape inference
     with data propagation, on a clone: the model's own value_info is left as it was);
  2. folds small integer nodes whose inputs are all constant (the chains above, now constant);
  3. merges nodes that compute the same thing from the same inputs (common subexpressions), so the
     per-layer copies collapse into one, and drops what is no longer used.
The outputs do not change: every replaced value equals the one it replaces for every valid input.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import CompressPass, PassReport
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
)

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
# Integer nodes folded when all inputs are constant and the result is at most this many elements.
MAX_FOLDED_ELEMENTS = 64
_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL)


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or Constant node output, else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _inferred_shapes(model: ir.Model) -> dict[str, ir.Shape]:
    """value name -> shape from ONNX shape inference (data propagation on) run on a clone."""
    clone = model.clone()
    try:
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    except Exception as error:  # noqa: BLE001 - inference is advisory: without it, static dims only
        logger.warning("shape inference failed (%s); only declared shapes are used", error)
    shapes = {}
    for value in [*clone.graph.inputs, *(o for n in clone.graph for o in n.outputs)]:
        if value.name and value.shape is not None:
            shapes[value.name] = value.shape
    return shapes


def _shape_dim_read(node: ir.Node) -> tuple[ir.Value, int, bool] | None:
    """(x, axis, keep_rank) when node reads one dim of x: Gather(Shape(x), i) with a constant i
    (keep_rank: a 1-element index gives a 1-D result) or Shape(x, start=i, end=i+1)."""
    if node.domain not in DEFAULT_DOMAINS:
        return None
    if node.op_type == "Shape":
        start, end = node.attributes.get("start"), node.attributes.get("end")
        if start is None or end is None or node.inputs[0] is None:
            return None
        if end.as_int() - start.as_int() != 1 or start.as_int() < 0:
            return None
        return node.inputs[0], start.as_int(), True
    if node.op_type != "Gather" or len(node.inputs) != 2:
        return None
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    index = _const(node.inputs[1])
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in DEFAULT_DOMAINS:
        return None
    if index is None or index.size != 1 or shape_node.attributes.get("start") or shape_node.attributes.get("end"):
        return None
    axis = node.attributes.get("axis")
    if (axis.as_int() if axis is not None else 0) != 0 or shape_node.inputs[0] is None:
        return None
    return shape_node.inputs[0], int(index.reshape(-1)[0]), index.ndim == 1


def _fold_numpy(node: ir.Node, arrays: list[np.ndarray]) -> np.ndarray | None:
    """numpy value of a small integer shape-arithmetic node with constant inputs, or None."""
    op = node.op_type

    def attr_ints(name: str) -> list[int] | None:
        attr = node.attributes.get(name)
        return list(attr.as_ints()) if attr is not None else None

    if op in ("Unsqueeze", "Squeeze"):
        axes = [int(a) for a in arrays[1].reshape(-1)] if len(arrays) > 1 else attr_ints("axes")
        if op == "Squeeze":
            return np.squeeze(arrays[0], axis=None if axes is None else tuple(axes))
        if axes is None:
            return None
        rank = arrays[0].ndim + len(axes)
        return np.expand_dims(arrays[0], tuple(sorted(a % rank for a in axes)))
    if op == "Concat":
        axis = node.attributes.get("axis")
        return np.concatenate(arrays, axis=axis.as_int() if axis is not None else 0)
    if op == "Gather":
        axis = node.attributes.get("axis")
        return np.take(arrays[0], arrays[1], axis=axis.as_int() if axis is not None else 0)
    if op == "Cast":
        to = node.attributes.get("to")
        target = ir.DataType(to.as_int()) if to is not None else None
        return arrays[0].astype(target.numpy()) if target in _INT_TYPES else None
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal, "Less": np.less,
              "Greater": np.greater, "And": np.logical_and, "Or": np.logical_or}
    if op in binary and len(arrays) == 2:
        return binary[op](arrays[0], arrays[1])
    if op == "Div" and len(arrays) == 2 and not (arrays[1] == 0).any():
        # ONNX integer Div truncates toward zero
        return (np.trunc(arrays[0] / arrays[1])).astype(arrays[0].dtype)
    if op == "Where" and len(arrays) == 3:
        return np.where(arrays[0], arrays[1], arrays[2])
    if op == "Neg":
        return np.negative(arrays[0])
    if op == "Range" and len(arrays) == 3:
        return np.arange(arrays[0].item(), arrays[1].item(), arrays[2].item(), dtype=arrays[0].dtype)
    return None


class FoldShapeArithmeticPass(CompressPass):
    """Fold static shape reads, share symbolic ones, fold constant integer chains, merge duplicates."""

    def run(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        shapes = _inferred_shapes(model)
        constants: dict[tuple[str, tuple[int, ...], bytes], ir.Value] = {}  # one initializer per value
        shared: dict[tuple[str, bool], ir.Value] = {}  # (dim_param, keep_rank) -> the one value
        sources = self._symbolic_sources(graph)
        for node in list(graph):
            read = _shape_dim_read(node)
            if read is None:
                continue
            x, axis, keep_rank = read
            shape = x.shape if x.shape is not None else shapes.get(x.name or "")
            if shape is None or not 0 <= axis < len(shape):
                continue
            dim = shape[axis]
            if isinstance(dim, int):
                value = np.array([dim] if keep_rank else dim, dtype=np.int64)
                if self._replace(node, self._constant(graph, value, constants)):
                    report.count("static dim read folded")
            elif dim.value is not None and dim.value in sources:
                key = (dim.value, keep_rank)
                if key not in shared:
                    shared[key] = self._shared_dim(graph, *sources[dim.value], keep_rank, constants)
                if shared[key] is not node.outputs[0] and self._replace(node, shared[key]):
                    report.count("symbolic dim read shared")
        report.count("integer node folded", self._fold_constants(graph, constants))
        before = sum(1 for _ in graph)
        CommonSubexpressionEliminationPass()(model)
        RemoveUnusedNodesPass()(model)
        merged = before - sum(1 for _ in graph)
        if merged:
            report.count("nodes merged or removed after folding", merged)
        report.rewritten = {rule: count for rule, count in report.rewritten.items() if count}

    @staticmethod
    def _symbolic_sources(graph: ir.Graph) -> dict[str, tuple[ir.Value, int]]:
        """dim_param -> (graph input, axis) declaring it (first one wins)."""
        sources: dict[str, tuple[ir.Value, int]] = {}
        for value in graph.inputs:
            for axis, dim in enumerate(value.shape or ()):
                if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                    sources.setdefault(dim.value, (value, axis))
        return sources

    @staticmethod
    def _constant(graph: ir.Graph, array: np.ndarray, constants: dict[Any, ir.Value]) -> ir.Value:
        """An initializer holding array (one per distinct value and dtype)."""
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in constants:
            name = f"bct_shape_const_{len(constants)}"
            while name in graph.initializers:
                name += "_"
            value = ir.Value(
                name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                const_value=ir.tensor(array, name=name),
            )
            graph.register_initializer(value)
            constants[key] = value
        return constants[key]

    def _shared_dim(
        self, graph: ir.Graph, source: ir.Value, axis: int, keep_rank: bool, constants: dict[Any, ir.Value]
    ) -> ir.Value:
        """Shape(source, start=axis, end=axis+1) (1-D) or its Squeeze (scalar), at the graph's start."""
        name = f"{source.name}.dim{axis}"
        shape_node = ir.node("Shape", [source], attributes={"start": axis, "end": axis + 1}, name=f"{name}.Shape")
        shape_node.outputs[0].name = name + ("" if keep_rank else ".1d")
        graph.insert_before(next(iter(graph)), shape_node)
        if keep_rank:
            return shape_node.outputs[0]
        axes = self._constant(graph, np.array([0], dtype=np.int64), constants)
        squeeze = ir.node("Squeeze", [shape_node.outputs[0], axes], name=f"{name}.Squeeze")
        squeeze.outputs[0].name = name
        graph.insert_after(shape_node, squeeze)
        return squeeze.outputs[0]

    @staticmethod
    def _replace(node: ir.Node, value: ir.Value) -> bool:
        """Point the users of node's output at value; a graph output itself is kept (its name is
        the contract). Returns whether anything was replaced."""
        old = node.outputs[0]
        if old.is_graph_output():
            return False
        ir.convenience.replace_all_uses_with(old, value)
        return True

    def _fold_constants(self, graph: ir.Graph, constants: dict[Any, ir.Value]) -> int:
        folded = 0
        for node in list(graph):
            if node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1 or node.outputs[0].is_graph_output():
                continue
            arrays = [_const(v) for v in node.inputs if v is not None]
            if not arrays or any(a is None for a in arrays) or any(a.size > MAX_FOLDED_ELEMENTS for a in arrays):
                continue
            if any(a.dtype.kind not in "iub" for a in arrays):
                continue
            try:
                result: Any = _fold_numpy(node, arrays)
            except (ValueError, IndexError, TypeError):
                result = None
            if result is None or np.asarray(result).size > MAX_FOLDED_ELEMENTS:
                continue
            folded += self._replace(node, self._constant(graph, np.asarray(result), constants))
        return folded
