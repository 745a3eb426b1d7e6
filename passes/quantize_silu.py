"""QuantizeSiluPass: ONNX Swish with alpha 1 (opset 24) -> ai.bct_onnx BlockSilu with float operands.

The ``Mul(x, Sigmoid(x))`` older exports write (Llama family) is fused into the same BlockSilu by
FuseSiluPass. Operands stay float32 here (in_bits = out_bits = 0); CompressIntermediatesPass
makes the result compressed where every reader takes codes.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from bct_onnx.passes.framework import PassReport
from bct_onnx.passes.operand_ops import OperandRewritePass, operand_skip_reason, replace_with_ours

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "Silu"


class QuantizeSiluPass(OperandRewritePass):
    """Rewrite ONNX Swish (alpha = 1, i.e. SiLU) into BlockSilu (float in/out)."""

    op_types = frozenset({"Swish"})

    def match(self, model: ir.Model, node: ir.Node) -> ir.Node | str | None:
        reason = operand_skip_reason(self.config, node, "Silu", inferred_dtype=True)
        if reason is not None:
            return reason
        attr = node.attributes.get("alpha")
        alpha = attr.as_float() if attr is not None else 1.0
        if alpha != 1.0:
            return f"alpha={alpha} is not 1 (BlockSilu is x * sigmoid(x))"
        return node

    def rewrite(self, model: ir.Model, matched: ir.Node, report: PassReport) -> None:
        x = matched.inputs[0]
        assert x is not None
        silu = ir.node(ops.BLOCK_SILU, [x], domain=ops.DOMAIN, name=matched.name)
        replace_with_ours(model, [matched], [silu], report, RULE)
