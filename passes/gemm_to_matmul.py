"""GemmToMatMulPass: Gemm with a constant B -> MatMul (+ Add), so QuantizeMatMulPass can compress it.

``Y = alpha * A' @ B' + beta * C`` (A' = A^T if transA, B' = B^T if transB) becomes
``MatMul(A', W) [+ Add(., C')]`` with W = alpha * B' computed once as a new initializer and
C' = beta * C folded when C is constant. When B is a large initializer read by other nodes too (a
tied embedding table), it is not copied: the MatMul reads ``Transpose(B)`` and alpha becomes a Mul,
and QuantizeMatMulPass quantizes the table in place.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.fold_constant_weights import SHARED_SOURCE_MIN_ELEMENTS
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_name
from bct_onnx.passes.quantized_weights import constant_tensor

logger = logging.getLogger(__name__)

RULE_GEMM = "Gemm"


@dataclasses.dataclass(frozen=True)
class GemmMatch:
    gemm: ir.Node
    a: ir.Value
    b: ir.Value
    b_tensor: ir.TensorProtocol
    c: ir.Value | None
    c_tensor: ir.TensorProtocol | None
    alpha: float
    beta: float
    trans_a: bool
    trans_b: bool
    b_shared: bool


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


class GemmToMatMulPass(NodeRewritePass):
    """Rewrite Gemm nodes whose B is constant into MatMul + Add."""

    op_types = frozenset({"Gemm"})

    def match(self, model: ir.Model, node: ir.Node) -> GemmMatch | str | None:
        inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
        a, b, c = inputs[0], inputs[1], inputs[2]
        if a is None or b is None:
            return "Gemm with a missing input"
        b_tensor = constant_tensor(b)
        if b_tensor is None:
            return "B is not a constant initializer; Gemm left as is"
        if not b_tensor.dtype.is_floating_point():
            return f"B dtype {b_tensor.dtype.name} is not a float type"
        if len(b_tensor.shape) != 2:
            return f"B has rank {len(b_tensor.shape)}, expected 2"
        c_tensor = constant_tensor(c) if c is not None else None
        other_users = {use.node for use in b.uses()} - {node}
        b_shared = bool(other_users) and b_tensor.size >= SHARED_SOURCE_MIN_ELEMENTS
        return GemmMatch(
            node,
            a,
            b,
            b_tensor,
            c,
            c_tensor,
            _float_attr(node, "alpha", 1.0),
            _float_attr(node, "beta", 1.0),
            bool(_int_attr(node, "transA", 0)),
            bool(_int_attr(node, "transB", 0)),
            b_shared,
        )

    def rewrite(self, model: ir.Model, matched: GemmMatch, report: PassReport) -> None:
        graph = model.graph
        gemm = matched.gemm
        name = node_name(gemm, "Gemm")
        dtype = matched.b_tensor.dtype
        np_dtype = dtype.numpy()
        new_nodes: list[ir.Node] = []

        def initializer(suffix: str, array: np.ndarray) -> ir.Value:
            base = f"{name}.{suffix}"
            unique, i = base, 1
            while unique in graph.initializers:
                unique, i = f"{base}_{i}", i + 1
            tensor = ir.tensor(np.asarray(array, dtype=np_dtype), dtype=dtype, name=unique)
            value = ir.Value(
                name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=tensor
            )
            graph.register_initializer(value)
            return value

        def add_node(op_type: str, inputs: list[ir.Value], suffix: str, **attributes: list[int]) -> ir.Value:
            node = ir.node(op_type, inputs, attributes=attributes or None, name=f"{name}/{suffix}")
            new_nodes.append(node)
            return node.outputs[0]

        a = matched.a
        if matched.trans_a:
            a = add_node("Transpose", [a], "transpose_a", perm=[1, 0])
        alpha_pending = matched.alpha != 1.0
        if matched.b_shared:
            b = (
                add_node("Transpose", [matched.b], "transpose_b", perm=[1, 0])
                if matched.trans_b
                else matched.b
            )
        else:
            weight = np.asarray(matched.b_tensor.numpy())
            if matched.trans_b:
                weight = weight.T
            if alpha_pending:
                weight = weight.astype(np.float64) * matched.alpha
                alpha_pending = False
            if matched.trans_b or matched.alpha != 1.0:
                b = initializer("weight", np.ascontiguousarray(weight))
            else:
                b = matched.b
        y = add_node("MatMul", [a, b], "matmul")
        if alpha_pending:
            y = add_node("Mul", [y, initializer("alpha", np.array(matched.alpha))], "alpha")
        if matched.c is not None and matched.beta != 0.0:
            if matched.c_tensor is not None:
                if matched.beta == 1.0:
                    c = matched.c
                else:
                    c = initializer(
                        "bias", np.asarray(matched.c_tensor.numpy()).astype(np.float64) * matched.beta
                    )
            else:
                c = matched.c
                if matched.beta != 1.0:
                    c = add_node("Mul", [c, initializer("beta", np.array(matched.beta))], "beta")
            y = add_node("Add", [y, c], "bias")
        owner = gemm.graph
        assert owner is not None
        ir.convenience.replace_nodes_and_values(owner, gemm, [gemm], new_nodes, [gemm.outputs[0]], [y])
        report.count(RULE_GEMM)
