"""QuantizeSoftmaxPass: Softmax over the last axis -> ai.bct_onnx BlockSoftmax (float operands first).

Attention softmax is recognised and counted by what precedes it: a scale (Mul/Div by a constant),
an additive mask or position bias (Add of another tensor), or the raw Q x K^T product. The scale
and the mask stay separate float nodes (BlockSoftmax has no scale or mask input); the result's
codes are one-signed, so CompressIntermediatesPass stores them asymmetric when they stay
compressed (e.g. into BlockActMatMul for probabilities x V).
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from bct_onnx.passes.framework import PassReport, onnx_opset
from bct_onnx.passes.graph_patterns import is_op, producer, scalar, value_rank
from bct_onnx.passes.operand_ops import OperandRewritePass, is_ours, operand_skip_reason, replace_with_ours

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "Softmax"
RULE_ATTENTION = "attention Softmax"
RULE_SCALE = "attention Softmax: scaled scores"
RULE_MASK = "attention Softmax: additive mask/bias"


@dataclasses.dataclass(frozen=True)
class SoftmaxMatch:
    node: ir.Node
    x: ir.Value
    attention: bool
    scaled: bool
    masked: bool


def _is_scores(value: ir.Value | None) -> bool:
    """value is a product of two activations (Q x K^T), possibly already a BlockActMatMul."""
    node = value.producer() if value is not None else None
    if node is None:
        return False
    if is_ours(node, ops.BLOCK_ACT_MATMUL):
        return True
    return is_op(node, "MatMul") and all(v is not None and v.const_value is None for v in node.inputs)


def attention_context(x: ir.Value) -> tuple[bool, bool, bool]:
    """(is attention, scaled, masked) for the input of a softmax."""
    value: ir.Value | None = x
    scaled = masked = False
    for _ in range(4):
        if _is_scores(value):
            return True, scaled, masked
        node = producer(value, "Add", "Mul", "Div", "Where", "Cast")
        if node is None or value is None:
            return False, scaled, masked
        if node.op_type in ("Mul", "Div"):
            if scalar(node.inputs[1]) is None and scalar(node.inputs[0]) is None:
                return False, scaled, masked
            scaled = True
            value = node.inputs[0] if scalar(node.inputs[0]) is None else node.inputs[1]
        elif node.op_type == "Add":
            masked = True
            # The scores are the operand that is itself a product (or scaled product).
            a, b = node.inputs[0], node.inputs[1]
            value = a if _is_scores(a) or producer(a, "Mul", "Div") is not None else b
        elif node.op_type == "Where":
            masked = True
            value = node.inputs[1]
        else:
            value = node.inputs[0]
    return False, scaled, masked


class QuantizeSoftmaxPass(OperandRewritePass):
    """Rewrite Softmax over the last axis into BlockSoftmax (float in/out)."""

    op_types = frozenset({"Softmax"})
    needs_shapes = True  # ranks and last dims, kept in value.meta (not in the model)

    def match(self, model: ir.Model, node: ir.Node) -> SoftmaxMatch | str | None:
        reason = operand_skip_reason(self.config, node, "Softmax")
        if reason is not None:
            return reason
        x = node.inputs[0]
        assert x is not None
        rank = value_rank(x)
        attr = node.attributes.get("axis")
        opset = onnx_opset(model) or 13
        default_axis = -1 if opset >= 13 else 1
        axis = attr.as_int() if attr is not None else default_axis
        if axis != -1 and (rank is None or axis != rank - 1):
            semantics = "" if opset >= 13 else " (opset < 13: coerced to 2-D)"
            return f"softmax over axis {axis}{semantics} of a rank-{rank} input; BlockSoftmax is over the last axis"
        attention, scaled, masked = attention_context(x)
        return SoftmaxMatch(node, x, attention, scaled, masked)

    def rewrite(self, model: ir.Model, matched: SoftmaxMatch, report: PassReport) -> None:
        node = matched.node
        new = ir.node(ops.BLOCK_SOFTMAX, [matched.x], domain=ops.DOMAIN, name=node.name)
        replace_with_ours(model, [node], [new], report, RULE)
        if matched.attention:
            report.count(RULE_ATTENTION)
            if matched.scaled:
                report.count(RULE_SCALE)
            if matched.masked:
                report.count(RULE_MASK)
