"""QuantizeGeluPass: ONNX Gelu (opset 20) -> ai.bct_onnx BlockGelu with float operands.

The erf/tanh decompositions older exports write are fused into the same BlockGelu by
FuseGeluPass. Operands stay float32 here (in_bits = out_bits = 0); CompressIntermediatesPass
makes the result compressed where every reader takes codes.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from bct_onnx.passes.framework import PassReport
from bct_onnx.passes.operand_ops import OperandRewritePass, operand_skip_reason, replace_with_ours

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "Gelu"


class QuantizeGeluPass(OperandRewritePass):
    """Rewrite ONNX Gelu into BlockGelu (float in/out)."""

    op_types = frozenset({"Gelu"})

    def match(self, model: ir.Model, node: ir.Node) -> tuple[ir.Node, str] | str | None:
        reason = operand_skip_reason(self.config, node, "Gelu")
        if reason is not None:
            return reason
        attr = node.attributes.get("approximate")
        approximate = attr.as_string() if attr is not None else "none"
        if approximate not in ("none", "tanh"):
            return f"approximate={approximate!r} is not none/tanh"
        return node, approximate

    def rewrite(self, model: ir.Model, matched: tuple[ir.Node, str], report: PassReport) -> None:
        node, approximate = matched
        x = node.inputs[0]
        assert x is not None
        gelu = ir.node(
            ops.BLOCK_GELU, [x], attributes={"approximate": approximate}, domain=ops.DOMAIN, name=node.name
        )
        replace_with_ours(model, [node], [gelu], report, RULE)
