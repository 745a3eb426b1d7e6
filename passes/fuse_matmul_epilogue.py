"""FuseMatMulEpiloguePass: a BlockMatMul and the GELU or SiLU gating after it become one BlockMatMul
with an ``epilogue`` (docs/ops.md), so the product never leaves the kernel as float32 or as
intermediate codes.

Runs after the quantize passes and before CompressIntermediatesPass (which then gives the fused
node's result the codes the next MatMul reads). Two rules, anchored at the activation:
- ``BlockMatMul -> BlockGelu`` (BERT's and GPT-2's FFN): the MatMul gets epilogue ``gelu`` or
  ``gelu_tanh`` (the Gelu's ``approximate``) and the Gelu's result.
- ``Mul(BlockSilu(BlockMatMul_gate(A)), BlockMatMul_up(A))`` (Llama's FFN): one BlockMatMul over the
  gate rows, then the up rows (codes, scales, zero points and bias concatenated along N) with
  epilogue ``silu_gate`` gives the Mul's result.
Both are bit-exact to the unfused ops run on float edges (tests/runtime_ops/test_matmul_epilogue.py)
and drop the intermediate quantization that CompressIntermediatesPass would otherwise put on the
MatMul -> activation edge, so they are at least as accurate as the chain they replace.
A rule does not fire, and says why, when the MatMul's result has other readers or is a graph output,
or when the gate and up MatMuls differ in input, format or attributes, or their weights are not
constant.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_label, node_name
from bct_onnx.passes.graph_patterns import is_op, other_input, replace_pattern, sole_user
from bct_onnx.passes.operand_ops import int_attr, is_ours
from bct_onnx.passes.quantized_weights import (
    BLOCK_MATMUL_WEIGHT_INPUTS,
    concat_initializer,
    weight_stacking_problem,
)

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE_GELU = "fuse MatMul + GELU epilogue"
RULE_SILU_GATE = "fuse gate/up MatMul + SiLU gating epilogue"
# Attributes gate and up must share for one node to compute both (N is summed; names differ).
_SHARED_ATTRS = (
    "K",
    "bits",
    "block_size",
    "symmetric",
    "act_bits",
    "in_bits",
    "in_block_size",
    "in_symmetric",
)


@dataclasses.dataclass(frozen=True)
class GeluMatch:
    matmul: ir.Node
    gelu: ir.Node
    epilogue: str


@dataclasses.dataclass(frozen=True)
class SiluGateMatch:
    gate: ir.Node
    up: ir.Node
    silu: ir.Node
    mul: ir.Node


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _producing_matmul(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and is_ours(node, ops.BLOCK_MATMUL) else None


def _plain_matmul(value: ir.Value | None, reader: ir.Node) -> ir.Node | str:
    """The BlockMatMul producing value, read only by reader and free of epilogue and codes, or why not."""
    node = _producing_matmul(value)
    if node is None or value is None:
        return f"its operand '{value.name if value is not None else ''}' is not a BlockMatMul result"
    if node.attributes.get("epilogue") is not None:
        return f"BlockMatMul '{node_label(node)}' already has an epilogue"
    if int_attr(node, "out_bits"):
        return f"BlockMatMul '{node_label(node)}' already gives codes"
    if sole_user(value) is not reader:
        return f"the result of BlockMatMul '{node_label(node)}' is read elsewhere too (or is a graph output)"
    return node


def _gate_up_problem(gate: ir.Node, up: ir.Node) -> str | None:
    """Why gate and up cannot be one BlockMatMul over concatenated weights, or None."""
    if gate.inputs[0] is not up.inputs[0] or list(gate.inputs[5:]) != list(up.inputs[5:]):
        return "the gate and up MatMuls read different activations"
    for name in (*_SHARED_ATTRS, "N"):
        if int_attr(gate, name, -1) != int_attr(up, name, -1):
            return f"the gate and up MatMuls differ in attribute '{name}'"
    gate_factor, up_factor = gate.attributes.get("scale_factor"), up.attributes.get("scale_factor")
    if (None if gate_factor is None else gate_factor.as_float()) != (None if up_factor is None else up_factor.as_float()):
        # float8e4m3 scales: one factor per node, and each weight has its own
        return "the gate and up MatMuls differ in attribute 'scale_factor'"
    return weight_stacking_problem(gate, up, "the gate and up MatMuls")


class FuseMatMulEpiloguePass(NodeRewritePass):
    """Fold BlockGelu, and SiLU gating of two BlockMatMuls, into a BlockMatMul epilogue."""

    def candidates(self, model: ir.Model) -> Iterator[ir.Node]:
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if is_ours(node, ops.BLOCK_GELU, ops.BLOCK_SILU):
                yield node

    def match(self, model: ir.Model, node: ir.Node) -> GeluMatch | SiluGateMatch | str | None:
        if _producing_matmul(node.inputs[0]) is None:
            return None  # not after a MatMul: not this pass's business (no report)
        if int_attr(node, "in_bits") or int_attr(node, "out_bits"):
            return (
                "its operand or result is already compressed (the pass runs before CompressIntermediatesPass)"
            )
        matmul = _plain_matmul(node.inputs[0], node)
        if isinstance(matmul, str):
            return matmul
        if node.op_type == ops.BLOCK_GELU:
            approximate = node.attributes.get("approximate")
            tanh = approximate is not None and approximate.as_string() == "tanh"
            return GeluMatch(matmul, node, "gelu_tanh" if tanh else "gelu")
        silu_out = node.outputs[0]
        mul = sole_user(silu_out)
        if mul is None or not is_op(mul, "Mul"):
            return "the SiLU result is not read by one Mul only (no gate x up)"
        up = _plain_matmul(other_input(mul, silu_out), mul)
        if isinstance(up, str):
            return f"the Mul after the SiLU: {up}"
        problem = _gate_up_problem(matmul, up)
        if problem is not None:
            return problem
        return SiluGateMatch(matmul, up, node, mul)

    def rewrite(self, model: ir.Model, matched: GeluMatch | SiluGateMatch, report: PassReport) -> None:
        if isinstance(matched, GeluMatch):
            mm = matched.matmul
            fused = ir.node(
                ops.BLOCK_MATMUL,
                list(mm.inputs),
                attributes={**_attrs(mm), "epilogue": matched.epilogue},
                domain=ops.DOMAIN,
                name=node_name(mm),
            )
            replace_pattern([mm, matched.gelu], [fused], matched.gelu.outputs[0], fused.outputs[0])
            report.count(RULE_GELU)
            return
        gate, up = matched.gate, matched.up
        inputs: list[ir.Value | None] = [gate.inputs[0]]
        for index in BLOCK_MATMUL_WEIGHT_INPUTS:
            g = gate.inputs[index] if index < len(gate.inputs) else None
            u = up.inputs[index] if index < len(up.inputs) else None
            inputs.append(
                None if g is None or u is None else concat_initializer(model.graph, [g, u], "gate_up")
            )
        inputs += list(gate.inputs[5:])
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = {**_attrs(gate), "N": 2 * int_attr(gate, "N"), "epilogue": "silu_gate"}
        fused = ir.node(
            ops.BLOCK_MATMUL, inputs, attributes=attributes, domain=ops.DOMAIN, name=node_name(gate)
        )
        replace_pattern(
            [gate, up, matched.silu, matched.mul], [fused], matched.mul.outputs[0], fused.outputs[0]
        )
        report.count(RULE_SILU_GATE)
