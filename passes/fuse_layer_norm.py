"""FuseLayerNormPass: decomposed layer normalization -> LayerNormalization (or BlockLayerNorm).

Pattern (torch's and TF's exports of LayerNorm before opset 17), over the last axis::

    mean = ReduceMean(x, axes=[-1]);  d = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2) | Mul(d, d), axes=[-1])
    y    = Div(d, Sqrt(Add(var, eps)))   |  Mul(d, Reciprocal(Sqrt(Add(var, eps))))
    out  = Add(Mul(y, scale), bias)      (scale and bias optional, constant, [D])

The fused node is ONNX ``LayerNormalization`` (axis=-1) when the model's opset is >= 17, else
ai.bct_onnx ``BlockLayerNorm`` with float operands (the opset is never bumped). QuantizeLayerNormPass
then rewrites LayerNormalization into BlockLayerNorm.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_name, onnx_opset, register_domain
from bct_onnx.passes.graph_patterns import (
    FLOAT,
    close,
    is_op,
    last_dim,
    other_input,
    reduces_last_axis,
    replace_pattern,
    scalar,
    sole_user,
    value_rank,
)
from bct_onnx.passes.quantized_weights import constant_tensor

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "fuse LayerNormalization"
LAYER_NORM_OPSET = 17


@dataclasses.dataclass(frozen=True)
class AffineTail:
    """The optional Mul(scale) / Add(bias) after a normalization and the value it ends in."""

    nodes: list[ir.Node]
    scale: ir.Value | None
    bias: ir.Value | None
    out: ir.Value


def _vector_constant(value: ir.Value | None, d: int | None) -> bool:
    """value is a constant float32 tensor holding d elements along its last axis only."""
    tensor = constant_tensor(value)
    if tensor is None or tensor.dtype != FLOAT:
        return False
    shape = tuple(tensor.shape.numpy())
    if not shape or any(s != 1 for s in shape[:-1]):
        return False
    return d is None or shape[-1] == d


def affine_tail(normalized: ir.Value, d: int | None, allow_bias: bool) -> AffineTail:
    """Follow Mul(., scale) and Add(., bias) of constant [D] vectors after a normalization."""
    nodes: list[ir.Node] = []
    scale = bias = None
    out = normalized
    user = sole_user(out)
    if is_op(user, "Mul") and user is not None:
        other = other_input(user, out)
        if _vector_constant(other, d):
            scale, out = other, user.outputs[0]
            nodes.append(user)
            user = sole_user(out)
    if allow_bias and is_op(user, "Add") and user is not None:
        other = other_input(user, out)
        if _vector_constant(other, d):
            bias, out = other, user.outputs[0]
            nodes.append(user)
    return AffineTail(nodes, scale, bias, out)


def vector_initializer(model: ir.Model, value: ir.Value | None, d: int, name: str, fill: float) -> ir.Value:
    """value reshaped to a [D] float32 initializer (reused when it already is one), or a filled one."""
    graph = model.graph
    if value is not None:
        tensor = constant_tensor(value)
        assert tensor is not None
        if value.is_initializer() and tuple(tensor.shape.numpy()) == (d,):
            return value
        array = np.asarray(tensor.numpy(), dtype=np.float32).reshape(d)
    else:
        array = np.full((d,), fill, dtype=np.float32)
    unique, i = name, 1
    while unique in graph.initializers:
        unique, i = f"{name}_{i}", i + 1
    new = ir.Value(
        name=unique, shape=ir.Shape([d]), type=ir.TensorType(FLOAT), const_value=ir.tensor(array, name=unique)
    )
    graph.register_initializer(new)
    return new


@dataclasses.dataclass(frozen=True)
class LayerNormMatch:
    x: ir.Value
    nodes: list[ir.Node]
    epsilon: float
    d: int
    tail: AffineTail


def sqrt_plus_epsilon(value: ir.Value, what: str) -> tuple[list[ir.Node], float] | str:
    """Nodes [Add, Sqrt] and epsilon of Sqrt(Add(value, eps)) reading value (the variance of a
    layer norm, the mean square of an RMS norm: ``what`` names it in the skip reasons)."""
    add = sole_user(value)
    if not is_op(add, "Add") or add is None:
        return f"the {what} is not followed by Add(epsilon)"
    eps = scalar(other_input(add, value))
    if eps is None or eps < 0:
        return f"the Add after the {what} does not add a constant epsilon >= 0"
    sqrt = sole_user(add.outputs[0])
    if not is_op(sqrt, "Sqrt") or sqrt is None:
        return f"Add({what}, epsilon) is not followed by Sqrt"
    return [add, sqrt], eps


class FuseLayerNormPass(NodeRewritePass):
    """Fuse ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add) into one layer normalization."""

    op_types = frozenset({"ReduceMean"})
    needs_shapes = True

    def match(self, model: ir.Model, node: ir.Node) -> LayerNormMatch | str | None:
        x = node.inputs[0]
        mean = node.outputs[0]
        if x is None:
            return None
        sub = sole_user(mean)
        if not is_op(sub, "Sub") or sub is None or sub.inputs[1] is not mean:
            return None  # not the mean of a LayerNorm (e.g. the variance ReduceMean, or RMS norm)
        if sub.inputs[0] is not x:
            return "Sub(x, mean) subtracts the mean from a different tensor"
        if x.dtype is not None and x.dtype != FLOAT:
            return f"input dtype {x.dtype.name} is not float32"
        reason = reduces_last_axis(node, value_rank(x))
        if reason:
            return reason
        d = last_dim(x)
        if d is None:
            return "the normalized (last) dimension of x is unknown"
        centered = sub.outputs[0]
        users = [use.node for use in centered.uses()]
        square = next((u for u in users if is_op(u, "Pow", "Mul")), None)
        divide = next((u for u in users if is_op(u, "Div")), None)
        if square is None or divide is None or len(set(map(id, users))) != 2 or centered.is_graph_output():
            return "x - mean is not read exactly by a square (Pow/Mul) and a Div"
        if square.op_type == "Pow" and not (
            square.inputs[0] is centered and close(scalar(square.inputs[1]), 2.0)
        ):
            return "Pow(x - mean, e) has e != 2"
        if square.op_type == "Mul" and not (square.inputs[0] is centered and square.inputs[1] is centered):
            return "Mul is not (x - mean) * (x - mean)"
        var_node = sole_user(square.outputs[0])
        if not is_op(var_node, "ReduceMean") or var_node is None:
            return "the squared deviation is not averaged by ReduceMean"
        reason = reduces_last_axis(var_node, value_rank(x))
        if reason:
            return f"variance: {reason}"
        std = sqrt_plus_epsilon(var_node.outputs[0], "variance")
        if isinstance(std, str):
            return std
        std_nodes, eps = std
        if divide.inputs[0] is not centered or divide.inputs[1] is not std_nodes[-1].outputs[0]:
            return "Div is not (x - mean) / sqrt(var + eps)"
        tail = affine_tail(divide.outputs[0], d, allow_bias=True)
        nodes = [node, sub, square, var_node, *std_nodes, divide, *tail.nodes]
        return LayerNormMatch(x, nodes, eps, d, tail)

    def rewrite(self, model: ir.Model, matched: LayerNormMatch, report: PassReport) -> None:
        last = matched.tail.out.producer()
        assert last is not None
        name = node_name(last, "LayerNorm")
        scale = vector_initializer(model, matched.tail.scale, matched.d, f"{name}.scale", 1.0)
        bias = vector_initializer(model, matched.tail.bias, matched.d, f"{name}.bias", 0.0)
        opset = onnx_opset(model) or 0
        if opset >= LAYER_NORM_OPSET:
            fused = ir.node(
                "LayerNormalization",
                [matched.x, scale, bias],
                attributes={"axis": -1, "epsilon": matched.epsilon},
                name=name,
            )
        else:
            fused = ir.node(
                ops.BLOCK_LAYER_NORM,
                [matched.x, None, None, scale, bias],
                attributes={"epsilon": matched.epsilon},
                domain=ops.DOMAIN,
                name=name,
            )
            register_domain(model)
            report.count("LayerNormalization")  # already the compressed op's node (float operands)
        replace_pattern(matched.nodes, [fused], matched.tail.out, fused.outputs[0])
        report.count(RULE)
