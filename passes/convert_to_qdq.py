"""ConvertToQDQPass: BlockMatMul / BlockGather -> standard DequantizeLinear(block_size) + MatMul / Gather.

The result runs in any ONNX runtime, without the bct-onnx library: weights and embedding tables
stay blockwise-quantized as opset-21 DequantizeLinear with ``block_size`` (int4/uint4/int8/uint8;
int2/uint2 at opset 25), which ONNX Runtime fuses into MatMulNBits when it can. The codes and
scales the quantize passes chose are re-expressed, never quantized again, so the weights the
standard model computes are bit for bit ``block_format.dequantize`` of the custom-op model's:

- symmetric blocks: code ``u`` becomes the signed ``u - 2**(bits-1)``, no zero point;
- integer zero points: ``u`` and the zero point keep their values (unsigned type);
- widths without a standard type (3, 5, 6, 7 bits) are stored in 8-bit containers;
- scales become float32 (every scale kind converts exactly; DequantizeLinear computes in its
  scale's type, so float16 scales would round each weight to float16);
- float offsets (``u * scale + offset``) have no DequantizeLinear form: DequantizeLinear gives
  ``u * scale`` and an Add of the offsets, broadcast per block, follows (exact, not fused by ORT).

What the standard cannot express is counted under a rule starting with ``not expressible:``:
run-time blockwise activation quantization (``act_bits``: QuantizeLinear needs a scale given as an
input, DynamicQuantizeLinear is per tensor) leaves those MatMuls' activations float unless the
pass is asked to write it as in-graph scales + QuantizeLinear/DequantizeLinear (``activations``),
and compressed operands (codes between the nonlinear ops) are not converted at all (the node is
reported as skipped). The model is first converted to the opset the new nodes need
(ConvertOpsetPass: onnx.version_converter, never a bare bump).
"""

from __future__ import annotations

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir
from bct_onnx.passes.convert_opset import convert_opset, min_ir_version
from bct_onnx.passes.framework import CompressPass, PassReport, onnx_opset
from bct_onnx.passes.quantized_weights import node_zero_points

from bct_onnx import ops
from bct_onnx.block_format import BlockFormat, ZeroPointKind, scale_kind_of, scales_to_float32, unpack_codes

logger = logging.getLogger(__name__)

QDQ_OPSET = 21  # DequantizeLinear with block_size, int4/uint4
QDQ_OPSET_2BIT = 25  # int2/uint2

RULE_MATMUL = "MatMul as DequantizeLinear + MatMul"
RULE_GATHER = "Gather as DequantizeLinear + Gather"
RULE_SHARED = "DequantizeLinear shared by a Gather and a MatMul (tied table)"
RULE_OFFSETS = "float offsets added after DequantizeLinear"
RULE_ACT_BITS = "not expressible: run-time activation quantization (act_bits) left out, activations stay float"
RULE_ACT_QDQ = "run-time activation quantization as in-graph scales + QuantizeLinear/DequantizeLinear"
RULE_OPSET = "ONNX opset converted (onnx.version_converter)"
CONTAINER_PREFIX = "codes in an 8-bit container: "  # + "<bits>-bit"
TYPE_PREFIX = "codes as "  # + "int4" ...

_STANDARD_SIGNED = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}
_STANDARD_UNSIGNED = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4, 8: np.uint8}


@dataclasses.dataclass(frozen=True)
class StandardBlockTensor:
    """The DequantizeLinear inputs of one block-format tensor [rows, D] (or its transpose).

    ``dequantize_linear(t)`` (ONNX semantics) equals ``block_format.dequantize`` of the source bit
    for bit, plus ``offsets`` broadcast per block when the source has float offsets.
    """

    codes: np.ndarray  # ml_dtypes / numpy integer array, [rows, D] or [D, rows] when transposed
    scales: np.ndarray  # float32, [rows, nb] or [nb, rows]
    zero_points: np.ndarray | None  # same dtype as codes, same shape as scales
    offsets: np.ndarray | None  # float32, same shape as scales (float-offset blocks only)
    axis: int  # the blocked axis: 1, or 0 when transposed
    block_size: int
    bits: int
    container: bool  # True: a width without a standard type, stored in 8 bits

    @property
    def type_name(self) -> str:
        return np.dtype(self.codes.dtype).name


def block_format_of(bits: int, block_size: int, symmetric: bool, scales: np.ndarray, zero_points: np.ndarray | None) -> BlockFormat:
    """The BlockFormat of stored tensors, the scale kind and zero-point kind read from their dtypes."""
    offsets = zero_points is not None and zero_points.dtype != np.uint8
    kind = ZeroPointKind.FLOAT if offsets else ZeroPointKind.INTEGER
    return BlockFormat(bits, block_size, symmetric, scale_kind_of(scales), kind)


def standard_block_tensor(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    fmt: BlockFormat,
    axis_size: int,
    transposed: bool,
) -> StandardBlockTensor:
    """Re-express packed codes [rows, row_bytes] with their scales in DequantizeLinear's terms."""
    codes = unpack_codes(packed, fmt.bits, axis_size)  # unsigned u, [rows, D]
    container = fmt.bits not in _STANDARD_SIGNED
    zp: np.ndarray | None = None
    offsets: np.ndarray | None = None
    if fmt.symmetric:
        signed = codes.astype(np.int16) - fmt.implicit_zero_point
        q = signed.astype(_STANDARD_SIGNED.get(fmt.bits, np.int8))
    else:
        dtype = _STANDARD_UNSIGNED.get(fmt.bits, np.uint8)
        q = codes.astype(dtype)
        assert zero_points is not None
        if fmt.zero_point_kind is ZeroPointKind.INTEGER:
            zp = zero_points.astype(dtype)
        else:
            offsets = zero_points.astype(np.float32)
    scale32 = scales_to_float32(scales, fmt.scale_kind)
    if transposed:
        q = np.ascontiguousarray(q.T)
        scale32 = np.ascontiguousarray(scale32.T)
        zp = None if zp is None else np.ascontiguousarray(zp.T)
        offsets = None if offsets is None else np.ascontiguousarray(offsets.T)
    return StandardBlockTensor(q, scale32, zp, offsets, 0 if transposed else 1, fmt.block_size, fmt.bits, container)


def dequantize_linear(t: StandardBlockTensor) -> np.ndarray:
    """ONNX DequantizeLinear (blocked) of t, then the offsets: the float32 weight a runtime computes."""
    blocked = t.codes.shape[t.axis]
    scale = np.repeat(t.scales, t.block_size, axis=t.axis).take(range(blocked), axis=t.axis)
    values = t.codes.astype(np.float32)
    if t.zero_points is not None:
        values = values - np.repeat(t.zero_points, t.block_size, axis=t.axis).take(range(blocked), axis=t.axis).astype(np.float32)
    values = (values * scale).astype(np.float32)
    if t.offsets is not None:
        values = (values + np.repeat(t.offsets, t.block_size, axis=t.axis).take(range(blocked), axis=t.axis)).astype(np.float32)
    return values


def required_opset(model: ir.Model) -> int:
    """The opset the converted nodes need: 25 when a 2-bit weight or table is present, else 21."""
    for node in _block_weight_nodes(model):
        bits = node.attributes.get("bits")
        if bits is not None and bits.as_int() == 2:
            return QDQ_OPSET_2BIT
    return QDQ_OPSET


def _block_weight_nodes(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.domain == ops.DOMAIN and node.op_type in (ops.BLOCK_MATMUL, ops.BLOCK_GATHER)
    ]


def _attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _compressed_operands(node: ir.Node) -> bool:
    """True when the node reads or writes codes (a folded activation) instead of float tensors."""
    return len(node.outputs) > 1 or any(_attr(node, name) for name in ("in_bits", "out_bits")) or len(node.inputs) > 5


class ConvertToQDQPass(CompressPass):
    """Rewrite BlockMatMul / BlockGather with constant codes into DequantizeLinear + MatMul / Gather.

    activations: also express a BlockMatMul's run-time activation quantization (act_bits) in
    standard ops: the block scales computed in the graph (ArgMax of |A| per block, the signed
    element / -2**(act_bits-1), as block_format.choose_scales), then QuantizeLinear (scale 1 on
    A / scale, which rounds half to even and saturates) and a blocked DequantizeLinear with those
    scales: A' is bit for bit block_format.fake_quantize(A). Runtimes execute it in float (slower
    than float activations; ONNX Runtime's MatMulNBits fusion then re-quantizes A' its own way at
    accuracy level 4), so it is off by default.
    """

    def __init__(self, activations: bool = False) -> None:
        super().__init__()
        self.activations = activations

    def run(self, model: ir.Model, report: PassReport) -> None:
        if not _block_weight_nodes(model):
            return
        target = required_opset(model)
        if convert_opset(model, target):
            report.count(RULE_OPSET)
        model.ir_version = max(model.ir_version, min_ir_version(onnx_opset(model) or target))
        dequantized: dict[tuple[str, bool], ir.Value] = {}  # (codes name, transposed) -> weight value
        nodes = _block_weight_nodes(model)  # after the conversion: the new graph's nodes
        gather_codes = {n.inputs[1].name for n in nodes if n.op_type == ops.BLOCK_GATHER and n.inputs[1] is not None}
        for node in nodes:
            reason = self._check(node)
            if reason is not None:
                report.skip(node, reason)
                continue
            self._rewrite(model, node, gather_codes, dequantized, report)

    def _check(self, node: ir.Node) -> str | None:
        if _compressed_operands(node):
            return "reads or writes a compressed activation (codes), which standard ONNX has no type for"
        for index in (1, 2, 3):
            value = node.inputs[index] if len(node.inputs) > index else None
            if index == 3 and value is None:
                continue
            if value is None or value.const_value is None:
                return f"input {index} is not a constant initializer"
        return None

    def _weight(
        self,
        model: ir.Model,
        node: ir.Node,
        transposed: bool,
        dequantized: dict[tuple[str, bool], ir.Value],
        report: PassReport,
    ) -> ir.Value:
        """The float weight value (DequantizeLinear output, offsets added), made once per codes tensor."""
        codes_value = node.inputs[1]
        assert codes_value is not None
        key = (codes_value.name or "", transposed)
        if key in dequantized:
            return dequantized[key]
        packed, scales = _array(codes_value), _array(node.inputs[2])
        assert packed is not None and scales is not None
        zero_points = node_zero_points(node, _array(node.inputs[3]) if len(node.inputs) > 3 else None, scales)
        fmt = block_format_of(_attr(node, "bits"), _attr(node, "block_size"), bool(_attr(node, "symmetric", 1)), scales, zero_points)
        axis_size = _attr(node, "K") if node.op_type == ops.BLOCK_MATMUL else _attr(node, "axis_size")
        standard = standard_block_tensor(packed, scales, zero_points, fmt, axis_size, transposed)
        base = (codes_value.name or "weight").removesuffix(".codes") + (".qdq_t" if transposed else ".qdq")
        graph = model.graph
        inputs = [
            _initializer(graph, f"{base}.codes", standard.codes),
            _initializer(graph, f"{base}.scales", standard.scales),
        ]
        if standard.zero_points is not None:
            inputs.append(_initializer(graph, f"{base}.zero_points", standard.zero_points))
        for value in inputs:  # keep the source and block-format tags (inspect reads the true width)
            value.metadata_props.update(codes_value.metadata_props)
        owner = node.graph
        assert owner is not None
        dq = ir.node(
            "DequantizeLinear",
            inputs,
            attributes={"axis": standard.axis, "block_size": standard.block_size},
            name=f"{base}.DequantizeLinear",
        )
        owner.insert_before(node, dq)
        weight = dq.outputs[0]
        weight.name = f"{base}.weight"
        if standard.offsets is not None:
            weight = self._add_offsets(graph, owner, node, weight, standard, f"{base}.offsets")
            report.count(RULE_OFFSETS)
        report.count(
            CONTAINER_PREFIX + f"{standard.bits}-bit" if standard.container else TYPE_PREFIX + standard.type_name
        )
        dequantized[key] = weight
        return weight

    def _add_offsets(
        self,
        graph: ir.Graph,
        owner: ir.Graph,
        before: ir.Node,
        weight: ir.Value,
        standard: StandardBlockTensor,
        name: str,
    ) -> ir.Value:
        """weight + offsets broadcast per block: pad to whole blocks, Reshape, Add, Reshape back, Slice.

        New initializers go to the main graph (``graph``), the nodes next to ``before`` in ``owner``.
        """
        blocked = standard.codes.shape[standard.axis]
        other = standard.codes.shape[1 - standard.axis]
        nb = standard.scales.shape[standard.axis]
        padded = nb * standard.block_size
        nodes: list[ir.Node] = []
        value = weight
        if padded != blocked:
            pads = [0, 0, 0, 0]
            pads[2 + standard.axis] = padded - blocked
            pad = ir.node("Pad", [value, _initializer(graph, f"{name}.pads", np.array(pads, np.int64))])
            nodes.append(pad)
            value = pad.outputs[0]
        if standard.axis == 0:
            blocks_shape, offsets = [nb, standard.block_size, other], standard.offsets[:, None, :]
        else:
            blocks_shape, offsets = [other, nb, standard.block_size], standard.offsets[:, :, None]
        reshape = ir.node("Reshape", [value, _initializer(graph, f"{name}.block_shape", np.array(blocks_shape, np.int64))])
        add = ir.node("Add", [reshape.outputs[0], _initializer(graph, name, np.ascontiguousarray(offsets))])
        full = [padded, other] if standard.axis == 0 else [other, padded]
        back = ir.node("Reshape", [add.outputs[0], _initializer(graph, f"{name}.shape", np.array(full, np.int64))])
        nodes += [reshape, add, back]
        value = back.outputs[0]
        if padded != blocked:
            slice_ = ir.node(
                "Slice",
                [
                    value,
                    _initializer(graph, f"{name}.starts", np.array([0], np.int64)),
                    _initializer(graph, f"{name}.ends", np.array([blocked], np.int64)),
                    _initializer(graph, f"{name}.axes", np.array([standard.axis], np.int64)),
                ],
            )
            nodes.append(slice_)
            value = slice_.outputs[0]
        owner.insert_before(before, nodes)
        return value

    def _rewrite(
        self,
        model: ir.Model,
        node: ir.Node,
        gather_codes: set[str | None],
        dequantized: dict[tuple[str, bool], ir.Value],
        report: PassReport,
    ) -> None:
        owner = node.graph
        assert owner is not None
        name = node.name or (node.outputs[0].name or node.op_type)
        if node.op_type == ops.BLOCK_GATHER:
            table = self._weight(model, node, transposed=False, dequantized=dequantized, report=report)
            new_nodes = [ir.node("Gather", [table, node.inputs[0]], attributes={"axis": 0}, name=name)]
            report.count(RULE_GATHER)
        else:
            shared = node.inputs[1] is not None and node.inputs[1].name in gather_codes
            weight = self._weight(model, node, transposed=not shared, dequantized=dequantized, report=report)
            new_nodes = []
            if shared:  # the table's [N, K] layout feeds the Gather too: transpose it for the MatMul
                transpose = ir.node("Transpose", [weight], attributes={"perm": [1, 0]}, name=f"{name}.Transpose")
                new_nodes.append(transpose)
                weight = transpose.outputs[0]
                report.count(RULE_SHARED)
            activation = node.inputs[0]
            assert activation is not None
            act_bits = _attr(node, "act_bits")
            if act_bits and self.activations:
                act_nodes, activation = _activation_qdq(
                    model.graph, activation, _attr(node, "K"), act_bits, _attr(node, "block_size"), f"{name}.act"
                )
                new_nodes = act_nodes + new_nodes
                report.count(RULE_ACT_QDQ)
            elif act_bits:
                report.count(RULE_ACT_BITS)
            matmul = ir.node("MatMul", [activation, weight], name=name)
            new_nodes.append(matmul)
            bias = node.inputs[4] if len(node.inputs) > 4 else None
            if bias is not None:
                new_nodes.append(ir.node("Add", [matmul.outputs[0], bias], name=f"{name}.bias"))
            report.count(RULE_MATMUL)
        old_output = node.outputs[0]
        new_output = new_nodes[-1].outputs[0]
        ir.convenience.replace_nodes_and_values(owner, node, [node], new_nodes, [old_output], [new_output])


def _activation_qdq(
    graph: ir.Graph, a: ir.Value, k: int, bits: int, block_size: int, name: str
) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing block_format.fake_quantize(A, BlockFormat(bits, block_size, True, "float32"))
    along A's last axis (K) in standard ops, and the value of the result (same shape as A)."""
    nb = -(-k // block_size)
    padded = nb * block_size
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value | None], **attributes: object) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, name=f"{name}.{op}_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    def const(label: str, array: np.ndarray) -> ir.Value:
        return _initializer(graph, f"{name}.{label}", array)

    x = a
    if padded != k:  # zeros never change a block's largest magnitude
        x = add("Pad", [x, const("pads", np.array([0, padded - k], np.int64)), None, const("pad_axes", np.array([-1], np.int64))])
    leading = add("Shape", [x], end=-1)
    block_shape = add("Concat", [leading, const("block_dims", np.array([nb, block_size], np.int64))], axis=0)
    blocks = add("Reshape", [x, block_shape])
    first_largest = add("ArgMax", [add("Abs", [blocks])], axis=-1, keepdims=1, select_last_index=0)
    signed_max = add("GatherElements", [blocks, first_largest], axis=-1)
    scale = add("Div", [signed_max, const("code_min", np.array(-(1 << (bits - 1)), np.float32))])
    zero = const("zero", np.array(0.0, np.float32))
    inverse = add("Where", [add("Equal", [scale, zero]), zero, add("Reciprocal", [scale])])
    scaled = add("Mul", [blocks, inverse])
    # int8 codes for every width (they live only at run time; ONNX Runtime has no int4 ConstantOfShape)
    zero_point = np.array(0, dtype=np.int8)
    if bits < 8:  # saturate to the width first; QuantizeLinear saturates to int8's range
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        scaled = add("Clip", [scaled, const("low", np.array(low, np.float32)), const("high", np.array(high, np.float32))])
    codes = add("QuantizeLinear", [scaled, const("unit", np.array(1.0, np.float32)), const("zero_point", zero_point)])
    # An explicit zero point shaped like the scales: without it ONNX Runtime's int8 -> uint8 Q/DQ
    # rewrite (optimization level >= extended) adds a scalar one, which blocked DequantizeLinear rejects.
    zero_points = add("ConstantOfShape", [add("Shape", [scale])], value=ir.tensor(zero_point.reshape(1)))
    values = add("DequantizeLinear", [codes, scale, zero_points], axis=-1, block_size=block_size)
    result = add("Reshape", [values, add("Shape", [x])])
    if padded != k:
        result = add("Slice", [result, const("starts", np.array([0], np.int64)), const("ends", np.array([k], np.int64)),
                               const("slice_axes", np.array([-1], np.int64))])
    return nodes, result


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer of the main graph (subgraphs read it from the outer scope)."""
    name, n = base, 1
    while name in graph.initializers:
        name, n = f"{base}_{n}", n + 1
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def qdq_summary(rules: dict[str, int], model: ir.Model, requested_ops: frozenset[str], act_bits: int | None) -> dict[str, object]:
    """What a "qdq" compression wrote and what standard ONNX could not hold (for the compile report).

    rules: the pipeline's rule counts; requested_ops: the op kinds the config asked for.
    """
    from bct_onnx.config import QDQ_OPS

    code_types = {
        rule.removeprefix(TYPE_PREFIX): count for rule, count in sorted(rules.items()) if rule.startswith(TYPE_PREFIX)
    }
    not_expressible: list[str] = []
    for rule, count in sorted(rules.items()):
        if rule.startswith(CONTAINER_PREFIX):
            width = rule.removeprefix(CONTAINER_PREFIX)
            not_expressible.append(
                f"{count} tensor(s) of {width} codes: no standard {width} type, stored as 8-bit codes "
                "(same values, 8 bits of storage each)"
            )
    if rules.get(RULE_OFFSETS):
        not_expressible.append(
            f"{rules[RULE_OFFSETS]} tensor(s) with float offsets: DequantizeLinear has integer zero points "
            "only, so an Add of the offsets follows it (exact; ONNX Runtime does not fuse it into MatMulNBits)"
        )
    if rules.get(RULE_ACT_QDQ):
        not_expressible.append(
            f"run-time blockwise activation quantization (act_bits={act_bits}) of {rules[RULE_ACT_QDQ]} MatMul(s) is "
            "written as scales computed in the graph + QuantizeLinear/DequantizeLinear (exact, but runtimes run it "
            "in float: slower than float activations)"
        )
    if rules.get(RULE_ACT_BITS):
        not_expressible.append(
            f"run-time blockwise activation quantization (act_bits={act_bits}) of {rules[RULE_ACT_BITS]} MatMul(s): "
            "QuantizeLinear needs its scale as an input and DynamicQuantizeLinear is per tensor, so their "
            "activations stay float in the file (qdq_activations / --qdq-activations writes it as in-graph "
            "scales + QuantizeLinear/DequantizeLinear; ONNX Runtime's MatMulNBits fusion quantizes "
            "activations to int8 itself at its default accuracy level 4)"
        )
    stayed_float = sorted(requested_ops - QDQ_OPS)
    if stayed_float:
        not_expressible.append(
            f"{', '.join(stayed_float)}: no standard blockwise form; these ops stay float"
        )
    remaining = sorted({n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == ops.DOMAIN})
    return {
        "opset": onnx_opset(model),
        "opset_converted": bool(rules.get(RULE_OPSET)),
        "matmuls": rules.get(RULE_MATMUL, 0),
        "gathers": rules.get(RULE_GATHER, 0),
        "code_types": code_types,
        "not_expressible": not_expressible,
        "custom_ops_left": remaining,
    }
