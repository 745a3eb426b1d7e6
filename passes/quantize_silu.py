"""QuantizeSiluPass: ONNX Swish with alpha 1 (opset 24) -> ai.bct_onnx BlockSilu with float operands.

The ``Mul(x, Sigmoid(x))`` older exports write (Llama family) is fused into the same BlockSilu by
FuseSiluPass. Operands stay float32 here (in_bits = out_bits = 0); FoldQuantizeDequantizePass
makes the result compressed where every reader takes codes.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, register_domain
from bct_onnx.passes.graph_patterns import FLOAT, replace_pattern, value_dtype
from bct_onnx.passes.nonlinear_ops import settings_name

from bct_onnx import ops
from bct_onnx.config import CompressConfig

logger = logging.getLogger(__name__)

RULE = "Silu"


class QuantizeSiluPass(NodeRewritePass):
    """Rewrite ONNX Swish (alpha = 1, i.e. SiLU) into BlockSilu (float in/out)."""

    op_types = frozenset({"Swish"})

    def __init__(self, config: CompressConfig) -> None:
        super().__init__()
        self.config = config

    def match(self, model: ir.Model, node: ir.Node) -> ir.Node | str | None:
        x = node.inputs[0]
        if x is None:
            return "Swish with a missing input"
        if not self.config.settings_for("Silu", settings_name(node)).enabled:
            return "Silu compression is disabled for this node by the config"
        dtype = value_dtype(x)
        if dtype is not None and dtype != FLOAT:
            return f"input dtype {dtype.name} is not float32"
        attr = node.attributes.get("alpha")
        alpha = attr.as_float() if attr is not None else 1.0
        if alpha != 1.0:
            return f"alpha={alpha} is not 1 (BlockSilu is x * sigmoid(x))"
        return node

    def rewrite(self, model: ir.Model, matched: ir.Node, report: PassReport) -> None:
        x = matched.inputs[0]
        assert x is not None
        silu = ir.node(ops.BLOCK_SILU, [x], domain=ops.DOMAIN, name=matched.name)
        replace_pattern([matched], [silu], matched.outputs[0], silu.outputs[0])
        register_domain(model)
        report.count(RULE)
