"""QuantizeGatherPass: Gather(table, indices) on axis 0 of a constant float32 [V, D] table -> BlockGather.

The table is quantized along D (its rows are independent blocks of codes), with
``config.embedding_format``. Gathers whose data is not a float tensor (shape arithmetic such as
``Gather(Shape(x), 0)``) are not embedding lookups and are ignored without a report.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_name, register_domain
from bct_onnx.passes.quantized_weights import (
    FLOAT_DTYPES,
    RULE_WIDE_SCALES,
    constant_tensor,
    existing_table_quantization,
    quantized_initializers,
    trim_trailing_none,
    zero_point_attributes,
)

from bct_onnx import ops
from bct_onnx.config import CompressConfig

logger = logging.getLogger(__name__)

RULE_GATHER = "Gather"
RULE_SHARED = "shared quantized table"
INDEX_DTYPES = (ir.DataType.INT64, ir.DataType.INT32)
_SHAPE_PRODUCERS = frozenset({"Shape", "Size", "ConstantOfShape", "NonZero", "Range"})


@dataclasses.dataclass(frozen=True)
class GatherMatch:
    gather: ir.Node
    indices: ir.Value
    table: ir.Value
    table_tensor: ir.TensorProtocol


def _tied_to_matmul(table: ir.Value) -> bool:
    """True when the table also feeds a MatMul, directly or through a Transpose (tied weights)."""
    for use in table.uses():
        reader = use.node
        if reader.op_type == "MatMul":
            return True
        if reader.op_type == "Transpose" and any(u.node.op_type == "MatMul" for u in reader.outputs[0].uses()):
            return True
    return False


def _is_index_arithmetic(data: ir.Value) -> bool:
    """True when data is integer (or comes from shape ops): not an embedding table."""
    if data.dtype is not None:
        return not data.dtype.is_floating_point()
    producer = data.producer()
    return producer is not None and producer.op_type in _SHAPE_PRODUCERS


class QuantizeGatherPass(NodeRewritePass):
    """Rewrite embedding lookups (Gather on axis 0 of a constant 2-D float32 table) into BlockGather."""

    op_types = frozenset({"Gather"})

    def __init__(self, config: CompressConfig) -> None:
        super().__init__()
        self.config = config

    def match(self, model: ir.Model, node: ir.Node) -> GatherMatch | str | None:
        data, indices = node.inputs[0], node.inputs[1]
        if data is None or indices is None:
            return "Gather with a missing input"
        if not self.config.settings_for("Gather", node_name(node)).enabled:
            return (
                None
                if _is_index_arithmetic(data)
                else "Gather compression is disabled for this node by the config"
            )
        tensor = constant_tensor(data)
        if tensor is None:
            if _is_index_arithmetic(data):
                return None
            if data.is_graph_input():
                return f"table '{data.name}' is a graph input, not a constant"
            return "table (input 0) is computed at run time, not a constant initializer"
        if tensor.dtype not in FLOAT_DTYPES:
            if not tensor.dtype.is_floating_point():
                return None  # a constant integer lookup (shape/index arithmetic), not an embedding
            return f"table dtype {tensor.dtype.name} is not FLOAT (float32)"
        rank = len(tensor.shape)
        if rank != 2:
            return f"table has rank {rank}; only 2-D [V, D] tables are compressed"
        axis_attr = node.attributes.get("axis")
        axis = axis_attr.as_int() if axis_attr is not None else 0
        if axis not in (0, -2):
            return f"Gather on axis {axis}; only axis 0 (row lookup) is compressed"
        if indices.dtype is not None and indices.dtype not in INDEX_DTYPES:
            return f"indices dtype {indices.dtype.name} is not int64/int32"
        rows, width = tuple(tensor.shape.numpy())
        if rows < 1 or width < 1:
            return f"table has an empty dimension ({rows} x {width})"
        return GatherMatch(node, indices, data, tensor)

    def rewrite(self, model: ir.Model, matched: GatherMatch, report: PassReport) -> None:
        graph = model.graph
        gather = matched.gather
        fmt = self.config.settings_for("Gather", node_name(gather)).weight_format
        # A tied table (also the output projection) is quantized first by QuantizeMatMulPass, in the
        # MatMul's format and GPTQ-rounded when calibrated: with equal bits, block size and symmetry
        # the Gather reads that copy, so the table is stored once.
        rows, width = tuple(matched.table_tensor.shape.numpy())
        quantized = existing_table_quantization(graph, matched.table, fmt, rows, width)
        if quantized is None:
            if _tied_to_matmul(matched.table):
                # Its error also reaches the logits: use the MatMul's scale kind.
                matmul_kind = self.config.settings_for("MatMul", matched.table.name or "").scale_kind
                fmt = dataclasses.replace(fmt, scale_kind=matmul_kind)
            quantized = quantized_initializers(
                graph,
                matched.table,
                matched.table_tensor,
                fmt,
                transposed=False,
                scale_search=self.config.weight_scale_search,
            )
        name = node_name(matched.gather, "Gather")
        new_node = ir.node(
            ops.BLOCK_GATHER,
            trim_trailing_none([matched.indices, quantized.codes, quantized.scales, quantized.zero_points]),
            attributes={
                "bits": fmt.bits,
                "block_size": fmt.block_size,
                "symmetric": int(fmt.symmetric),
                **zero_point_attributes(fmt),
                "axis_size": quantized.axis_size,
            },
            domain=ops.DOMAIN,
            name=name,
        )
        old_output = matched.gather.outputs[0]
        owner = matched.gather.graph
        assert owner is not None
        ir.convenience.replace_nodes_and_values(
            owner, matched.gather, [matched.gather], [new_node], [old_output], [new_node.outputs[0]]
        )
        register_domain(model)
        report.count(RULE_GATHER)
        if quantized.reused:
            report.count(RULE_SHARED)
        if quantized.widened:
            report.count(RULE_WIDE_SCALES)
