"""QuantizeGeluPass: ONNX Gelu (opset 20) -> ai.bct_onnx BlockGelu with float operands.

The erf/tanh decompositions older exports write are fused into the same BlockGelu by
FuseGeluPass. Operands stay float32 here (in_bits = out_bits = 0); FoldQuantizeDequantizePass
makes the result compressed where every reader takes codes.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, register_domain
from bct_onnx.passes.graph_patterns import FLOAT, replace_pattern
from bct_onnx.passes.nonlinear_ops import settings_name

from bct_onnx import ops
from bct_onnx.config import CompressConfig

logger = logging.getLogger(__name__)

RULE = "Gelu"


class QuantizeGeluPass(NodeRewritePass):
    """Rewrite ONNX Gelu into BlockGelu (float in/out)."""

    op_types = frozenset({"Gelu"})

    def __init__(self, config: CompressConfig) -> None:
        super().__init__()
        self.config = config

    def match(self, model: ir.Model, node: ir.Node) -> tuple[ir.Node, str] | str | None:
        x = node.inputs[0]
        if x is None:
            return "Gelu with a missing input"
        if not self.config.settings_for("Gelu", settings_name(node)).enabled:
            return "Gelu compression is disabled for this node by the config"
        if x.dtype is not None and x.dtype != FLOAT:
            return f"input dtype {x.dtype.name} is not float32"
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
        replace_pattern([node], [gelu], node.outputs[0], gelu.outputs[0])
        register_domain(model)
        report.count(RULE)
