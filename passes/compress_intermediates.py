"""CompressIntermediatesPass: intermediate results between compressed ops stay compressed.

After the quantize passes every compressed nonlinear op, BlockActMatMul and BlockMatMul has float
operands, as if each edge between two of them were ``requantize -> dequantize`` folded away. This
pass makes the edge carry codes + scales (+ zero points) instead: the producer gets ``out_bits`` etc.
and every reader ``in_bits`` etc. with the same format (docs/ops.md, operand convention; BlockMatMul
takes A's scales and zero points as inputs 5 and 6). An edge stays float when any reader needs
float, and the reason is reported:
- a weight-only ``BlockMatMul`` (act_bits 0) multiplies a float A;
- standard ONNX nodes (residual Add, Reshape, Where ...) and graph outputs need float;
- BlockActMatMul's B operand is always float (docs/ops.md).
When every reader is a BlockMatMul with the same act_bits and block_size, and the producer's result
is not one-signed (LayerNorm, MatMul: not GELU or softmax), the edge uses that BlockMatMul's own
run-time activation format (act_bits, block_size, symmetric, float32 scales): the MatMul then skips
its own quantization and computes exactly what it computed from the float edge. Otherwise the edge
uses the producer's format and a BlockMatMul reader dequantizes it and quantizes again (GELU results
stay asymmetric, which suits their one-signed range).
No-op ``Cast(to=float32)`` readers of such a result (BLOOM, GPT-Neo write them after the softmax)
are removed first. The producer's node settings give the format: ``act_bits`` and ``block_size`` of its op kind (after
overrides), asymmetric codes for Softmax and GELU results (one-signed), symmetric otherwise, scales
of the config's scale_kind. A node whose settings are disabled or weight-only (act_bits none)
keeps float results.

``compressed_activations`` lists the edges that stay compressed and the activation memory they
save per row (last-dim * (32 - effective bits per value) / 8 bytes).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import onnx_ir as ir
from bct_onnx.passes.framework import (
    FLOAT_RESULT_REASON,
    CompressPass,
    PassReport,
    Skip,
    iter_nodes,
    node_label,
    node_name,
)
from bct_onnx.passes.graph_patterns import last_dim, strip_float_cast, value_rank, value_shape
from bct_onnx.passes.infer_shapes import SHAPE_KEY, ensure_shapes
from bct_onnx.passes.operand_ops import (
    ASYMMETRIC_RESULTS,
    KIND_OF_OP,
    OPERAND_OPS,
    OPERAND_SLOTS,
    int_attr,
    is_ours,
)

from bct_onnx import ops
from bct_onnx.block_format import BlockFormat, ScaleKind
from bct_onnx.config import CompressConfig
from bct_onnx.reference_ops import activation_format

logger = logging.getLogger(__name__)

RULE = "intermediate kept compressed"
RULE_BYTES = "activation bytes saved per token (static last dims)"
RULE_CAST = "no-op float Cast after a compressed op removed"
_SCALE_BITS = {ScaleKind.FLOAT16: 16, ScaleKind.FLOAT32: 32, ScaleKind.POW2: 8, ScaleKind.FLOAT8E5M2: 8, ScaleKind.FLOAT8E4M3: 8}
# Ops whose result can be given as codes (out_bits) and whose operand 0 can be read as codes (in_bits).
PRODUCERS = OPERAND_OPS | {ops.BLOCK_MATMUL}
_KIND = {**KIND_OF_OP, ops.BLOCK_MATMUL: "MatMul"}
# BlockMatMul: A's scales and zero points are trailing inputs, after the weight and bias.
_MATMUL_A_SCALES = 5
_MATMUL_INPUTS = 7


def _reader_problem(value: ir.Value, producer_node: ir.Node) -> str | None:
    """None when every reader of value takes a quantized operand, else why not."""
    if value.is_graph_output():
        return "its result is a graph output (float32)"
    uses = list(value.uses())
    if not uses:
        return "its result is not read"
    for use in uses:
        reader = use.node
        label = f"{reader.op_type} '{node_label(reader)}'"
        if reader.graph is not producer_node.graph:
            return f"read by {label} in another graph"
        if is_ours(reader, ops.BLOCK_MATMUL):
            if use.idx != 0:
                return f"read by {label} as input {use.idx}, which is not its activation"
            if not int_attr(reader, "act_bits"):
                return f"read by {label}, which is weight-only (act_bits 0): its A stays float32"
            if int_attr(reader, "in_bits"):
                return f"read by {label}, whose operand is already quantized"
            continue
        if not is_ours(reader, *OPERAND_OPS):
            return f"read by {label}, which needs float32"
        if use.idx != 0:
            return f"read by {label} as input {use.idx}, which is float32 only"
        if int_attr(reader, "in_bits"):
            return f"read by {label}, whose operand is already quantized"
    return None


def _edge_format(producer_node: ir.Node, value: ir.Value, fmt: BlockFormat) -> BlockFormat:
    """The format of the edge: the readers' own BlockMatMul activation format when they all share
    one (so the MatMuls use the codes as they are instead of dequantizing and quantizing again;
    a GELU/SiLU result's small negative tail fits symmetric codes), else fmt."""
    del producer_node  # the readers decide
    readers = [use.node for use in value.uses()]
    if not all(is_ours(r, ops.BLOCK_MATMUL) for r in readers):
        return fmt
    own = {(int_attr(r, "act_bits"), int_attr(r, "block_size")) for r in readers}
    if len(own) != 1:
        return fmt
    act_bits, block_size = own.pop()
    return activation_format(act_bits, block_size)


def _annotate_matmul_result(node: ir.Node) -> None:
    """A BlockMatMul made by QuantizeMatMulPass has a new, shapeless result: its shape is A's with
    last dim N (recorded in value.meta like annotate_shapes does, never in the model)."""
    value = node.outputs[0]
    if not is_ours(node, ops.BLOCK_MATMUL) or value_shape(value) is not None:
        return
    a_shape = value_shape(node.inputs[0]) if node.inputs else None
    if a_shape is None or len(a_shape) == 0:
        return
    n = int_attr(node, "N")
    epilogue = node.attributes.get("epilogue")
    if epilogue is not None and epilogue.as_string() == "silu_gate":
        n //= 2  # gate and up rows give one output column each pair
    value.meta[SHAPE_KEY] = ir.Shape([*list(a_shape)[:-1], n])


def _operand_shape_hint(producer_node: ir.Node, value: ir.Value) -> ir.Shape | None:
    """The result's shape with A's last dim K, for a BlockMatMul producer (its result ends in N)."""
    shape = value_shape(value)
    if shape is None or not is_ours(producer_node, ops.BLOCK_MATMUL) or len(shape) == 0:
        return shape
    return ir.Shape([*list(shape)[:-1], int_attr(producer_node, "K")])


def _with_attrs(
    node: ir.Node, inputs: list[ir.Value | None], extra: dict[str, int | str], num_outputs: int
) -> ir.Node:
    """A copy of node with other inputs and extra attributes set."""
    attributes: dict[str, Any] = {name: attr.value for name, attr in node.attributes.items()}
    attributes.update(extra)
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    return ir.node(
        node.op_type,
        inputs,
        attributes=attributes,
        domain=node.domain,
        name=node.name,
        num_outputs=num_outputs,
    )


def _replace(node: ir.Node, new: ir.Node) -> None:
    graph = node.graph
    assert graph is not None
    count = min(len(node.outputs), len(new.outputs))
    for old_value, new_value in zip(node.outputs[:count], new.outputs[:count]):
        if SHAPE_KEY in old_value.meta:
            new_value.meta[SHAPE_KEY] = old_value.meta[SHAPE_KEY]
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [new], list(node.outputs[:count]), list(new.outputs[:count])
    )


def _bypass_float_casts(model: ir.Model, report: PassReport) -> None:
    """Cast(to=float32) of a float32 result of our ops is a no-op (BLOOM, GPT-Neo): read the result itself."""
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if not is_ours(node, *PRODUCERS) or int_attr(node, "out_bits"):
            continue
        value = node.outputs[0]
        pending = list(value.uses())
        while pending:
            use = pending.pop()
            cast = use.node
            to = cast.attributes.get("to")
            if cast.op_type != "Cast" or cast.domain not in ("", "ai.onnx") or to is None:
                continue
            if to.as_int() != ir.DataType.FLOAT.value or cast.outputs[0].is_graph_output():
                continue
            pending += list(cast.outputs[0].uses())  # Cast(Cast(x)) chains
            cast.outputs[0].replace_all_uses_with(value)
            graph = cast.graph
            assert graph is not None
            graph.remove(cast, safe=True)
            report.count(RULE_CAST)


def _declare_rank(operand: ir.Value | None, result_shape: ir.Shape | None) -> None:
    """Give a folded producer's float operand a declared shape when it has none.

    ONNX Runtime types a custom op's outputs through the op's shape inference, which needs the
    input's rank; where its own inference lost the rank (T5's decoder: Add of a position bias
    computed through Gather/Where), the codes output would be typed float and the model refused
    at load. The shape is the inferred one (of the operand, or the result: elementwise and row ops
    keep it) with every unnamed unknown dim given a name of its own, so no two dims are assumed
    equal.
    """
    if operand is None or operand.shape is not None or operand.is_graph_input():
        return
    shape = value_shape(operand) or result_shape
    if shape is None:
        return
    dims: list[int | str] = []
    for index, dim in enumerate(shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif isinstance(dim, ir.SymbolicDim) and dim.value:
            dims.append(dim.value)
        else:
            dims.append(f"bct_{operand.name or 'dim'}_{index}")
    operand.shape = ir.Shape(dims)
    if operand.dtype is None:
        operand.type = ir.TensorType(ir.DataType.FLOAT)


class CompressIntermediatesPass(CompressPass):
    """Give compressed ops quantized results/operands wherever all readers of an edge accept them."""

    def __init__(self, config: CompressConfig) -> None:
        super().__init__()
        self.config = config

    def _format(self, node: ir.Node) -> BlockFormat | str:
        kind = _KIND[node.op_type]
        settings = self.config.settings_for(kind, node_name(node))
        if not settings.enabled:
            return f"{kind} compression is disabled for this node by the config"
        fmt = settings.act_format(symmetric=node.op_type not in ASYMMETRIC_RESULTS)
        if fmt is None:
            return "act_bits is none (weight-only): intermediates stay float32"
        return fmt

    def run(self, model: ir.Model, report: PassReport) -> None:
        if not self.config.keep_compressed:
            return
        ensure_shapes(model)
        _bypass_float_casts(model, report)
        # Nodes already decided, by id, holding the node: folding replaces nodes, and a new node must
        # not get the id of a removed one (it would be passed over without a word).
        rejected: dict[int, ir.Node] = {}
        while True:
            candidate = None
            for node in iter_nodes(model.graph):  # RecursiveGraphIterator's order
                if id(node) in rejected or not is_ours(node, *PRODUCERS) or int_attr(node, "out_bits"):
                    continue
                candidate = node
                break
            if candidate is None:
                return
            rejected[id(candidate)] = candidate
            value = candidate.outputs[0]
            if is_ours(candidate, ops.BLOCK_MATMUL) and not any(
                is_ours(use.node, *PRODUCERS) for use in value.uses()
            ):
                continue  # no compressed reader: not an intermediate between compressed ops, nothing to say
            _annotate_matmul_result(candidate)
            fmt = self._format(candidate)
            problem = fmt if isinstance(fmt, str) else _reader_problem(value, candidate)
            d = last_dim(value)
            if problem is None and value_rank(value) is None:
                # ONNX Runtime types a custom op's outputs through its shape inference, which needs
                # the input's rank: without it the codes would be typed float (seen in T5's decoder).
                problem = "the rank of its result is unknown to shape inference"
            if problem is None and d is None and isinstance(fmt, BlockFormat) and fmt.bits != 8:
                problem = f"last dimension unknown and {fmt.bits}-bit rows may not fill whole bytes"
            if problem is not None:
                report.skip(candidate, FLOAT_RESULT_REASON + problem)
                continue
            assert isinstance(fmt, BlockFormat)
            fmt = _edge_format(candidate, value, fmt)
            self._fold(candidate, fmt, d or 0)
            report.count(RULE)
            if d:  # static last dim: bytes saved per row, rounded down (dynamic dims: see the summary)
                scale_bits = _SCALE_BITS[fmt.scale_kind] + (0 if fmt.symmetric else 8)
                report.count(RULE_BYTES, int(d * (32 - fmt.bits - scale_bits / fmt.block_size) / 8))

    def _fold(self, producer_node: ir.Node, fmt: BlockFormat, d: int) -> None:
        value = producer_node.outputs[0]
        operand = producer_node.inputs[0]
        base = strip_float_cast(operand)
        if operand is not None and base is not operand and not int_attr(producer_node, "in_bits"):
            producer_node.replace_input_with(0, base)  # ORT removes such Casts and loses the rank
        _declare_rank(producer_node.inputs[0], _operand_shape_hint(producer_node, value))
        outputs = 2 if fmt.symmetric else 3
        new_producer = _with_attrs(
            producer_node,
            list(producer_node.inputs),
            {
                "out_bits": fmt.bits,
                "out_block_size": fmt.block_size,
                "out_symmetric": int(fmt.symmetric),
                "out_scale_kind": fmt.scale_kind.value,
            },
            outputs,
        )
        base = value.name or node_label(producer_node)
        codes = new_producer.outputs[0]
        codes.name = f"{base}.codes"
        new_producer.outputs[1].name = f"{base}.scales"
        zero_points = None
        if not fmt.symmetric:
            zero_points = new_producer.outputs[2]
            zero_points.name = f"{base}.zero_points"
        codes.type = ir.TensorType(ir.DataType.UINT8)
        result_shape = value_shape(value)
        if result_shape is not None and len(result_shape) > 0:  # rank for the readers' own results
            last: int | ir.SymbolicDim = fmt.row_bytes(d) if d else ir.SymbolicDim(None)
            codes.meta[SHAPE_KEY] = ir.Shape([*list(result_shape)[:-1], last])
        graph = producer_node.graph
        assert graph is not None
        graph.insert_after(producer_node, [new_producer])
        for use in list(value.uses()):
            reader = use.node
            inputs: list[ir.Value | None]
            if is_ours(reader, ops.BLOCK_MATMUL):
                inputs = list(reader.inputs[:_MATMUL_A_SCALES])
                inputs += [None] * (_MATMUL_A_SCALES - len(inputs))
                inputs = [codes, *inputs[1:], new_producer.outputs[1], zero_points][:_MATMUL_INPUTS]
                d = int_attr(reader, "K") or d
            else:
                inputs = [codes, new_producer.outputs[1], zero_points, *list(reader.inputs[OPERAND_SLOTS:])]
            extra: dict[str, int | str] = {
                "in_bits": fmt.bits,
                "in_block_size": fmt.block_size,
                "in_symmetric": int(fmt.symmetric),
                "in_axis_size": d,
            }
            _replace(reader, _with_attrs(reader, inputs, extra, len(reader.outputs)))
        graph.remove(producer_node, safe=True)


@dataclasses.dataclass(frozen=True)
class CompressedTensor:
    """One edge that carries codes between two compressed ops."""

    name: str
    producer: str
    op_type: str
    last_dim: int | str | None
    bits: int
    block_size: int
    symmetric: bool
    scale_kind: str

    @property
    def effective_bits(self) -> float:
        """Bits per value including the block's scale (and zero point)."""
        scale_bits = _SCALE_BITS[ScaleKind(self.scale_kind)]
        return self.bits + (scale_bits + (0 if self.symmetric else 8)) / self.block_size

    def bytes_saved(self, length: int | None = None) -> float | None:
        """Bytes saved per row against float32; a symbolic last dim takes ``length`` (None: unknown)."""
        d = self.last_dim if isinstance(self.last_dim, int) else length
        return None if d is None else d * (32 - self.effective_bits) / 8


@dataclasses.dataclass(frozen=True)
class ActivationSummary:
    tensors: list[CompressedTensor]

    @property
    def count(self) -> int:
        return len(self.tensors)

    def bytes_saved_per_token(self, length: int | None = None) -> float:
        """Sum over compressed edges of last-dim * (32 - effective bits) / 8 (static dims only unless length)."""
        return sum(b for t in self.tensors if (b := t.bytes_saved(length)) is not None)

    @property
    def dynamic(self) -> int:
        return sum(1 for t in self.tensors if not isinstance(t.last_dim, int))

    def describe(self, length: int = 128) -> str:
        return (
            f"{self.count} intermediate tensors stay compressed; activation memory saved per token: "
            f"{self.bytes_saved_per_token():.1f} bytes over static last dims"
            + (
                f", {self.bytes_saved_per_token(length):.1f} bytes counting the {self.dynamic} "
                f"with a dynamic last dim (e.g. attention probabilities) at length {length}"
                if self.dynamic
                else ""
            )
        )


def compressed_activations(model: ir.Model) -> ActivationSummary:
    """The compressed edges of model: results of our ops with out_bits > 0."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        bits = int_attr(node, "out_bits") if is_ours(node, *PRODUCERS) else 0
        if not bits:
            continue
        kind = node.attributes.get("out_scale_kind")
        dim = (
            node.outputs[0].shape[-1]
            if node.outputs[0].shape is not None and len(node.outputs[0].shape)
            else None
        )
        # codes have no shape; the scales' producer knows D from the reader's in_axis_size
        readers = [u.node for u in node.outputs[0].uses()]
        axis = max((int_attr(r, "in_axis_size") for r in readers), default=0)
        last: int | str | None = axis if axis else (str(dim) if dim is not None else "dynamic")
        found.append(
            CompressedTensor(
                node.outputs[0].name or "",
                node_label(node),
                node.op_type,
                last,
                bits,
                int_attr(node, "out_block_size"),
                bool(int_attr(node, "out_symmetric", 1)),
                kind.as_string() if kind is not None else "float16",
            )
        )
    return ActivationSummary(found)


__all__ = [
    "ActivationSummary",
    "CompressIntermediatesPass",
    "CompressedTensor",
    "Skip",
    "compressed_activations",
]
