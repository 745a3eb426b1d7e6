"""FoldConstantWeightsPass: fold weight-side Transpose/Reshape/Cast/Identity/(Un)Squeeze of constants.

Exporters often leave a chain such as ``Cast(Transpose(W))`` between an initializer and the MatMul
reading it. This pass evaluates such nodes whose inputs are all constant and replaces their output
with a new initializer, so quantize passes see a constant weight. Nodes are visited in graph order,
so a chain folds in one call. A node whose data input is a large initializer that other nodes also
read is not folded (that would duplicate the tensor); it is reported, and QuantizeMatMulPass reads
``Transpose(perm=[1, 0])`` of a constant directly. ``Identity`` of a constant (optimum's way to
share tied weights) is removed by pointing its users at the constant itself: no copy.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_label
from bct_onnx.passes.quantized_weights import constant_tensor

logger = logging.getLogger(__name__)

FOLDABLE_OPS = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze"})
# A shared source at least this large is not copied by folding.
SHARED_SOURCE_MIN_ELEMENTS = 4096


def _axes(node: ir.Node, arrays: list[np.ndarray]) -> list[int] | None:
    if len(arrays) > 1:
        return [int(a) for a in arrays[1].reshape(-1)]
    attr = node.attributes.get("axes")
    return list(attr.as_ints()) if attr is not None else None


def evaluate(node: ir.Node, arrays: list[np.ndarray]) -> tuple[np.ndarray, ir.DataType | None] | str:
    """numpy value (and ONNX dtype when it differs from numpy's) of node, or why it cannot fold."""
    x = arrays[0]
    op = node.op_type
    if op == "Identity":
        return x, None
    if op == "Transpose":
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(range(x.ndim))[::-1]
        return np.ascontiguousarray(np.transpose(x, perm)), None
    if op == "Reshape":
        allow_zero = node.attributes.get("allowzero")
        shape = [int(d) for d in arrays[1].reshape(-1)]
        if not (allow_zero is not None and allow_zero.as_int()):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        try:
            return x.reshape(shape), None
        except ValueError as error:
            return f"cannot reshape constant {x.shape} to {shape}: {error}"
    if op == "Cast":
        to_attr = node.attributes.get("to")
        if to_attr is None:
            return "Cast without 'to'"
        target = ir.DataType(to_attr.as_int())
        if not target.is_floating_point():
            return f"Cast to {target.name} is not folded (only casts to float types)"
        return x.astype(target.numpy()), target
    if op == "Squeeze":
        axes = _axes(node, arrays)
        if axes is None:
            return np.squeeze(x), None
        return np.squeeze(x, axis=tuple(a % x.ndim for a in axes)), None
    if op == "Unsqueeze":
        axes = _axes(node, arrays)
        if axes is None:
            return "Unsqueeze without axes"
        rank = x.ndim + len(axes)
        return np.expand_dims(x, axis=tuple(sorted(a % rank for a in axes))), None
    return f"{op} is not foldable"


def _is_matmul_weight_transpose(node: ir.Node) -> bool:
    """A 2-D Transpose whose output only feeds MatMul weights (input B)."""
    perm = node.attributes.get("perm")
    if node.op_type != "Transpose" or (perm is not None and list(perm.as_ints()) != [1, 0]):
        return False
    uses = list(node.outputs[0].uses())
    return bool(uses) and all(use.node.op_type == "MatMul" and use.idx == 1 for use in uses)


class FoldConstantWeightsPass(NodeRewritePass):
    """Replace shape/layout/dtype ops on constant inputs by initializers."""

    op_types = FOLDABLE_OPS

    def match(self, model: ir.Model, node: ir.Node) -> tuple[ir.Node, list[ir.TensorProtocol]] | str | None:
        if not node.inputs or node.inputs[0] is None or len(node.outputs) != 1:
            return None
        tensors = []
        for value in node.inputs:
            if value is None:
                continue
            tensor = constant_tensor(value)
            if tensor is None:
                return None  # activation-side op: not our business
            tensors.append(tensor)
        if node.outputs[0].is_graph_output():
            return "output is a graph output; left as is"
        data = node.inputs[0]
        if node.op_type == "Identity":
            return node, tensors  # aliasing the constant copies nothing, shared or not
        other_users = {use.node for use in data.uses()} - {node}
        if other_users and tensors[0].size >= SHARED_SOURCE_MIN_ELEMENTS:
            if _is_matmul_weight_transpose(node):
                return None  # QuantizeMatMulPass reads Transpose(perm=[1, 0]) of a constant in place
            names = sorted(f"{n.op_type} '{node_label(n)}'" for n in other_users)
            return (
                f"constant '{data.name}' is also read by {', '.join(names[:3])}"
                f"{' ...' if len(names) > 3 else ''}; folding would duplicate it"
            )
        return node, tensors

    def rewrite(
        self, model: ir.Model, matched: tuple[ir.Node, list[ir.TensorProtocol]], report: PassReport
    ) -> None:
        node, tensors = matched
        owner = node.graph
        assert owner is not None
        old = node.outputs[0]
        if node.op_type == "Identity":
            source = node.inputs[0]
            assert source is not None
            old.replace_all_uses_with(source)
            owner.remove(node, safe=True)
            report.count("fold Identity")
            return
        result = evaluate(node, [np.asarray(t.numpy()) for t in tensors])
        if isinstance(result, str):
            report.skip(node, result)
            return
        array, dtype = result
        name = old.name
        tensor = ir.tensor(array, dtype=dtype, name=name)
        new = ir.Value(
            name=None, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        old.replace_all_uses_with(new)
        owner.remove(node, safe=True)
        new.name = name
        model.graph.register_initializer(new)  # subgraphs read main-graph initializers (outer scope)
        report.count(f"fold {node.op_type}")
