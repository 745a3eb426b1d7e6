"""QuantizeLayerNormPass: ONNX LayerNormalization over the last axis -> ai.bct_onnx BlockLayerNorm.

Float operands first (in_bits = out_bits = 0); CompressIntermediatesPass decides where they
become compressed. RMS normalization reaches the same stage as BlockRMSNorm through
FuseRMSNormPass (both are the config's "LayerNormalization" kind). Requires constant float32
scale (and bias) of shape [D] and no use of the optional Mean / InvStdDev outputs.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from bct_onnx.passes.framework import PassReport, node_name
from bct_onnx.passes.fuse_layer_norm import vector_initializer
from bct_onnx.passes.graph_patterns import FLOAT, last_dim, value_rank
from bct_onnx.passes.operand_ops import (
    OperandRewritePass,
    operand_inputs,
    operand_skip_reason,
    replace_with_ours,
)
from bct_onnx.passes.quantized_weights import constant_tensor

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "LayerNormalization"


@dataclasses.dataclass(frozen=True)
class LayerNormMatch:
    node: ir.Node
    x: ir.Value
    d: int
    epsilon: float


class QuantizeLayerNormPass(OperandRewritePass):
    """Rewrite LayerNormalization (last axis, constant affine) into BlockLayerNorm."""

    op_types = frozenset({"LayerNormalization"})
    needs_shapes = True  # ranks and last dims, kept in value.meta (not in the model)

    def match(self, model: ir.Model, node: ir.Node) -> LayerNormMatch | str | None:
        reason = operand_skip_reason(self.config, node, "LayerNormalization")
        if reason is not None:
            return reason
        x = node.inputs[0]
        assert x is not None
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
        replace_with_ours(model, [node], [new], report, RULE)
