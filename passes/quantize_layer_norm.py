"""QuantizeLayerNormPass: ONNX LayerNormalization over the last axis -> ai.bct_onnx BlockLayerNorm.

Float operands first (in_bits = out_bits = 0); FoldQuantizeDequantizePass decides where they
become compressed. RMS normalization reaches the same stage as BlockRMSNorm through
FuseRMSNormPass (both are the config's "LayerNormalization" kind). Requires constant float32
scale (and bias) of shape [D] and no use of the optional Mean / InvStdDev outputs.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, register_domain
from bct_onnx.passes.fuse_layer_norm import vector_initializer
from bct_onnx.passes.graph_patterns import FLOAT, last_dim, node_name, replace_pattern, value_rank
from bct_onnx.passes.infer_shapes import ensure_shapes
from bct_onnx.passes.nonlinear_ops import operand_inputs, settings_name
from bct_onnx.passes.quantized_weights import constant_tensor

from bct_onnx import ops
from bct_onnx.config import CompressConfig

logger = logging.getLogger(__name__)

RULE = "LayerNormalization"


@dataclasses.dataclass(frozen=True)
class LayerNormMatch:
    node: ir.Node
    x: ir.Value
    d: int
    epsilon: float


class QuantizeLayerNormPass(NodeRewritePass):
    """Rewrite LayerNormalization (last axis, constant affine) into BlockLayerNorm."""

    op_types = frozenset({"LayerNormalization"})

    def run(self, model: ir.Model, report: PassReport) -> None:
        ensure_shapes(model)  # ranks and last dims, kept in value.meta (not in the model)
        super().run(model, report)

    def __init__(self, config: CompressConfig) -> None:
        super().__init__()
        self.config = config

    def match(self, model: ir.Model, node: ir.Node) -> LayerNormMatch | str | None:
        x = node.inputs[0]
        if x is None:
            return "LayerNormalization with a missing input"
        if not self.config.settings_for("LayerNormalization", settings_name(node)).enabled:
            return "LayerNormalization compression is disabled for this node by the config"
        if x.dtype is not None and x.dtype != FLOAT:
            return f"input dtype {x.dtype.name} is not float32"
        attr = node.attributes.get("axis")
        axis = attr.as_int() if attr is not None else -1
        rank = value_rank(x)
        if axis != -1 and (rank is None or axis != rank - 1):
            return f"normalizes from axis {axis} (rank {rank}); BlockLayerNorm normalizes the last axis only"
        d = last_dim(x)
        if d is None:
            return "the normalized (last) dimension is unknown"
        for index, what in ((1, "scale"), (2, "bias")):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None:
                continue
            tensor = constant_tensor(value)
            if tensor is None or tensor.dtype != FLOAT or tensor.size != d:
                return f"{what} is not a constant float32 tensor of {d} elements"
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                return "the Mean / InvStdDev outputs are used; BlockLayerNorm does not give them"
        eps_attr = node.attributes.get("epsilon")
        return LayerNormMatch(node, x, d, eps_attr.as_float() if eps_attr is not None else 1e-5)

    def rewrite(self, model: ir.Model, matched: LayerNormMatch, report: PassReport) -> None:
        node = matched.node
        name = node_name(node, "LayerNorm")
        scale_in = node.inputs[1] if len(node.inputs) > 1 else None
        bias_in = node.inputs[2] if len(node.inputs) > 2 else None
        scale = vector_initializer(model, scale_in, matched.d, f"{name}.scale", 1.0)
        bias = (
            vector_initializer(model, bias_in, matched.d, f"{name}.bias", 0.0)
            if bias_in is not None
            else None
        )
        new = ir.node(
            ops.BLOCK_LAYER_NORM,
            operand_inputs(matched.x, [scale, bias]),
            attributes={"epsilon": matched.epsilon},
            domain=ops.DOMAIN,
            name=node.name,
        )
        replace_pattern([node], [new], node.outputs[0], new.outputs[0])
        register_domain(model)
        report.count(RULE)
