"""QuantizeActMatMulPass: attention's activation x activation MatMuls -> ai.bct_onnx BlockActMatMul.

Identified, not guessed: a MatMul of two run-time tensors is attention's
- Q x K^T when its result reaches a Softmax through at most a scale, a mask/bias Add, a Where or
  a Cast (the Softmax may already be a BlockSoftmax);
- probabilities x V when its first operand comes from a Softmax (through Where(IsNaN)/Cast at most).
Other activation products (e.g. Llama's rotary frequencies inv_freq x positions, whose values are
positions up to the context length) are left in float and reported.

When B is a Transpose read only by this MatMul (possibly through a Mul / Div by a scalar, which
commutes with any transposition), and swapping the Transpose's last two perm entries makes it the
identity or a Transpose that keeps the last axis in place (which copies whole rows: much cheaper in
ONNX Runtime than one that moves the last axis, such as BERT's K^T perm [0, 2, 3, 1]), the Transpose
is changed to give B^T and the op reads it with transpose_b=1. A Transpose that already keeps the
last axis in place (BERT's V, perm [0, 2, 1, 3]) is left alone. Same values either way: the op
quantizes B along K in both layouts.
Both operands are quantized at run time with the node's act_bits and block_size (docs/ops.md).
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from bct_onnx.passes.framework import PassReport, node_name
from bct_onnx.passes.graph_patterns import FLOAT, is_op, producer, sole_user, value_rank, value_shape
from bct_onnx.passes.operand_ops import (
    OperandRewritePass,
    is_ours,
    operand_inputs,
    replace_with_ours,
)
from bct_onnx.passes.quantized_weights import constant_tensor

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "AttentionMatMul"
RULE_QK = "attention Q x K^T"
RULE_PV = "attention probabilities x V"
RULE_TRANSPOSE_B = "AttentionMatMul transpose_b (Transpose folded)"
_PASS_THROUGH = ("Mul", "Div", "Add", "Where", "Cast", "Reshape")  # BLOOM: baddbmm -> Reshape -> Softmax


def _is_softmax(node: ir.Node | None) -> bool:
    return node is not None and (is_op(node, "Softmax") or is_ours(node, ops.BLOCK_SOFTMAX))


def feeds_softmax(value: ir.Value) -> bool:
    for _ in range(5):
        user = sole_user(value)
        if user is None:
            return False
        if _is_softmax(user):
            return True
        if not is_op(user, *_PASS_THROUGH):
            return False
        value = user.outputs[0]
    return False


def from_softmax(value: ir.Value | None) -> bool:
    for _ in range(5):
        if value is None:
            return False
        node = value.producer()
        if _is_softmax(node):
            return True
        if not is_op(node, "Where", "Cast", "Identity", "Dropout", "Reshape"):
            return False
        assert node is not None
        value = node.inputs[2] if node.op_type == "Where" else node.inputs[0]
    return False


def _is_weight(value: ir.Value) -> bool:
    """A constant, or a Transpose of one (a tied embedding table as output projection)."""
    if constant_tensor(value) is not None:
        return True
    transpose = producer(value, "Transpose")
    return transpose is not None and constant_tensor(transpose.inputs[0]) is not None


def _is_scalar_shaped(value: ir.Value | None) -> bool:
    shape = value_shape(value)
    return shape is not None and all(isinstance(d, int) and d == 1 for d in shape)


def _foldable_transpose(node: ir.Node, b: ir.Value) -> ir.Node | None:
    """The Transpose producing B (directly, or through one Mul / Div by a scalar-shaped value, each
    read only once) whose fold into transpose_b leaves no Transpose or a row-copying one."""
    if sole_user(b) is not node:
        return None
    value = b
    scale = producer(b, "Mul", "Div")
    if scale is not None:
        first, second = scale.inputs[0], scale.inputs[1]
        if scale.op_type == "Mul" and _is_scalar_shaped(first) and second is not None:
            value = second
        elif _is_scalar_shaped(second) and first is not None:
            value = first
        else:
            return None
        if sole_user(value) is not scale:
            return None
    transpose = producer(value, "Transpose")
    if transpose is None or transpose.attributes.get("perm") is None:
        return None
    perm = list(transpose.attributes["perm"].as_ints())
    if len(perm) < 2:
        return None
    swapped = perm[:-2] + [perm[-1], perm[-2]]
    if swapped == list(range(len(perm))):
        return transpose
    last = len(perm) - 1
    return transpose if swapped[-1] == last and perm[-1] != last else None


@dataclasses.dataclass(frozen=True)
class ActMatMulMatch:
    node: ir.Node
    a: ir.Value
    b: ir.Value
    role: str
    transpose: ir.Node | None  # a Transpose producing B (maybe through a scalar Mul/Div) to fold into transpose_b
    act_bits: int
    block_size: int


class QuantizeActMatMulPass(OperandRewritePass):
    """Rewrite attention's activation x activation MatMuls into BlockActMatMul."""

    op_types = frozenset({"MatMul"})
    needs_shapes = True  # ranks and last dims, kept in value.meta (not in the model)

    def match(self, model: ir.Model, node: ir.Node) -> ActMatMulMatch | str | None:
        a, b = node.inputs[0], node.inputs[1]
        if a is None or b is None or _is_weight(a) or _is_weight(b):
            return None  # a weight MatMul: QuantizeMatMulPass's business
        if from_softmax(a):
            role = RULE_PV
        elif feeds_softmax(node.outputs[0]):
            role = RULE_QK
        else:
            return "activation x activation MatMul that is not attention's Q x K^T or probabilities x V"
        settings = self.config.settings_for("AttentionMatMul", node_name(node))
        if not settings.enabled:
            return "AttentionMatMul compression is disabled for this node by the config"
        if settings.act_bits is None:
            return "act_bits is none (weight-only): attention MatMuls need activation bits"
        for what, value in (("A", a), ("B", b)):
            if value.dtype is not None and value.dtype != FLOAT:
                return f"{what} dtype {value.dtype.name} is not float32"
            rank = value_rank(value)
            if rank is None or rank < 2:
                return f"{what} has rank {rank}; BlockActMatMul needs known ranks >= 2"
        return ActMatMulMatch(node, a, b, role, _foldable_transpose(node, b), settings.act_bits, settings.block_size)

    def rewrite(self, model: ir.Model, matched: ActMatMulMatch, report: PassReport) -> None:
        node = matched.node
        b = matched.b
        transpose_b = 0
        new_nodes: list[ir.Node] = []
        old_nodes = [node]
        if matched.transpose is not None:
            perm = list(matched.transpose.attributes["perm"].as_ints())
            swapped = perm[:-2] + [perm[-1], perm[-2]]
            source = matched.transpose.inputs[0]
            assert source is not None
            transpose_b = 1
            if swapped == list(range(len(perm))):
                folded = source
            else:
                t = ir.node("Transpose", [source], attributes={"perm": swapped}, name=matched.transpose.name)
                new_nodes.append(t)
                folded = t.outputs[0]
            scale = b.producer()
            if scale is not None and scale is not matched.transpose:
                # B = Mul/Div(Transpose(x), scalar): the scalar op moves after the new Transpose.
                inputs = [folded if v is matched.transpose.outputs[0] else v for v in scale.inputs]
                moved = ir.node(scale.op_type, inputs, name=scale.name)
                new_nodes.append(moved)
                old_nodes.insert(0, scale)
                b = moved.outputs[0]
            else:
                b = folded
            old_nodes.insert(0, matched.transpose)
        new = ir.node(
            ops.BLOCK_ACT_MATMUL,
            operand_inputs(matched.a, [b]),
            attributes={
                "act_bits": matched.act_bits,
                "block_size": matched.block_size,
                "transpose_b": transpose_b,
            },
            domain=ops.DOMAIN,
            name=node.name,
        )
        replace_with_ours(model, old_nodes, [*new_nodes, new], report, RULE)
        report.count(matched.role)
        if transpose_b:
            report.count(RULE_TRANSPOSE_B)
