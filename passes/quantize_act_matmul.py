"""QuantizeActMatMulPass: attention's activation x activation MatMuls -> ai.bct_onnx BlockActMatMul.

Identified, not guessed: a MatMul of two run-time tensors is attention's
- Q x K^T when its result reaches a Softmax through at most a scale, a mask/bias Add, a Where or
  a Cast (the Softmax may already be a BlockSoftmax);
- probabilities x V when its first operand comes from a Softmax (through Where(IsNaN)/Cast at most).
Other activation products (e.g. Llama's rotary frequencies inv_freq x positions, whose values are
positions up to the context length) are left in float and reported.

When K^T is a Transpose read only by this MatMul, the Transpose is changed to give K itself and the
op reads it with transpose_b=1 (Transpose(x, perm) then swapping the last two axes is one
Transpose with the last two entries of perm swapped; it disappears when that is the identity).
Both operands are quantized at run time with the node's act_bits and block_size (docs/ops.md).
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from bct_onnx.passes.framework import PassReport
from bct_onnx.passes.graph_patterns import FLOAT, is_op, producer, sole_user, value_rank
from bct_onnx.passes.nonlinear_ops import (
    OperandRewritePass,
    is_ours,
    operand_inputs,
    replace_with_ours,
    settings_name,
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


@dataclasses.dataclass(frozen=True)
class ActMatMulMatch:
    node: ir.Node
    a: ir.Value
    b: ir.Value
    role: str
    transpose: ir.Node | None  # a Transpose producing B to fold into transpose_b
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
        settings = self.config.settings_for("AttentionMatMul", settings_name(node))
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
        transpose = producer(b, "Transpose")
        if transpose is not None and (sole_user(b) is not node or transpose.attributes.get("perm") is None):
            transpose = None
        return ActMatMulMatch(node, a, b, role, transpose, settings.act_bits, settings.block_size)

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
            old_nodes.insert(0, matched.transpose)
            transpose_b = 1
            if swapped == list(range(len(perm))):
                b = source
            else:
                t = ir.node("Transpose", [source], attributes={"perm": swapped}, name=matched.transpose.name)
                new_nodes.append(t)
                b = t.outputs[0]
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
