"""FuseSiluPass: ``Mul(x, Sigmoid(x))`` (Llama-family exports of SiLU) -> one BlockSilu (float in/out).

Canonical form: ``BlockSilu`` with in_bits = out_bits = 0, which is exactly SiLU (exp from the fixed
float32 polynomial, docs/ops.md) and is the node CompressIntermediatesPass later gives compressed
operands. ONNX's own ``Swish`` needs opset 24 and is rewritten by QuantizeSiluPass.

Rule, anchored at the Sigmoid node: its result is read by exactly one node, a Mul, whose other
operand is the Sigmoid's own input x (either operand order; a no-op float Cast of x counts as x).
Near misses keep their nodes and say why: a Sigmoid read elsewhere too (or a graph output), a Mul by
another tensor (a gate such as GLU's, not SiLU), and ``x * sigmoid(f(x))`` such as QuickGELU's
``x * sigmoid(1.702 x)``, where the Sigmoid reads f(x) and not x.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_name, register_domain
from bct_onnx.passes.graph_patterns import (
    FLOAT,
    is_op,
    other_input,
    replace_pattern,
    same_float,
    value_dtype,
)

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "fuse Silu(Sigmoid*Mul)"
RULE_KIND = "Silu"


@dataclasses.dataclass(frozen=True)
class SiluMatch:
    sigmoid: ir.Node
    mul: ir.Node
    x: ir.Value


def _reads_x_through(sigmoid_input: ir.Value, x: ir.Value) -> bool:
    """The Sigmoid's input is computed from x by one node (x * sigmoid(f(x)), e.g. QuickGELU)."""
    node = sigmoid_input.producer()
    return node is not None and any(same_float(v, x) for v in node.inputs if v is not None)


class FuseSiluPass(NodeRewritePass):
    """Fuse x * Sigmoid(x) into BlockSilu (float operands)."""

    op_types = frozenset({"Sigmoid"})

    def match(self, model: ir.Model, node: ir.Node) -> SiluMatch | str | None:
        x = node.inputs[0]
        if x is None:
            return None
        dtype = value_dtype(x)
        if dtype is not None and dtype != FLOAT:
            return f"Sigmoid on {dtype.name}; BlockSilu takes float32"
        s = node.outputs[0]
        if s.is_graph_output():
            return "the Sigmoid result is a graph output"
        readers = list(dict.fromkeys(use.node for use in s.uses()))  # Mul(s, s) is one reader
        if not readers:
            return None
        if len(readers) > 1:
            return (
                f"the Sigmoid result is read by {len(readers)} nodes, not only by the Mul of x * sigmoid(x)"
            )
        mul = readers[0]
        if not is_op(mul, "Mul"):
            return f"the Sigmoid result is read by {mul.op_type}, not by a Mul"
        other = other_input(mul, s)
        if other is None:
            return "the Mul multiplies the Sigmoid result by itself"
        if not same_float(other, x):
            if _reads_x_through(x, other):
                return (
                    f"the Sigmoid reads '{x.name}', computed from the Mul's other operand '{other.name}': "
                    "x * sigmoid(f(x)) (e.g. QuickGELU) is not SiLU"
                )
            return (
                f"the Mul multiplies Sigmoid('{x.name}') by another tensor '{other.name}' (a gate, not SiLU)"
            )
        return SiluMatch(node, mul, x)

    def rewrite(self, model: ir.Model, matched: SiluMatch, report: PassReport) -> None:
        silu = ir.node(ops.BLOCK_SILU, [matched.x], domain=ops.DOMAIN, name=node_name(matched.mul, "Silu"))
        replace_pattern([matched.sigmoid, matched.mul], [silu], matched.mul.outputs[0], silu.outputs[0])
        register_domain(model)
        report.count(RULE)
        report.count(RULE_KIND)  # now a BlockSilu, like QuantizeSiluPass's rewrites
