"""FuseAttentionStepPass: a with-past decoder layer's attention glue -> inside its BlockAttention.

After FuseAttentionPass and CompressKVCachePass, each layer of a with-past decoder still runs, around
its BlockAttention, the KV-cache append (BlockQuantize of the new keys / values and four Concats of
codes and scales, or two Concats of a float cache), rotary embedding of Q and K (Mul, Slice, Slice, Neg,
Concat, Mul, Add each, as optimum's Llama export writes rotate_half), and the head split / merge of
Q, K, V and the result (Reshape + Transpose each). Three rules fold them into the op (docs/ops.md,
the decoder step; spec: reference_attention.attention_step), one after another on each BlockAttention:

- append: K (V) = present cache = Concat(past, new) along axis 2 (of codes and of scales, the new
  rows from one BlockQuantize in the cache's format), present a graph output -> the op reads the past
  and K_new / V_new and writes present K / V (graph outputs keep their names);
- rotary: Q and K_new = x * cos + Concat(-x[R/2:R], x[:R/2]) * sin with the same cos / sin (R = Dh), or
  partial rotary Concat(rotary(x[:R]), x[R:]) -> the op reads x, cos, sin (an Unsqueeze(axis 1) of
  cos / sin is looked through);
- layout: Q, K_new, V_new = Transpose(Reshape(x, [B, S, H, Dh]), [0, 2, 1, 3]) and the result read only
  by Transpose [0, 2, 1, 3] -> Reshape [B, S, H * Dh] -> the op reads and writes [B, S, H * Dh]
  (attribute q_heads).
The numerics are unchanged: the op computes the replaced nodes' float32 operations and BlockQuantize's
codes bit for bit. A rule that does not fit leaves the node as the previous rule left it and says why.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import CompressPass, PassReport
from bct_onnx.passes.graph_patterns import is_op, producer, static_value
from bct_onnx.passes.head_layout import NoFit as _NoFit
from bct_onnx.passes.head_layout import merge_heads, split_heads
from bct_onnx.passes.infer_shapes import ensure_shapes

from bct_onnx import ops
from bct_onnx.kv_cache import codes_name, read_formats

RULE_APPEND = "Attention step: KV-cache append in the op"
RULE_ROTARY = "Attention step: rotary embedding in the op"
RULE_LAYOUT = "Attention step: head split / merge in the op"

_K, _V, _MASK, _K_NEW, _V_NEW, _COS, _SIN = 1, 4, 7, 8, 9, 10, 11
_INPUTS = 12
_LAST_AXIS = (-1, 3)


def _inputs(node: ir.Node) -> list[ir.Value | None]:
    values = list(node.inputs)
    return values + [None] * (_INPUTS - len(values))


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _rebuild(
    graph: ir.Graph,
    node: ir.Node,
    inputs: list[ir.Value | None],
    attributes: dict[str, object],
    num_outputs: int,
    replaced: list[tuple[ir.Value, int]],
    old_nodes: list[ir.Node],
) -> ir.Node:
    """A new BlockAttention in node's place; replaced: (old value, index of the new output taking it)."""
    while inputs and inputs[-1] is None:
        inputs.pop()
    new = ir.node(
        ops.BLOCK_ATTENTION,
        inputs,
        attributes,
        domain=ops.DOMAIN,
        name=node.name,
        num_outputs=num_outputs,
    )
    ir.convenience.replace_nodes_and_values(
        graph,
        node,
        [node, *old_nodes],
        [new],
        [old for old, _ in replaced],
        [new.outputs[index] for _, index in replaced],
    )
    return new


def _remove_dead(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Remove the producers of values (and theirs) that nothing reads any more: the pass is usable alone."""
    stack = [v for v in values if v is not None]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or node.graph is not graph:
            continue
        if any(out.uses() or out.is_graph_output() for out in node.outputs):
            continue
        stack.extend(v for v in node.inputs if v is not None)
        graph.remove(node, safe=True)


# ------------------------------------------------------------------------------------------------
# append


@dataclasses.dataclass(frozen=True)
class _Append:
    new: ir.Value  # the new rows (float)
    past: list[ir.Value]  # past cache inputs: [codes, scales] or [float]
    present: list[ir.Value]  # present cache outputs, same order
    nodes: list[ir.Node]  # Concats (and the BlockQuantize) the op replaces


def _append_of(node: ir.Node, slot: int, kv_bits: int) -> _Append:
    inputs = _inputs(node)
    present = inputs[slot]
    concat = producer(present, "Concat")
    if concat is None or len(concat.inputs) != 2 or _attr_int(concat, "axis", 0) not in (2, -2):
        raise _NoFit("K / V is not a two-input Concat on axis 2 (a cache append)")
    past, new = concat.inputs
    if (
        past is None
        or new is None
        or not past.is_graph_input()
        or present is None
        or not present.is_graph_output()
    ):
        raise _NoFit("the cache Concat does not append to a graph input into a graph output")
    if any(use.node is not node for use in present.uses()):
        raise _NoFit(f"the present cache {present.name!r} is read by other nodes")
    if kv_bits == 0:
        return _Append(new, [past], [present], [concat])
    scales = inputs[slot + 1]
    scale_concat = producer(scales, "Concat")
    quantize = new.producer()
    if (
        scales is None
        or scale_concat is None
        or len(scale_concat.inputs) != 2
        or quantize is None
        or quantize.domain != ops.DOMAIN
        or quantize.op_type != ops.BLOCK_QUANTIZE
        or scale_concat.inputs[1] is not quantize.outputs[1]
        or new is not quantize.outputs[0]
        or scale_concat.inputs[0] is None
        or not scale_concat.inputs[0].is_graph_input()
        or not scales.is_graph_output()
        or any(use.node is not node for use in scales.uses())
    ):
        raise _NoFit("the cache codes and scales are not the past's with one BlockQuantize's appended")
    if (
        _attr_int(quantize, "bits", 0) != kv_bits
        or _attr_int(quantize, "block_size", 0) != _attr_int(node, "kv_block_size", 0)
        or _attr_int(quantize, "symmetric", 1) != 1
    ):
        raise _NoFit("the new rows' BlockQuantize is not in the cache's format")
    if len(new.uses()) != 1 or len(quantize.outputs[1].uses()) != 1 or quantize.inputs[0] is None:
        raise _NoFit("the new rows' codes are read elsewhere")
    return _Append(
        quantize.inputs[0],
        [past, scale_concat.inputs[0]],
        [present, scales],
        [concat, scale_concat, quantize],
    )


def _fuse_append(graph: ir.Graph, node: ir.Node) -> ir.Node:
    kv_bits = _attr_int(node, "kv_bits", 0)
    if kv_bits > 0 and _attr_int(node, "kv_symmetric", 1) != 1:
        raise _NoFit("the cache is not symmetric")
    k, v = _append_of(node, _K, kv_bits), _append_of(node, _V, kv_bits)
    inputs = _inputs(node)
    if kv_bits:
        inputs[_K : _K + 3] = [*k.past, None]
        inputs[_V : _V + 3] = [*v.past, None]
        replaced = [
            (node.outputs[0], 0),
            (k.present[0], 1),
            (v.present[0], 2),
            (k.present[1], 3),
            (v.present[1], 4),
        ]
    else:
        inputs[_K], inputs[_V] = k.past[0], v.past[0]
        replaced = [(node.outputs[0], 0), (k.present[0], 1), (v.present[0], 2)]
    inputs[_K_NEW], inputs[_V_NEW] = k.new, v.new
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    return _rebuild(graph, node, inputs, attributes, 5 if kv_bits else 3, replaced, k.nodes + v.nodes)


# ------------------------------------------------------------------------------------------------
# rotary


def _static(value: ir.Value | None, depth: int = 8) -> np.ndarray | None:
    """static_value, also through Unsqueeze / Cast / Div of a Shape read of a last dim that a Slice made
    static (GPT-NeoX's rotate_half slices at Unsqueeze(Cast(x.shape[-1] / 2)) of a sliced x)."""
    if value is None or depth <= 0:
        return None
    found = static_value(value)
    if found is not None:
        return found
    node = value.producer()
    if is_op(node, "Unsqueeze", "Cast"):
        inner = _static(node.inputs[0], depth - 1)  # type: ignore[union-attr]
        if inner is None:
            return None
        return (
            inner
            if node.op_type == "Unsqueeze"
            else inner.astype(ir.DataType(node.attributes["to"].as_int()).numpy())
        )  # type: ignore[union-attr]
    if is_op(node, "Div", "Mul") and len(node.inputs) == 2:  # type: ignore[union-attr]
        a, b = (_static(v, depth - 1) for v in node.inputs)  # type: ignore[union-attr]
        if a is None or b is None:
            return None
        return np.asarray(
            a // b
            if node.op_type == "Div" and a.dtype.kind == "i"
            else (a / b if node.op_type == "Div" else a * b)
        )  # type: ignore[union-attr]
    if is_op(node, "Gather"):
        shape = producer(node.inputs[0], "Shape")  # type: ignore[union-attr]
        index = static_value(node.inputs[1]) if len(node.inputs) > 1 else None  # type: ignore[union-attr]
        if (
            shape is None
            or shape.inputs[0] is None
            or index is None
            or int(index.reshape(-1)[0]) not in _LAST_AXIS
        ):
            return None
        width = _sliced_width(shape.inputs[0])
        return None if width is None else np.asarray(width, np.int64).reshape(index.shape)
    return None


def _sliced_width(value: ir.Value) -> int | None:
    """The last dim of value when a Slice with static bounds along the last axis made it."""
    node = producer(value, "Slice")
    if node is None or len(node.inputs) < 4:
        return None
    bounds = [static_value(v) if v is not None else None for v in node.inputs[1:4]]
    if any(b is None or b.size != 1 for b in bounds):
        return None
    start, stop, axis = (int(np.asarray(b).reshape(-1)[0]) for b in bounds)  # type: ignore[arg-type]
    if axis not in _LAST_AXIS or start < 0 or stop >= 1 << 31 or stop <= start:
        return None
    return stop - start


def _slice_range(node: ir.Node | None, source: ir.Value | None) -> tuple[int, int] | None:
    """(start, end) of a Slice of source along its last axis with step 1 (static), else None."""
    if node is None or source is None or node.inputs[0] is not source or len(node.inputs) < 4:
        return None
    values = [_static(v) for v in node.inputs[1:4]]
    step = node.inputs[4] if len(node.inputs) > 4 else None
    values.append(_static(step) if step is not None else np.ones(1, np.int64))
    if any(v is None or v.size != 1 for v in values):
        return None
    start, stop, axis, stride = (int(np.asarray(v).reshape(-1)[0]) for v in values)  # type: ignore[arg-type]
    if axis not in _LAST_AXIS or stride != 1:
        return None
    return start, stop


def _operands(node: ir.Node) -> list[tuple[ir.Value, ir.Value]]:
    """Both orders of a binary node's inputs."""
    a, b = node.inputs[0], node.inputs[1]
    return [(a, b), (b, a)] if a is not None and b is not None else []


def _rope_of(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, int]:
    """value = x * cos + rotate_half(x) * sin -> (x, cos, sin, R / 2)."""
    add = producer(value, "Add")
    if add is None:
        raise _NoFit("no rotary Add")
    for left, right in _operands(add):
        mul_x, mul_r = producer(left, "Mul"), producer(right, "Mul")
        if mul_x is None or mul_r is None:
            continue
        for x, cos in _operands(mul_x):
            for turned, sin in _operands(mul_r):
                cat = producer(turned, "Concat")
                if cat is None or len(cat.inputs) != 2 or _attr_int(cat, "axis", 0) not in _LAST_AXIS:
                    continue
                neg = producer(cat.inputs[0], "Neg")
                second = _slice_range(producer(neg.inputs[0], "Slice"), x) if neg is not None else None
                first = _slice_range(producer(cat.inputs[1], "Slice"), x)
                if (
                    first is None
                    or second is None
                    or first[0] != 0
                    or second[0] != first[1]
                    or second[1] < 2 * first[1]
                ):
                    continue
                return x, cos, sin, first[1]
    raise _NoFit("not x * cos + rotate_half(x) * sin")


def _rotary_input(value: ir.Value, dh: int) -> tuple[ir.Value, ir.Value, ir.Value, int]:
    """Q or K_new after rotary -> (x, cos, sin, R): x * cos + rotate_half(x) * sin over all Dh, or
    partial rotary Concat(that of x[:R], x[R:])."""
    outer = producer(value, "Concat")
    if outer is not None and len(outer.inputs) == 2 and _attr_int(outer, "axis", 0) in _LAST_AXIS:
        rotated, rest = outer.inputs
        x_rot, cos, sin, half = _rope_of(rotated)  # type: ignore[arg-type]
        head = producer(x_rot, "Slice")
        x = head.inputs[0] if head is not None else None
        tail = _slice_range(producer(rest, "Slice"), x)
        if _slice_range(head, x) != (0, 2 * half) or tail is None or tail[0] != 2 * half or tail[1] < dh:
            raise _NoFit("partial rotary is not Concat(rotary(x[:R]), x[R:])")
        return x, cos, sin, 2 * half  # type: ignore[return-value]
    x, cos, sin, half = _rope_of(value)
    if 2 * half != dh:
        raise _NoFit(f"rotary over {2 * half} of {dh} elements without a partial-rotary Concat")
    return x, cos, sin, dh


def _table(value: ir.Value) -> ir.Value:
    """cos / sin as the op takes it: through an Unsqueeze of axis 1 ([B, S, R] -> [B, 1, S, R])."""
    unsqueeze = producer(value, "Unsqueeze")
    if unsqueeze is not None and unsqueeze.inputs[0] is not None and len(unsqueeze.inputs) > 1:
        axes = static_value(unsqueeze.inputs[1])
        if axes is not None and [int(a) for a in axes.reshape(-1)] == [1]:
            return unsqueeze.inputs[0]
    return value


def _fuse_rotary(graph: ir.Graph, node: ir.Node, dh: int) -> ir.Node:
    inputs = _inputs(node)
    if inputs[_COS] is not None:
        raise _NoFit("rotary already in the op")
    q, k = inputs[0], inputs[_K_NEW]
    if q is None or k is None:
        raise _NoFit("no new keys")
    qx, qcos, qsin, qrot = _rotary_input(q, dh)
    kx, kcos, ksin, krot = _rotary_input(k, dh)
    if _table(qcos) is not _table(kcos) or _table(qsin) is not _table(ksin) or qrot != krot:
        raise _NoFit("Q and K are rotated by different tables")
    old = [q, k]
    inputs[0], inputs[_K_NEW] = qx, kx
    inputs[_COS], inputs[_SIN] = _table(qcos), _table(qsin)
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    new = _rebuild(graph, node, inputs, attributes, len(node.outputs), _same_outputs(node), [])
    _remove_dead(graph, old)
    return new


def _same_outputs(node: ir.Node) -> list[tuple[ir.Value, int]]:
    return [(out, i) for i, out in enumerate(node.outputs) if out.uses() or out.is_graph_output()]


# ------------------------------------------------------------------------------------------------
# layout


def _fuse_layout(graph: ir.Graph, node: ir.Node, dh: int) -> ir.Node:
    inputs = _inputs(node)
    if _attr_int(node, "q_heads", 0):
        raise _NoFit("layout already in the op")
    q, k, v = inputs[0], inputs[_K_NEW], inputs[_V_NEW]
    if q is None or k is None or v is None:
        raise _NoFit("no new keys")
    qx, hq, _ = split_heads(q, None, dh)
    kx, hk, _ = split_heads(k, None, dh)
    vx, _, _ = split_heads(v, hk, dh)
    merged, merge_nodes = merge_heads(node.outputs[0], hq * dh)
    old = [q, k, v]
    inputs[0], inputs[_K_NEW], inputs[_V_NEW] = qx, kx, vx
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    attributes["q_heads"] = hq
    replaced = [(merged, 0)] + [
        (out, i) for i, out in enumerate(node.outputs) if i > 0 and out.is_graph_output()
    ]
    new = _rebuild(graph, node, inputs, attributes, len(node.outputs), replaced, merge_nodes)
    _remove_dead(graph, old)
    return new


class FuseAttentionStepPass(CompressPass):
    """Fold the KV-cache append, rotary embedding and head split / merge of each with-past decoder
    layer into its BlockAttention (three rules, in that order; each needs the one before, rotary only
    where Q is not straight from the head split)."""

    def run(self, model: ir.Model, report: PassReport) -> None:
        # Dead readers of the cache (the grouped-query Expand chain FuseAttentionPass left behind)
        # would otherwise look like other uses of the present cache.
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ensure_shapes(model)  # widths of the head split's input (a bias Add after BlockMatMul)
        graph = model.graph
        head_dims = {
            codes_name(name): fmt.head_dim for name, fmt in read_formats(model.metadata_props).items()
        }
        for node in list(graph):
            if node.domain != ops.DOMAIN or node.op_type != ops.BLOCK_ATTENTION or node.graph is None:
                continue
            if _inputs(node)[_K_NEW] is not None:
                continue
            try:
                dh = _head_dim(node, head_dims)
                node = _fuse_append(graph, node)
                report.count(RULE_APPEND)
                if producer(_inputs(node)[0], "Transpose") is None:  # else Q comes straight from the split
                    node = _fuse_rotary(graph, node, dh)
                    report.count(RULE_ROTARY)
                node = _fuse_layout(graph, node, dh)
                report.count(RULE_LAYOUT)
            except _NoFit as reason:
                report.skip(node, f"decoder step left partly outside BlockAttention: {reason}")


def _head_dim(node: ir.Node, head_dims: dict[str, int]) -> int:
    """Dh of the cache K appends to: the compressed cache's format, or a float past's last dim."""
    concat = producer(_inputs(node)[_K], "Concat")
    past = concat.inputs[0] if concat is not None else None
    if past is not None and past.name in head_dims:
        return head_dims[past.name]
    dim = past.shape[-1] if past is not None and past.shape is not None else None
    if _attr_int(node, "kv_bits", 0) == 0 and isinstance(dim, int):
        return dim
    raise _NoFit("K is not a cache append of a known head size")
