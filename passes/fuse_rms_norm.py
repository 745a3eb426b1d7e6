"""FuseRMSNormPass: Llama/T5-style decomposed RMS normalization -> ai.bct_onnx BlockRMSNorm (float in/out).

Pattern, over the last axis (x may be wrapped in no-op float32 Casts, as transformers' Llama and T5
write ``hidden.to(torch.float32)`` and cast back)::

    ms  = ReduceMean(Pow(x, 2) | Mul(x, x), axes=[-1])
    r   = Sqrt(Add(ms, eps))
    y   = Mul(x, Div(1, r)) | Mul(x, Reciprocal(r)) | Div(x, r)   [then optionally Cast(to=float)]
    out = Mul(y, weight)                                          (weight optional, constant [D])

ONNX has RMSNormalization only from opset 23, so the canonical node is BlockRMSNorm with float
operands; QuantizeLayerNormPass and CompressIntermediatesPass decide its operand formats later.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_name, register_domain
from bct_onnx.passes.fuse_layer_norm import AffineTail, affine_tail, sqrt_plus_epsilon, vector_initializer
from bct_onnx.passes.graph_patterns import (
    FLOAT,
    close,
    is_op,
    last_dim,
    other_input,
    producer,
    reduces_last_axis,
    replace_pattern,
    same_float,
    scalar,
    sole_user,
    strip_float_cast,
    value_dtype,
    value_rank,
)

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "fuse RMSNorm"


@dataclasses.dataclass(frozen=True)
class RMSNormMatch:
    x: ir.Value
    nodes: list[ir.Node]
    epsilon: float
    d: int
    tail: AffineTail
    casts: list[ir.Node]  # no-op Casts of x that only the pattern reads (removed with it)


def _float_cast_user(value: ir.Value) -> ir.Node | None:
    user = sole_user(value)
    if is_op(user, "Cast") and user is not None:
        to = user.attributes.get("to")
        if to is not None and to.as_int() == FLOAT.value:
            return user
    return None


class FuseRMSNormPass(NodeRewritePass):
    """Fuse Pow/ReduceMean/Add/Sqrt/(Div|Reciprocal)/Mul(/Mul weight) into BlockRMSNorm."""

    op_types = frozenset({"ReduceMean"})
    needs_shapes = True

    def match(self, model: ir.Model, node: ir.Node) -> RMSNormMatch | str | None:
        square = producer(node.inputs[0], "Pow", "Mul")
        if square is None:
            return None  # a plain mean (LayerNorm's first ReduceMean, pooling): not an RMS norm
        x = square.inputs[0]
        if square.op_type == "Pow":
            if not close(scalar(square.inputs[1]), 2.0):
                return "Pow(x, e) before ReduceMean has e != 2"
        elif square.inputs[1] is not x:
            return None  # a product of two tensors, not a square
        if x is None:
            return None
        if sole_user(square.outputs[0]) is not node:
            return "the squared input is read by other nodes too"
        base = strip_float_cast(x)
        if base is None or value_dtype(base) != FLOAT:
            return "input is not float32 (after no-op Casts)"
        reason = reduces_last_axis(node, value_rank(base))
        if reason:
            return reason
        d = last_dim(base)
        if d is None:
            return "the normalized (last) dimension of x is unknown"
        std = sqrt_plus_epsilon(node.outputs[0], "mean square")
        if isinstance(std, str):
            return std
        std_nodes, eps = std
        root = std_nodes[-1].outputs[0]
        nodes = [square, node, *std_nodes]
        user = sole_user(root)
        if (
            is_op(user, "Div")
            and user is not None
            and user.inputs[1] is root
            and scalar(user.inputs[0]) is None
        ):
            if not same_float(user.inputs[0], x):
                return "Div(y, sqrt(...)) divides a tensor other than x"
            other_x = user.inputs[0]
            nodes.append(user)
            normalized = user.outputs[0]
        else:
            if is_op(user, "Div") and user is not None and user.inputs[1] is root:
                if not close(scalar(user.inputs[0]), 1.0):
                    return "Div(c, sqrt(...)) with c != 1"
            elif not is_op(user, "Reciprocal"):
                return "sqrt(mean square + eps) is not inverted by Div(1, .), Reciprocal or Div(x, .)"
            assert user is not None
            inverse = user.outputs[0]
            mul = sole_user(inverse)
            other_x = other_input(mul, inverse) if is_op(mul, "Mul") and mul is not None else None
            if mul is None or not same_float(other_x, x):
                return "1 / sqrt(mean square + eps) does not multiply x"
            nodes += [user, mul]
            normalized = mul.outputs[0]
        cast = _float_cast_user(normalized)
        if cast is not None:
            nodes.append(cast)
            normalized = cast.outputs[0]
        tail = affine_tail(normalized, d, allow_bias=False)
        casts = [
            c for c in {id(n): n for n in (producer(x, "Cast"), producer(other_x, "Cast")) if n}.values()
        ]
        return RMSNormMatch(
            base, nodes + tail.nodes, eps, d, tail, [c for c in casts if c.outputs[0] is not base]
        )

    def rewrite(self, model: ir.Model, matched: RMSNormMatch, report: PassReport) -> None:
        last = matched.tail.out.producer()
        assert last is not None
        name = node_name(last, "RMSNorm")
        scale = vector_initializer(model, matched.tail.scale, matched.d, f"{name}.scale", 1.0)
        fused = ir.node(
            ops.BLOCK_RMS_NORM,
            [matched.x, None, None, scale],
            attributes={"epsilon": matched.epsilon},
            domain=ops.DOMAIN,
            name=name,
        )
        replace_pattern(matched.nodes, [fused], matched.tail.out, fused.outputs[0])
        for cast in matched.casts:
            out = cast.outputs[0]
            if cast.graph is not None and not out.uses() and not out.is_graph_output():
                cast.graph.remove(cast, safe=True)
        register_domain(model)
        report.count(RULE)
        report.count("LayerNormalization")  # the op kind RMS norm belongs to (bct_onnx.config)
