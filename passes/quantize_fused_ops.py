"""QuantizeFusedOpsPass: weights inside ONNX Runtime's fused ops (com.microsoft) stored blockwise, ops kept fused.

Graphs already fused by onnxruntime.transformers.optimizer (BERT/MiniLM: Attention,
EmbedLayerNormalization, SkipLayerNormalization, BiasGelu, FastGelu) or by onnxruntime-genai's
builder in float (GroupQueryAttention, SkipSimplifiedLayerNormalization, RotaryEmbedding) keep those
nodes. Their plain MatMuls and Gathers are compressed by the usual passes; this pass handles the
weights the fused nodes hold themselves:

- Attention's packed QKV weight [K, 3N] (input 1) -> codes + scales blocked along its last axis
  (3N), read through BlockDequantize; the node still projects and attends in one kernel;
- EmbedLayerNormalization's word table [V, D] (input 2) -> BlockGather of the token rows, handed to
  the node as a [B*S, D] table read with ids 0..B*S-1 (same rows, same order), so the fused sum of
  word, position and segment embeddings and its LayerNorm stay one node.

The fused nonlinear ops have no bct-onnx counterpart (a residual add + norm with bias, a bias + GELU,
rotary, grouped-query attention over a float cache): each is reported as a skip with that reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_name, register_domain
from bct_onnx.passes.quantized_weights import (
    FLOAT_DTYPES,
    RULE_WIDE_SCALES,
    constant_tensor,
    quantized_initializers,
    trim_trailing_none,
    zero_point_attributes,
)

from bct_onnx import ops
from bct_onnx.config import CompressConfig

ORT_DOMAIN = "com.microsoft"
RULE_ATTENTION = "Attention weight (BlockDequantize)"
RULE_EMBED = "EmbedLayerNormalization word table (BlockGather)"
# Fused ops kept as they are, and why.
KEPT_FLOAT = {
    "SkipLayerNormalization": "residual Add + LayerNormalization with bias: no bct-onnx op fuses the Add",
    "SkipSimplifiedLayerNormalization": "residual Add + RMS normalization: no bct-onnx op fuses the Add",
    "SimplifiedLayerNormalization": "ONNX Runtime's RMS normalization op: kept fused in float",
    "BiasGelu": "bias Add + GELU: BlockGelu has no bias input",
    "FastGelu": "tanh GELU with optional bias: BlockGelu has no bias input",
    "Gelu": "ONNX Runtime's contrib Gelu: kept fused in float",
    "QuickGelu": "x * sigmoid(1.702 x): no bct-onnx op",
    "RotaryEmbedding": "rotary position embedding: no bct-onnx op",
    "GroupQueryAttention": "attention over a float KV cache inside one ONNX Runtime kernel: kept as it is",
    "MultiHeadAttention": "attention inside one ONNX Runtime kernel: kept as it is",
    "BiasSplitGelu": "bias + split + GELU: no bct-onnx op",
}


@dataclasses.dataclass(frozen=True)
class FusedWeightMatch:
    node: ir.Node
    slot: int  # input index of the weight
    weight: ir.Value
    tensor: ir.TensorProtocol


class QuantizeFusedOpsPass(NodeRewritePass):
    """Attention QKV weights and EmbedLayerNormalization word tables of com.microsoft nodes -> blockwise."""

    op_types = frozenset({"Attention", "EmbedLayerNormalization", *KEPT_FLOAT})

    def __init__(self, config: CompressConfig) -> None:
        super().__init__()
        self.config = config

    def candidates(self, model: ir.Model):  # type: ignore[no-untyped-def]
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.domain == ORT_DOMAIN and node.op_type in self.op_types:
                yield node

    def match(self, model: ir.Model, node: ir.Node) -> FusedWeightMatch | str | None:
        if node.op_type in KEPT_FLOAT:
            return f"fused {ORT_DOMAIN} op kept as it is: {KEPT_FLOAT[node.op_type]}"
        kind, slot = ("MatMul", 1) if node.op_type == "Attention" else ("Gather", 2)
        if not self.config.settings_for(kind, node_name(node)).enabled:
            return f"{kind} compression is disabled for this node by the config"
        weight = node.inputs[slot] if len(node.inputs) > slot else None
        tensor = constant_tensor(weight)
        if weight is None or tensor is None:
            return f"input {slot} of {node.op_type} is not a constant initializer"
        if tensor.dtype not in FLOAT_DTYPES:
            return f"input {slot} dtype {tensor.dtype.name} is not FLOAT (float32)"
        if len(tensor.shape) != 2:
            return f"input {slot} has rank {len(tensor.shape)}, not 2"
        if node.op_type == "EmbedLayerNormalization" and node.inputs[0] is None:
            return "EmbedLayerNormalization without input_ids"
        return FusedWeightMatch(node, slot, weight, tensor)

    def rewrite(self, model: ir.Model, matched: FusedWeightMatch, report: PassReport) -> None:
        node = matched.node
        kind = "MatMul" if node.op_type == "Attention" else "Gather"
        fmt = self.config.settings_for(kind, node_name(node)).weight_format
        quantized = quantized_initializers(
            model.graph,
            matched.weight,
            matched.tensor,
            fmt,
            transposed=False,
            scale_search=self.config.weight_scale_search,
        )
        attributes = {
            "bits": fmt.bits,
            "block_size": fmt.block_size,
            "symmetric": int(fmt.symmetric),
            **zero_point_attributes(fmt),
            "axis_size": quantized.axis_size,
        }
        stored = trim_trailing_none([quantized.codes, quantized.scales, quantized.zero_points])
        base = node_name(node, node.op_type)
        graph = node.graph
        assert graph is not None
        if node.op_type == "Attention":
            dequantize = ir.node(
                ops.BLOCK_DEQUANTIZE, stored, attributes, domain=ops.DOMAIN, name=f"{base}.weight_dequantize"
            )
            dequantize.outputs[0].name = f"{matched.weight.name}.dequantized"
            graph.insert_before(node, [dequantize])
            node.replace_input_with(matched.slot, dequantize.outputs[0])
            report.count(RULE_ATTENTION)
        else:
            graph.insert_before(
                node, self._gathered_table(node, stored, attributes, quantized.axis_size, base)
            )
            report.count(RULE_EMBED)
        register_domain(model)
        if quantized.widened:
            report.count(RULE_WIDE_SCALES)

    @staticmethod
    def _gathered_table(
        node: ir.Node, stored: list[ir.Value | None], attributes: dict[str, int], width: int, base: str
    ) -> list[ir.Node]:
        """Nodes giving ``node`` the token rows as its word table and ids 0..B*S-1 into them."""
        ids = node.inputs[0]
        assert ids is not None

        def const(name: str, array: np.ndarray) -> ir.Value:
            return ir.node("Constant", [], {"value": ir.tensor(array, name=f"{base}.{name}")}).outputs[0]

        nodes: list[ir.Node] = []

        def add(op_type: str, inputs: list[ir.Value], name: str, **attrs: object) -> ir.Value:
            new = ir.node(op_type, inputs, attrs, name=f"{base}.{name}")  # type: ignore[arg-type]
            new.outputs[0].name = f"{base}.{name}_output"
            nodes.append(new)
            return new.outputs[0]

        rows = ir.node(
            ops.BLOCK_GATHER, [ids, *stored], attributes, domain=ops.DOMAIN, name=f"{base}.word_rows"
        )
        rows.outputs[0].name = f"{base}.word_rows_output"
        nodes.append(rows)
        flat_shape = const("flat_shape", np.array([-1, width], np.int64))
        zero = const("zero", np.array(0, np.int32))
        one = const("one", np.array(1, np.int32))
        for value in (flat_shape, zero, one):
            assert value.producer() is not None
            nodes.append(value.producer())  # type: ignore[arg-type]
        table = add("Reshape", [rows.outputs[0], flat_shape], "word_table")
        count = add(
            "Cast", [add("Size", [ids], "token_count")], "token_count_int32", to=int(ir.DataType.INT32)
        )
        positions = add("Range", [zero, count, one], "row_ids")
        row_ids = add("Reshape", [positions, add("Shape", [ids], "ids_shape")], "row_ids_shaped")
        node.replace_input_with(0, row_ids)
        node.replace_input_with(2, table)
        return nodes
