"""FuseAddNormPass: a residual ``Add`` and the BlockLayerNorm / BlockRMSNorm reading it become one
BlockAddLayerNorm / BlockAddRMSNorm (ONNX Runtime's SkipLayerNormalization /
SkipSimplifiedLayerNormalization), so the sum is computed where it is normalized and the norm's
result goes on as codes for the next MatMul.

Runs after CompressIntermediatesPass: the norm's result format (out_*), which that pass chose for the
MatMuls reading it, is kept as it is. Rule, anchored at the norm: its operand is a float32 ``Add``,
one of whose operands is X, the full-size one; the other is the residual ``skip``, which the op lets
broadcast over leading dims only (as SkipLayerNormalization). X is an operand known to have the
other's shape (inferred shapes equal dim by dim), else the result of a BlockMatMul or BlockActMatMul
(a per-token result, in a layer's residual Add after attention or the FFN: shape inference does not
see through our ops, so their shapes are often unknown here); an Add of two other tensors (the
embedding sum of token, position and type tables, whose position part may be [1, S, D]) is left
alone. When the sum has readers besides the norm (the residual stream of a pre-norm decoder goes
on), the fused node gives it as output 3 and they read that. Bit-exact to the Add and the norm it
replaces (tests/runtime_ops/test_add_norm.py), so accuracy is unchanged.
Near misses keep their nodes and say why: the norm reads codes, an operand is not float32, neither
operand is known to be the full-size one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_label, node_name
from bct_onnx.passes.graph_patterns import FLOAT, is_op, value_dtype, value_shape
from bct_onnx.passes.infer_shapes import SHAPE_KEY, TYPE_KEY
from bct_onnx.passes.operand_ops import OPERAND_SLOTS, int_attr, is_ours

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "fuse residual Add + norm"
FUSED = {ops.BLOCK_LAYER_NORM: ops.BLOCK_ADD_LAYER_NORM, ops.BLOCK_RMS_NORM: ops.BLOCK_ADD_RMS_NORM}
SUM_OUTPUT = 3  # after the result's three slots


@dataclasses.dataclass(frozen=True)
class AddNormMatch:
    add: ir.Node
    norm: ir.Node
    x: ir.Value
    skip: ir.Value


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """Both known and equal dim by dim: equal ints, or the same named symbolic dim."""
    if a is None or b is None or len(a) != len(b) or len(a) == 0:
        return False
    for da, db in zip(a, b, strict=True):
        if isinstance(da, int) or isinstance(db, int):
            if da != db:
                return False
        elif da.value is None or da.value != db.value:
            return False
    return True


# Ops whose result has a row per token of their activation: a residual Add's full-size operand.
_PER_TOKEN = (ops.BLOCK_MATMUL, ops.BLOCK_ACT_MATMUL)


def _per_token(value: ir.Value) -> bool:
    node = value.producer()
    return node is not None and is_ours(node, *_PER_TOKEN)


class FuseAddNormPass(NodeRewritePass):
    """Fuse Add -> BlockLayerNorm / BlockRMSNorm into BlockAddLayerNorm / BlockAddRMSNorm."""

    needs_shapes = True

    def candidates(self, model: ir.Model) -> Iterator[ir.Node]:
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if is_ours(node, *FUSED):
                yield node

    def match(self, model: ir.Model, node: ir.Node) -> AddNormMatch | str | None:
        value = node.inputs[0]
        add = value.producer() if value is not None else None
        if add is None or not is_op(add, "Add"):
            return None  # not a residual norm (e.g. the embedding norm of a table lookup)
        if int_attr(node, "in_bits"):
            return "its operand is codes, not the Add's float32 sum"
        a, b = add.inputs[0], add.inputs[1]
        if a is None or b is None or a is b:
            return f"Add '{node_label(add)}' does not add two tensors"
        for operand in (a, b):
            dtype = value_dtype(operand)
            if dtype is not None and dtype != FLOAT:
                return f"Add '{node_label(add)}' adds {dtype.name}, not float32"
        if _same_shape(value_shape(a), value_shape(b)):
            x, skip = (b, a) if _per_token(b) and not _per_token(a) else (a, b)
        elif _per_token(a) or _per_token(b):
            x, skip = (a, b) if _per_token(a) else (b, a)
        else:
            return (
                f"Add '{node_label(add)}': neither operand is known to be the full-size one (shapes "
                f"{value_shape(a)} and {value_shape(b)}, neither a BlockMatMul result)"
            )
        return AddNormMatch(add, node, x, skip)

    def rewrite(self, model: ir.Model, matched: AddNormMatch, report: PassReport) -> None:
        add, norm = matched.add, matched.norm
        total = add.outputs[0]
        keeps_sum = total.is_graph_output() or any(use.node is not norm for use in total.uses())
        inputs = [matched.x, None, None, matched.skip, *list(norm.inputs[OPERAND_SLOTS:])]
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = {name: attr.value for name, attr in norm.attributes.items()}
        outputs = max(len(norm.outputs), SUM_OUTPUT + 1 if keeps_sum else 1)
        fused = ir.node(
            FUSED[norm.op_type], inputs, attributes=attributes, domain=ops.DOMAIN, name=node_name(norm),
            num_outputs=outputs,
        )  # fmt: skip
        old_values, new_values = [], []
        for index, new_value in enumerate(fused.outputs[:SUM_OUTPUT]):
            if index < len(norm.outputs) and norm.outputs[index].name:
                old_values.append(norm.outputs[index])
                new_values.append(new_value)
            else:
                new_value.name = ""  # an omitted optional output (e.g. zero points of symmetric codes)
        if keeps_sum:
            old_values.append(total)
            new_values.append(fused.outputs[SUM_OUTPUT])
        for old, new in zip(old_values, new_values, strict=True):
            for key in (SHAPE_KEY, TYPE_KEY):
                if key in old.meta:
                    new.meta[key] = old.meta[key]
        graph = norm.graph
        assert graph is not None
        ir.convenience.replace_nodes_and_values(graph, norm, [add, norm], [fused], old_values, new_values)
        report.count(RULE)
