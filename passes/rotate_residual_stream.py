"""RotateResidualStreamPass: rotate a pre-norm decoder's residual stream by a randomized Hadamard Q.

QuaRot's offline rotation (Ashkboos et al., 2024), on the float model, before quantization. In a
pre-RMSNorm transformer (Llama, SmolLM2, Mistral) the residual stream is only added to and read
through RMS normalizations, and RMS is invariant under an orthogonal Q. So, with x' = x Q:

- the embedding table E becomes E Q (the Gather then emits the rotated stream);
- each MatMul writing into the stream (attention output, MLP down projection) gets W Q (and b Q);
- each BlockRMSNorm whose result feeds only MatMuls with constant weights has its scale g folded
  into those weights and the rotation undone there: W becomes Q^T diag(g) W, g becomes 1;
- any other BlockRMSNorm (e.g. the final norm before a lm_head tied to the table) reads the stream
  unrotated through a MatMul by Q^T inserted before it, and a MatMul reading the table through
  Transpose (the tied lm_head) reads its activation times Q, since (E Q)^T = Q^T E^T.

The float model's outputs are unchanged up to float rounding. What changes is what quantization
sees: weights and tables whose rows mix every channel through Q have no outlier channels, so block
scales fit them better, and the stream's activations are spread too. Q is ``diag(signs) H / sqrt(D)``
(bct_onnx.hadamard): the inserted MatMuls' weights have entries +-1/sqrt(D), which a symmetric 4-bit
block stores exactly (up to the scale's float16 rounding, the same factor for every entry).

Needs fused norms (FuseRMSNormPass runs first). Post-norm encoders (BERT, MiniLM) and LayerNorm
models are left alone with a reason: LayerNorm's mean subtraction and a post-norm residual (the
normalized stream is the residual) do not commute with a rotation of the stream.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import CompressPass, PassReport, Skip, node_label
from bct_onnx.passes.graph_patterns import is_op
from bct_onnx.passes.quantized_weights import FLOAT_DTYPES, constant_tensor

from bct_onnx import ops
from bct_onnx.hadamard import randomized_hadamard

logger = logging.getLogger(__name__)

RULE = "residual stream rotated (Hadamard)"
RULE_WRITER = "stream writer MatMul rotated"
RULE_FOLDED_NORM = "RMSNorm scale folded into rotated readers"
RULE_UNROTATED_NORM = "RMSNorm reads the stream through Q^T"
RULE_TIED_HEAD = "tied output projection reads through Q"


@dataclasses.dataclass(frozen=True)
class Writer:
    matmul: ir.Node
    bias_add: ir.Node | None  # Add of a constant [D] bias after the MatMul


@dataclasses.dataclass(frozen=True)
class StreamMatch:
    """One residual stream: where it starts, who writes into it and who reads it."""

    gather: ir.Node
    dim: int
    writers: list[Writer]
    # norm, the MatMuls reading its result with the scale each sees, Muls by [D] constants on the way
    folded_norms: list[tuple[ir.Node, list[tuple[ir.Node, np.ndarray]], list[ir.Node]]]
    unrotated_norms: list[ir.Node]
    table_matmuls: list[ir.Node]  # MatMuls reading Transpose(table) as their weight


def _constant_2d(value: ir.Value | None) -> np.ndarray | None:
    tensor = constant_tensor(value)
    if tensor is None or tensor.dtype not in FLOAT_DTYPES or len(tensor.shape) != 2:
        return None
    return np.asarray(tensor.numpy(), dtype=np.float64)


def _single_use(value: ir.Value) -> bool:
    return not value.is_graph_output() and len(list(value.uses())) == 1


def _writer(branch: ir.Value, dim: int) -> Writer | str:
    """The MatMul (+ bias Add) producing a branch added to the stream, or why it cannot be rotated."""
    node = branch.producer()
    bias_add = None
    if is_op(node, "Add"):
        assert node is not None
        inner = [v for v in node.inputs if v is not None and v.producer() is not None and is_op(v.producer(), "MatMul")]
        bias = [v for v in node.inputs if constant_tensor(v) is not None]
        if len(inner) != 1 or len(bias) != 1 or constant_tensor(bias[0]).size != dim or not _single_use(inner[0]):  # type: ignore[union-attr]
            return f"the branch added to the stream comes from Add '{node_label(node)}', not MatMul + bias"
        bias_add, node = node, inner[0].producer()
    if node is None or not is_op(node, "MatMul"):
        what = node.op_type if node is not None else "a graph input or constant"
        return f"a branch added to the residual stream comes from {what}, not a MatMul with a constant weight"
    weight = _constant_2d(node.inputs[1])
    if weight is None or weight.shape[1] != dim or not _single_use(node.inputs[1]):  # type: ignore[arg-type]
        return f"MatMul '{node_label(node)}' writes into the stream without its own constant [K, {dim}] weight"
    return Writer(node, bias_add)


def _foldable_readers(norm: ir.Node, dim: int) -> tuple[list[tuple[ir.Node, np.ndarray]], list[ir.Node]] | None:
    """(MatMuls reading the norm's result with the scale each sees, Muls by a [D] constant on the way).

    The result may pass through Shape (ignored), no-op float Casts and Muls by a constant [D] vector
    (the norm's weight when the fusion left it outside) before MatMuls with their own constant
    [D, N] weight. None when anything else reads it.
    """
    scale = _norm_scale(norm, dim)
    if scale is None:
        return None
    readers: list[tuple[ir.Node, np.ndarray]] = []
    muls: list[ir.Node] = []
    pending = [(norm.outputs[0], scale)]
    while pending:
        value, path_scale = pending.pop()
        if value.is_graph_output():
            return None
        for use in value.uses():
            node = use.node
            if is_op(node, "Shape", "Size"):
                continue
            if is_op(node, "Cast") and _casts_to_float(node):
                pending.append((node.outputs[0], path_scale))
                continue
            if is_op(node, "Mul"):
                factor = constant_tensor(node.inputs[1 - use.idx])
                if factor is None or factor.size != dim or list(factor.shape.numpy())[-1] != dim:
                    return None
                muls.append(node)
                vector = np.asarray(factor.numpy(), dtype=np.float64).reshape(dim)
                pending.append((node.outputs[0], path_scale * vector))
                continue
            if not is_op(node, "MatMul") or use.idx != 0:
                return None
            weight = _constant_2d(node.inputs[1])
            if weight is None or weight.shape[0] != dim or not _single_use(node.inputs[1]):  # type: ignore[arg-type]
                return None
            readers.append((node, path_scale))
    return (readers, muls) if readers else None


def _casts_to_float(node: ir.Node) -> bool:
    to = node.attributes.get("to")
    return to is not None and to.as_int() == ir.DataType.FLOAT.value


def _is_rms_norm(node: ir.Node) -> bool:
    return node.domain == ops.DOMAIN and node.op_type == ops.BLOCK_RMS_NORM


def _norm_scale(norm: ir.Node, dim: int) -> np.ndarray | None:
    scale = norm.inputs[3] if len(norm.inputs) > 3 else None
    tensor = constant_tensor(scale)
    if tensor is None or tensor.size != dim:
        return None
    return np.asarray(tensor.numpy(), dtype=np.float64).reshape(dim)


def _table_gather(model: ir.Model) -> ir.Node | str:
    """The Gather reading the token embedding table with a graph input (input_ids)."""
    for value in model.graph.inputs:
        for use in value.uses():
            node = use.node
            if is_op(node, "Gather") and use.idx == 1 and _constant_2d(node.inputs[0]) is not None:
                axis = node.attributes.get("axis")
                if axis is None or axis.as_int() == 0:
                    return node
    return "no Gather reads a constant embedding table with a graph input (input_ids)"


def match_stream(model: ir.Model) -> StreamMatch | str:
    """The residual stream rooted at the embedding Gather, or why it cannot be rotated."""
    gather = _table_gather(model)
    if isinstance(gather, str):
        return gather
    table = gather.inputs[0]
    assert table is not None
    dim = int(constant_tensor(table).shape[1])  # type: ignore[union-attr]
    writers: list[Writer] = []
    folded: list[tuple[ir.Node, list[tuple[ir.Node, np.ndarray]], list[ir.Node]]] = []
    unrotated: list[ir.Node] = []
    stream: list[ir.Value] = [gather.outputs[0]]
    seen = {id(gather.outputs[0])}
    while stream:
        value = stream.pop()
        if value.is_graph_output():
            return f"the residual stream value '{value.name}' is a graph output"
        for use in list(value.uses()):
            node = use.node
            if is_op(node, "Shape", "Size"):
                continue  # reads the shape only, which the rotation keeps
            if is_op(node, "Cast") and _casts_to_float(node):
                out = node.outputs[0]  # a no-op float Cast (Llama's hidden.to(float32)) carries the stream
                if id(out) not in seen:
                    seen.add(id(out))
                    stream.append(out)
                continue
            if is_op(node, "Add") and len(node.inputs) == 2:
                branch = node.inputs[1 - use.idx]
                if branch is None or id(branch) in seen:
                    return f"Add '{node_label(node)}' adds the stream to itself"
                writer = _writer(branch, dim)
                if isinstance(writer, str):
                    return writer
                writers.append(writer)
                out = node.outputs[0]
                if id(out) not in seen:
                    seen.add(id(out))
                    stream.append(out)
            elif _is_rms_norm(node) and use.idx == 0:
                readers = _foldable_readers(node, dim)
                if readers is not None:
                    folded.append((node, *readers))
                else:
                    unrotated.append(node)
            else:
                return (
                    f"the residual stream feeds {node.op_type} '{node_label(node)}': only residual Adds and "
                    "RMS normalizations commute with a rotation (LayerNorm and post-norm models are left alone)"
                )
    if not writers:
        return "nothing writes into the embedding's output through a residual Add: no residual stream"
    table_matmuls = []
    for use in table.uses():
        node = use.node
        if node is gather:
            continue
        perm = node.attributes.get("perm") if is_op(node, "Transpose") else None
        if not is_op(node, "Transpose") or (perm is not None and list(perm.as_ints()) != [1, 0]):
            return f"the embedding table is also read by {node.op_type} '{node_label(node)}'"
        for reader in node.outputs[0].uses():
            if not is_op(reader.node, "MatMul") or reader.idx != 1:
                return f"the transposed embedding table is read by {reader.node.op_type} '{node_label(reader.node)}'"
            table_matmuls.append(reader.node)
        if node.outputs[0].is_graph_output():
            return "the transposed embedding table is a graph output"
    return StreamMatch(gather, dim, writers, folded, unrotated, table_matmuls)


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    array = np.ascontiguousarray(array, dtype=np.float32)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def _replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    assert old is not None
    node.replace_input_with(index, _initializer(graph, f"{old.name or 'weight'}.rotated", array))


def _matmul_before(graph: ir.Graph, consumer: ir.Node, index: int, weight: ir.Value, name: str) -> None:
    """Insert MatMul(consumer.inputs[index], weight) in front of that input of consumer."""
    source = consumer.inputs[index]
    assert source is not None
    node = ir.node("MatMul", [source, weight], name=name)
    node.outputs[0].name = f"{name}_out"
    node.outputs[0].dtype = ir.DataType.FLOAT
    graph.insert_before(consumer, node)
    consumer.replace_input_with(index, node.outputs[0])


class RotateResidualStreamPass(CompressPass):
    """Fold a randomized Hadamard rotation into both sides of a pre-RMSNorm residual stream."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def run(self, model: ir.Model, report: PassReport) -> None:
        matched = match_stream(model)
        if isinstance(matched, str):
            report.skipped.append(_skip(matched))
            return
        q = randomized_hadamard(matched.dim, self.seed)
        if q is None:
            report.skipped.append(_skip(f"no Hadamard matrix of order {matched.dim} is known here"))
            return
        self.rewrite(model, matched, q, report)

    def rewrite(self, model: ir.Model, matched: StreamMatch, q: np.ndarray, report: PassReport) -> None:
        graph = model.graph
        gather = matched.gather
        table = _constant_2d(gather.inputs[0])
        assert table is not None
        _replace_constant(graph, gather, 0, table @ q)
        rotated_table = gather.inputs[0]
        for transpose_reader in matched.table_matmuls:
            transpose = transpose_reader.inputs[1].producer()  # type: ignore[union-attr]
            assert transpose is not None
            transpose.replace_input_with(0, rotated_table)  # type: ignore[arg-type]
        for writer in matched.writers:
            weight = _constant_2d(writer.matmul.inputs[1])
            assert weight is not None
            _replace_constant(graph, writer.matmul, 1, weight @ q)
            if writer.bias_add is not None:
                index = next(i for i, v in enumerate(writer.bias_add.inputs) if constant_tensor(v) is not None)
                bias = np.asarray(constant_tensor(writer.bias_add.inputs[index]).numpy(), dtype=np.float64)  # type: ignore[union-attr]
                _replace_constant(graph, writer.bias_add, index, (bias.reshape(-1) @ q).reshape(bias.shape))
            report.count(RULE_WRITER)
        for norm, readers, muls in matched.folded_norms:
            for reader, scale in readers:
                weight = _constant_2d(reader.inputs[1])
                assert weight is not None
                _replace_constant(graph, reader, 1, (q.T * scale[None, :]) @ weight)  # Q^T diag(g) W
            _replace_constant(graph, norm, 3, np.ones(matched.dim))
            for mul in {id(m): m for m in muls}.values():
                index = next(i for i, v in enumerate(mul.inputs) if constant_tensor(v) is not None)
                shape = tuple(constant_tensor(mul.inputs[index]).shape.numpy())  # type: ignore[union-attr]
                _replace_constant(graph, mul, index, np.ones(shape))
            report.count(RULE_FOLDED_NORM)
        if matched.unrotated_norms:
            q_t = _initializer(graph, "bct_rotation_q_t", q.T)
            for norm in matched.unrotated_norms:
                _matmul_before(graph, norm, 0, q_t, f"{node_label(norm)}/unrotate")
                report.count(RULE_UNROTATED_NORM)
        if matched.table_matmuls:
            q_value = _initializer(graph, "bct_rotation_q", q)
            for reader in matched.table_matmuls:
                _matmul_before(graph, reader, 0, q_value, f"{node_label(reader)}/rotate")
                report.count(RULE_TIED_HEAD)
        report.count(RULE)


def _skip(reason: str) -> Skip:
    return Skip("<model>", "residual stream", reason)
