"""RemoveBroadcastExpandsPass: an Expand whose readers broadcast anyway is dropped (they read its input).

BERT exports expand the attention mask [B, 1, 1, S] to [B, 1, S, S] and compute ``(1 - mask) *
lowest`` on every element of the expanded tensor, only for attention to broadcast it over the heads;
sentence-transformers' normalization expands the norms [B, 1] to Shape(x) to divide x by them. An
Expand(x, shape) is removed when every path from its result runs through elementwise nodes (unary, or
whose other inputs are single-value constants or on the paths too), or through the indices of a
Gather along axis 0, and ends at a node that broadcasts it back: BlockAttention's mask input (the op
broadcasts the mask to [B, H, Sq, Sk]), or a broadcasting elementwise node one of whose other inputs
already has the expanded shape (it is the v of ``shape = Shape(v)``, or its declared / inferred
shape equals the node's result shape, every dim known). Such a path computes, from the unexpanded x,
the same values on fewer elements, and the end broadcasts them back: the outputs do not change. The
shapes recorded for the values on the paths are cleared (they shrink) and inferred again. An Expand
read any other way stays (``expand_paths`` says why). It runs after FuseAttentionPass, whose
BlockAttention is the mask's broadcasting reader.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from bct_onnx.passes.framework import DEFAULT_DOMAINS, CompressPass, PassReport
from bct_onnx.passes.graph_patterns import SHAPE_KEY, value_shape
from bct_onnx.passes.infer_shapes import annotate_shapes, ensure_shapes

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "Expand read only through broadcasting nodes (removed)"
# docs/ops.md: BlockAttention's inputs Q, K, K scales, K zero points, V, V scales, V zero points, mask.
ATTENTION_MASK_INPUT = 7

# Elementwise nodes the smaller tensor may flow through (value by value, the same result).
_UNARY = frozenset(
    {"Cast", "Not", "Neg", "Abs", "Identity", "Sqrt", "Exp", "Log", "Reciprocal", "Relu", "Sigmoid", "Tanh", "Erf"}
)  # fmt: skip
_BROADCASTING = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
     "And", "Or", "Xor", "Max", "Min"}
)  # fmt: skip


def _known_shape(value: ir.Value | None) -> tuple[int | str, ...] | None:
    """Every dim of value's shape (int, or a symbolic dim's name), or None when any is unknown."""
    shape = value_shape(value)
    if shape is None:
        return None
    dims: list[int | str] = []
    for dim in shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif isinstance(dim, ir.SymbolicDim) and dim.value:
            dims.append(dim.value)
        else:
            return None
    return tuple(dims)


def _single_value(value: ir.Value | None, max_rank: int) -> bool:
    """A constant of one element and rank <= max_rank (it broadcasts without enlarging anything)."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return tensor is not None and tensor.size == 1 and len(tensor.shape) <= max_rank


def _computed_from(start: ir.Value) -> set[int]:
    """ids of the values computed (through any nodes) from start."""
    found = {id(start)}
    pending = [start]
    while pending:
        for use in pending.pop().uses():
            for out in use.node.outputs:
                if id(out) not in found:
                    found.add(id(out))
                    pending.append(out)
    return found


def _shape_source(target: ir.Value | None) -> ir.Value | None:
    """v when target is Shape(v) (whole shape): an Expand to it has v's shape."""
    node = target.producer() if target is not None else None
    if node is None or node.op_type != "Shape" or node.domain not in DEFAULT_DOMAINS or node.attributes:
        return None
    return node.inputs[0]


def _paths_end_broadcasting(
    start: ir.Value, source_rank: int, shape_source: ir.Value | None
) -> tuple[list[ir.Value], str | None]:
    """(the values computed from start on the paths, None) when every path from start ends at a node
    that broadcasts it back to that node's unchanged result shape; else ([], why not)."""
    derived = _computed_from(start)
    chain: list[ir.Value] = []
    pending = [start]
    seen: set[int] = set()
    gathered = False  # a Gather step appended dims: two path values are not combined after it
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_output():
            return [], f"'{value.name}' is a graph output"
        chain.append(value)
        for use in value.uses():
            node, index = use.node, use.idx
            if node.graph is not start.graph:
                return [], f"read inside a subgraph by {node.op_type} '{node.name}'"
            if (
                node.op_type == ops.BLOCK_ATTENTION
                and node.domain == ops.DOMAIN
                and index == ATTENTION_MASK_INPUT
            ):
                continue  # the end of a path: BlockAttention broadcasts its mask to [B, H, Sq, Sk]
            if node.domain not in DEFAULT_DOMAINS:
                return [], f"read by {node.op_type} '{node.name}'"
            if node.op_type in _UNARY:
                pending.append(node.outputs[0])
                continue
            gather_rows = node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0
            if gather_rows and index == 1 and id(node.inputs[0]) not in derived:
                gathered = True  # rows gathered by index: gather then broadcast, the same rows
                pending.append(node.outputs[0])
                continue
            if node.op_type not in _BROADCASTING:
                return [], f"read by {node.op_type} '{node.name}', which does not broadcast"
            others = [v for i, v in enumerate(node.inputs) if i != index and v is not None]
            on_paths = [v for v in others if id(v) in derived]
            result_shape = _known_shape(node.outputs[0])
            if any(v is shape_source for v in others) or (
                result_shape is not None
                and any(_known_shape(v) == result_shape for v in others if id(v) not in derived)
            ):
                continue  # the end of a path: another input has the result's (the expanded) shape
            if all(id(v) in derived or _single_value(v, source_rank) for v in others):
                if on_paths and gathered:
                    return [], f"{node.op_type} '{node.name}' combines gathered rows with another path value"
                pending.append(node.outputs[0])  # a value-by-value step
                continue
            return [], f"read by {node.op_type} '{node.name}', whose result shape may depend on it"
    return chain, None


def expand_paths(node: ir.Node) -> tuple[list[ir.Value], str | None]:
    """For an Expand node: (the values computed from its result on the paths, None) when it can go,
    else ([], the reason it stays)."""
    source = node.inputs[0] if node.inputs else None
    if source is None or len(node.inputs) != 2:
        return [], "not an Expand of an input by a shape"
    source_shape = value_shape(source)
    return _paths_end_broadcasting(
        node.outputs[0], 0 if source_shape is None else len(source_shape), _shape_source(node.inputs[1])
    )


class RemoveBroadcastExpandsPass(CompressPass):
    """Drop Expands (main graph) whose every reader broadcasts the unexpanded input the same way.

    An Expand that stays is not reported as skipped (nothing was left uncompressed); its reason is
    logged at debug level.
    """

    def run(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        ensure_shapes(model)
        removed = 0
        for node in list(graph):
            if node.op_type != "Expand" or node.domain not in DEFAULT_DOMAINS:
                continue
            chain, why_not = expand_paths(node)
            if why_not is not None:
                logger.debug("Expand '%s' stays: %s", node.name, why_not)
                continue
            for value in chain[1:]:  # they shrink: their recorded shapes no longer hold
                value.shape = None
                value.meta.pop(SHAPE_KEY, None)
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
            report.count(RULE)
            removed += 1
        if removed:
            annotate_shapes(model)  # the shrunk values' shapes, for the passes after this one
