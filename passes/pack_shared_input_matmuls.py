"""PackSharedInputMatMulsPass: an encoder's Q and K projections become one BlockMatMul over their
weights concatenated along N, read in place by BlockAttention (attribute ``kv_heads``, docs/ops.md).

Two BlockMatMuls that read one activation each quantize it to the same codes and each run a narrow
GEMM with its own thread-pool fork / join; one BlockMatMul of N = Nq + Nk quantizes it once and splits
one wider GEMM over the threads, and the op then quantizes Q's and K's rows in one pass over the
projection. Every output column is computed as before (the block format's product is per column), so
the result is bit-identical to the separate nodes.

V stays its own node, even in the same format: the op also reads V from the projection (Q, K, V in one
tensor), but on CPU its p x V sums then read V rows three times as far apart, which costs more than the
V MatMul's own quantization and fork / join save;
MiniLM's default budget gives V more bits than Q and K anyway. Measured at MiniLM's shape (B 8, S 64,
12 heads of 32, 1 thread): the op takes 0.89x its time with Q, K, V apart when Q and K come as one
tensor, 1.19x when Q, K and V do.

Anchored at a BlockAttention in the encoder layout (rank-3 Q, attribute ``q_heads``, no decoder-step
inputs) whose Q and K are each the sole result of a BlockMatMul reading the same activation (same
input 0 and activation scales / zero points) with the same attributes apart from N and constant
weights of one dtype each. Runs after FuseAttentionPass and the fusions that set the MatMuls' formats;
decoder steps (FuseAttentionStepPass) and heads-first attention are not this pass's; a near miss is
reported with the attribute or input that differs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_label, node_name
from bct_onnx.passes.graph_patterns import FLOAT, replace_pattern, sole_user
from bct_onnx.passes.operand_ops import int_attr, is_ours
from bct_onnx.passes.quantized_weights import (
    BLOCK_MATMUL_WEIGHT_INPUTS,
    concat_initializer,
    weight_stacking_problem,
)

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "pack Q, K MatMuls into one (attention reads it in place)"
# BlockAttention's step inputs (K_new, V_new, cos, sin): a decoder step, not this pass's.
_STEP_INPUTS = range(8, 12)


@dataclasses.dataclass(frozen=True)
class PackMatch:
    attention: ir.Node
    matmuls: list[ir.Node]  # Q, K: the nodes packed, in this order along N
    q_heads: int
    kv_heads: int


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _sole_matmul(value: ir.Value | None, attention: ir.Node, what: str) -> ir.Node | str:
    """The BlockMatMul producing value, read by attention only, or why not."""
    node = value.producer() if value is not None else None
    if value is None or node is None or not is_ours(node, ops.BLOCK_MATMUL):
        return f"attention {what} is not a BlockMatMul result"
    if sole_user(value) is not attention or sum(1 for v in attention.inputs if v is value) != 1:
        return f"the {what} MatMul '{node_label(node)}' result is read elsewhere too (or is a graph output)"
    if node.attributes.get("epilogue") is not None or int_attr(node, "out_bits"):
        return f"the {what} MatMul '{node_label(node)}' has an epilogue or gives codes"
    return node


def packing_problem(first: ir.Node, other: ir.Node) -> str | None:
    """Why other cannot be computed as more columns of first (one BlockMatMul, weights concatenated
    along N), or None."""
    if first.inputs[0] is not other.inputs[0] or list(first.inputs[5:]) != list(other.inputs[5:]):
        return f"'{node_label(first)}' and '{node_label(other)}' read different activations"
    mine, theirs = _attrs(first), _attrs(other)
    for name in sorted((set(mine) | set(theirs)) - {"N"}):
        if mine.get(name) != theirs.get(name):
            return f"'{node_label(first)}' and '{node_label(other)}' differ in attribute '{name}'"
    return weight_stacking_problem(first, other, f"'{node_label(first)}' and '{node_label(other)}'")


class PackSharedInputMatMulsPass(NodeRewritePass):
    """Pack the Q and K BlockMatMuls of an encoder's BlockAttention into one BlockMatMul."""

    def candidates(self, model: ir.Model) -> Iterator[ir.Node]:
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if is_ours(node, ops.BLOCK_ATTENTION):
                yield node

    def match(self, model: ir.Model, node: ir.Node) -> PackMatch | str | None:
        q_heads = int_attr(node, "q_heads")
        if q_heads < 1 or any(_input(node, i) is not None for i in _STEP_INPUTS):
            return None  # heads-first attention or a decoder step: not this pass's business
        if int_attr(node, "kv_heads") or _input(node, 1) is None:
            return None  # already packed
        if int_attr(node, "kv_bits"):
            return "attention K and V are codes (kv_bits > 0)"
        q, k = (_sole_matmul(_input(node, i), node, what) for i, what in ((0, "Q"), (1, "K")))
        if isinstance(q, str):
            return q
        if isinstance(k, str):
            return k
        problem = packing_problem(q, k)
        if problem is not None:
            return problem
        n_q, n_k = int_attr(q, "N"), int_attr(k, "N")
        if n_q % q_heads != 0 or n_k % (n_q // q_heads) != 0:
            return f"Q's N {n_q} and K's N {n_k} are not whole heads of {q_heads} query heads"
        return PackMatch(node, [q, k], q_heads, n_k // (n_q // q_heads))

    def rewrite(self, model: ir.Model, matched: PackMatch, report: PassReport) -> None:
        first, attention = matched.matmuls[0], matched.attention
        suffix = "qk"
        inputs: list[ir.Value | None] = [first.inputs[0]]
        for index in BLOCK_MATMUL_WEIGHT_INPUTS:
            parts = [_input(mm, index) for mm in matched.matmuls]
            present = [p for p in parts if p is not None]
            inputs.append(
                concat_initializer(model.graph, present, suffix) if len(present) == len(parts) else None
            )
        inputs += list(first.inputs[5:])
        while inputs and inputs[-1] is None:
            inputs.pop()
        n_total = sum(int_attr(mm, "N") for mm in matched.matmuls)
        packed = ir.node(
            ops.BLOCK_MATMUL,
            inputs,
            attributes={**_attrs(first), "N": n_total},
            domain=ops.DOMAIN,
            name=f"{node_name(first)}/{suffix}",
        )
        result = packed.outputs[0]
        result.name = f"{first.outputs[0].name}.{suffix}"
        result.type = ir.TensorType(FLOAT)
        q_shape = first.outputs[0].shape
        if q_shape is not None and len(q_shape) == 3:
            result.shape = ir.Shape([q_shape[0], q_shape[1], n_total])
        att_inputs = list(attention.inputs) + [None] * max(0, 8 - len(attention.inputs))
        att_inputs[0], att_inputs[1] = result, None
        while att_inputs and att_inputs[-1] is None:
            att_inputs.pop()
        fused = ir.node(
            ops.BLOCK_ATTENTION,
            att_inputs,
            attributes={**_attrs(attention), "kv_heads": matched.kv_heads},
            domain=ops.DOMAIN,
            name=node_name(attention),
        )
        replace_pattern(
            [*matched.matmuls, attention], [packed, fused], attention.outputs[0], fused.outputs[0]
        )
        report.count(RULE)
