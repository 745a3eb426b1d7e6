"""Small graph-matching helpers shared by the fusion and quantize passes of the activation ops.

Matchers walk from an anchor node (Erf, Tanh, ReduceMean, Softmax ...) through producers and sole
consumers; these helpers answer the recurring questions (is this value a scalar constant, which
single node reads it, what does a float Cast hide) so every rule states its pattern, not plumbing.
Elementwise sub-expressions (the many exporter spellings of GELU) are checked by evaluating them
on sample points: two spellings of the same polynomial agree there, different functions do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import DEFAULT_DOMAINS
from bct_onnx.passes.infer_shapes import SHAPE_KEY, TYPE_KEY
from bct_onnx.passes.quantized_weights import constant_tensor

from bct_onnx import ops

FLOAT = ir.DataType.FLOAT


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    """node is a standard ONNX node of one of op_types."""
    return node is not None and node.op_type in op_types and node.domain in DEFAULT_DOMAINS


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The node producing value if it is a standard node of one of op_types."""
    if value is None:
        return None
    node = value.producer()
    return node if is_op(node, *op_types) else None


def scalar(value: ir.Value | None) -> float | None:
    """The value of a constant holding one element (any shape of size 1), else None."""
    tensor = constant_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(-1)[0])


def close(a: float | None, b: float, rtol: float = 1e-4) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-3)


def sole_user(value: ir.Value) -> ir.Node | None:
    """The one node reading value (once), or None (several readers, a graph output, none)."""
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0].node


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """For a binary node reading value once, its other input."""
    a, b = node.inputs[0], node.inputs[1]
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


_FLOAT_RESULT_OPS = frozenset({ops.BLOCK_MATMUL, ops.BLOCK_GATHER, ops.BLOCK_DEQUANTIZE})


def value_dtype(value: ir.Value | None) -> ir.DataType | None:
    """The declared element type, else the inferred one (value.meta), else what the producer implies."""
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    inferred = value.meta.get(TYPE_KEY)
    if isinstance(inferred, ir.DataType):
        return inferred
    node = value.producer()
    if node is None or value is not node.outputs[0]:
        return None
    if is_op(node, "Cast"):
        to = node.attributes.get("to")
        return ir.DataType(to.as_int()) if to is not None else None
    if node.domain == ops.DOMAIN and node.op_type in _FLOAT_RESULT_OPS:
        return FLOAT
    return None


def strip_float_cast(value: ir.Value | None) -> ir.Value | None:
    """value, or the input of a Cast-to-float32 producing it when that input is already float32."""
    node = producer(value, "Cast")
    if node is None or value is None:
        return value
    to = node.attributes.get("to")
    inner = node.inputs[0]
    if to is not None and to.as_int() == FLOAT.value and inner is not None and value_dtype(inner) == FLOAT:
        return inner
    return value


def same_float(a: ir.Value | None, b: ir.Value | None) -> bool:
    """a and b are the same tensor, up to no-op float32 Casts (Llama's RMSNorm casts)."""
    return a is not None and b is not None and strip_float_cast(a) is strip_float_cast(b)


def reduce_axes(node: ir.Node) -> list[int] | None:
    """Axes of a Reduce* node (attribute before opset 18, constant input after), or None."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = constant_tensor(node.inputs[1])
        if tensor is None:
            return None
        return [int(a) for a in np.asarray(tensor.numpy()).reshape(-1)]
    return None


def reduces_last_axis(node: ir.Node, rank: int | None) -> str | None:
    """None when node reduces only the last axis with keepdims=1, else why not."""
    axes = reduce_axes(node)
    if axes is None:
        return f"{node.op_type} axes are not constant (or reduce all axes)"
    keep = node.attributes.get("keepdims")
    if keep is not None and keep.as_int() == 0:
        return f"{node.op_type} has keepdims=0"
    if axes == [-1] or (rank is not None and axes == [rank - 1]):
        return None
    return f"{node.op_type} reduces axes {axes}, not only the last axis"


def value_shape(value: ir.Value | None) -> ir.Shape | None:
    """The declared shape, else the one annotate_shapes inferred (kept in value.meta)."""
    if value is None:
        return None
    if value.shape is not None:
        return value.shape
    shape = value.meta.get(SHAPE_KEY)
    return shape if isinstance(shape, ir.Shape) else None


def value_rank(value: ir.Value | None) -> int | None:
    shape = value_shape(value)
    return None if shape is None else len(shape)


def last_dim(value: ir.Value | None) -> int | None:
    """The static last dimension of value, or None.

    Results of BlockMatMul / BlockGather (made by other passes, without inferred shapes) end in
    their N / axis_size attribute.
    """
    shape = value_shape(value)
    if shape is not None and len(shape) > 0:
        dim = shape[-1]
        if isinstance(dim, int):
            return dim
    node = value.producer() if value is not None else None
    if node is not None and node.domain == ops.DOMAIN and value is node.outputs[0]:
        attr = node.attributes.get(
            {ops.BLOCK_MATMUL: "N", ops.BLOCK_GATHER: "axis_size"}.get(node.op_type, "")
        )
        if attr is not None:
            return attr.as_int()
    return None


# ---------------------------------------------------------------------------------------------
# Elementwise expressions evaluated on sample points.

_ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Pow": np.power,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
}
_MAX_EXPRESSION_NODES = 12


class Expression:
    """An elementwise sub-graph from leaf values (and scalar constants) up to a root value.

    ``nodes`` are the nodes inside it (the root's producer first); every inner value is read only
    inside the expression, so replacing the root removes them all.
    """

    def __init__(self, root: ir.Value, leaves: tuple[ir.Value, ...]) -> None:
        self.root = root
        self.leaves = leaves
        self.nodes: list[ir.Node] = []
        self.free: list[ir.Value] = []  # non-constant values reached that are not leaves

    def evaluate(self, samples: dict[int, np.ndarray]) -> np.ndarray | None:
        """Value of the root for sample arrays of the leaves (keyed by id), None if not evaluable."""
        cache: dict[int, np.ndarray] = dict(samples)

        def walk(value: ir.Value) -> np.ndarray | None:
            if id(value) in cache:
                return cache[id(value)]
            c = scalar(value)
            if c is not None:
                return np.asarray(c, dtype=np.float64)
            node = value.producer()
            if node is None or node.op_type not in _ELEMENTWISE or node.domain not in DEFAULT_DOMAINS:
                return None
            args = []
            for v in node.inputs:
                if v is None:
                    return None
                arg = walk(v)
                if arg is None:
                    return None
                args.append(arg)
            with np.errstate(all="ignore"):
                out = _ELEMENTWISE[node.op_type](*args)
            cache[id(value)] = out
            return out

        return walk(self.root)


def collect_expression(root: ir.Value, leaves: tuple[ir.Value, ...]) -> Expression | str:
    """The elementwise expression computing root from leaves and scalar constants, or why not.

    Inner values (neither root nor leaves) must be read only by the expression itself.
    """
    expr = Expression(root, leaves)
    leaf_ids = {id(v) for v in leaves}
    inner: set[int] = set()
    stack = [root]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen or id(value) in leaf_ids or scalar(value) is not None:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None or node.op_type not in _ELEMENTWISE or node.domain not in DEFAULT_DOMAINS:
            return f"'{value.name}' is not computed elementwise from the expected input"
        expr.nodes.append(node)
        if len(expr.nodes) > _MAX_EXPRESSION_NODES:
            return "expression too large"
        if value is not root:
            inner.add(id(value))
        for v in node.inputs:
            if v is None:
                return f"{node.op_type} with a missing input"
            stack.append(v)
    node_ids = {id(n) for n in expr.nodes}
    for node in expr.nodes:
        for out in node.outputs:
            if out is root:
                continue
            if out.is_graph_output() or any(id(use.node) not in node_ids for use in out.uses()):
                return f"intermediate '{out.name}' is also read outside the pattern"
    return expr


def matches_function(
    expr: Expression, reference: Callable[..., np.ndarray], samples: list[np.ndarray], rtol: float = 1e-4
) -> bool:
    """expr equals reference(*leaf samples) at every sample point (relative tolerance rtol)."""
    got = expr.evaluate({id(leaf): sample for leaf, sample in zip(expr.leaves, samples)})
    if got is None:
        return False
    want = reference(*samples)
    got = np.broadcast_to(np.asarray(got, dtype=np.float64), np.shape(want))
    return bool(np.allclose(got, want, rtol=rtol, atol=rtol * 1e-2))


SAMPLE_POINTS = np.array([-3.1, -1.7, -0.9, -0.35, 0.2, 0.55, 1.3, 2.2, 3.7], dtype=np.float64)


def replace_pattern(
    old_nodes: list[ir.Node], new_nodes: list[ir.Node], old_value: ir.Value, new_value: ir.Value
) -> None:
    """Replace the matched nodes (ending in the producer of old_value) by new_nodes.

    The new result takes old_value's name, type and shape, and its place among graph outputs.
    """
    last = old_value.producer()
    assert last is not None and last.graph is not None
    for key in (SHAPE_KEY, TYPE_KEY):
        if key in old_value.meta:
            new_value.meta[key] = old_value.meta[key]
    ir.convenience.replace_nodes_and_values(
        last.graph, last, list(dict.fromkeys(old_nodes)), new_nodes, [old_value], [new_value]
    )


_STATIC_DEPTH = 12


def _shape_dims(node: ir.Node) -> list[int | None] | None:
    """Dims a Shape node gives (its start / end attributes applied), None where symbolic."""
    source = node.inputs[0]
    shape = value_shape(source) if source is not None else None
    if shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in shape]
    start = node.attributes["start"].as_int() if "start" in node.attributes else 0
    end = node.attributes["end"].as_int() if "end" in node.attributes else len(dims)
    return dims[start:end]


def _index_list(node: ir.Node, index: int, depth: int) -> list[int] | None | bool:
    """Static ints of optional input ``index``: a list, None when absent, False when not static."""
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    value = static_value(node.inputs[index], depth)
    return False if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def static_value(value: ir.Value | None, depth: int = _STATIC_DEPTH) -> np.ndarray | None:
    """The value of a small tensor computed only from constants and static dims, or None.

    Covers what exporters write for 1 / sqrt(head_size) (Shape -> Slice or Gather -> Cast -> Sqrt ->
    Div -> Sqrt) and plain constants. A symbolic dim anywhere in what is read makes it None."""
    if value is None or depth <= 0:
        return None
    tensor = constant_tensor(value)
    if tensor is not None:
        return np.asarray(tensor.numpy())
    node = value.producer()
    if not is_op(node, "Cast", "Sqrt", "Reciprocal", "Div", "Mul", "Slice", "Gather", "Squeeze"):
        return None
    assert node is not None
    if node.op_type in ("Slice", "Gather"):
        shape_node = producer(node.inputs[0], "Shape")
        if shape_node is not None:
            dims = _shape_dims(shape_node)
        else:
            base = static_value(node.inputs[0], depth - 1)
            dims = None if base is None or base.ndim != 1 else [int(d) for d in base]
        if dims is None:
            return None
        if node.op_type == "Gather":
            index = static_value(node.inputs[1], depth - 1)
            if index is None or "axis" in node.attributes and node.attributes["axis"].as_int() != 0:
                return None
            picked = [dims[int(i)] for i in np.asarray(index).reshape(-1)]
            shape = np.asarray(index).shape
        else:
            starts, ends = _index_list(node, 1, depth - 1), _index_list(node, 2, depth - 1)
            axes, steps = _index_list(node, 3, depth - 1), _index_list(node, 4, depth - 1)
            if not starts or not ends or axes is False or steps is False or axes not in (None, [0], [-1]):
                return None
            if steps not in (None, [1]):
                return None
            picked = dims[starts[0] : ends[0]]
            shape = (len(picked),)
        if not picked or any(d is None for d in picked):
            return None
        return np.asarray(picked, dtype=np.int64).reshape(shape)
    inputs = [static_value(v, depth - 1) for v in node.inputs]
    if not inputs or any(x is None for x in inputs):
        return None
    with np.errstate(all="ignore"):
        if node.op_type == "Cast":
            return np.asarray(inputs[0]).astype(ir.DataType(node.attributes["to"].as_int()).numpy())
        if node.op_type == "Sqrt":
            return np.sqrt(inputs[0])
        if node.op_type == "Reciprocal":
            return np.reciprocal(inputs[0])
        if node.op_type == "Squeeze":
            return np.asarray(inputs[0]).reshape(()) if np.asarray(inputs[0]).size == 1 else None
        a, b = inputs[0], inputs[1]
        return np.asarray(a / b if node.op_type == "Div" else a * b)
