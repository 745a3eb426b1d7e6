"""FuseGeluPass: the exporters' spellings of GELU -> one ai.bct_onnx BlockGelu node (float in/out).

Canonical form: ``BlockGelu`` with in_bits = out_bits = 0 and ``approximate`` none|tanh. ONNX's own
Gelu needs opset 20 (exports here are opset 14..17 and bct-onnx never bumps the opset) and
com.microsoft's would tie the model to ORT's contrib ops; BlockGelu with float operands is exactly
GELU (erf/tanh from fixed float32 polynomials, docs/ops.md) and is the node QuantizeGeluPass and
CompressIntermediatesPass later give compressed operands. A native opset-20 ``Gelu`` node is
rewritten by QuantizeGeluPass.

Rules, anchored at the Erf / Tanh node:
- erf form ``0.5 * x * (1 + erf(x / sqrt 2))`` (BERT, Pythia, BART): any order of the products,
  ``Div(x, 1.41421)`` or ``Mul(x, 0.70711)``, the 0.5 applied to x, to (1 + erf) or to the product;
- tanh form ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`` (GPT-2, GPT-Neo, T5) and
  BLOOM's ``x * sqrt(2/pi) * (1 + 0.044715 x * x)`` inside the tanh.
Both sides of the Erf/Tanh are checked by evaluating the matched elementwise sub-graph at sample
points against the formula, so every exporter spelling of the same polynomial matches and a
different constant (a near miss, e.g. 0.045 instead of 0.044715) does not.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_name, register_domain
from bct_onnx.passes.graph_patterns import (
    FLOAT,
    SAMPLE_POINTS,
    Expression,
    collect_expression,
    is_op,
    matches_function,
    replace_pattern,
    sole_user,
)

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE_ERF = "fuse Gelu(erf)"
RULE_TANH = "fuse Gelu(tanh)"
RULE_KIND = "Gelu"
_MAX_INPUT_DEPTH = 6
_MAX_OUTPUT_STEPS = 4
_NOT_GELU = "the products after the Erf/Tanh do not compute 0.5 * x * (1 + t)"
_T_SAMPLES = np.linspace(-0.93, 0.97, SAMPLE_POINTS.size)


def _erf_argument(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(2.0)


def _tanh_argument(x: np.ndarray) -> np.ndarray:
    return np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)


def _gelu_outer(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + t)


@dataclasses.dataclass(frozen=True)
class GeluMatch:
    anchor: ir.Node  # the Erf or Tanh node
    x: ir.Value
    inner: Expression  # x -> argument of Erf/Tanh
    outer: Expression  # (x, erf/tanh output) -> GELU output
    approximate: str


def _candidates(argument: ir.Value) -> list[ir.Value]:
    """Non-constant values below the Erf/Tanh argument, nearest first (x is one of them)."""
    found: list[ir.Value] = []
    frontier = [argument]
    for _ in range(_MAX_INPUT_DEPTH):
        nxt = []
        for value in frontier:
            node = value.producer()
            if node is None:
                continue
            for v in node.inputs:
                if v is not None and v.const_value is None and all(v is not f for f in found):
                    found.append(v)
                    nxt.append(v)
        frontier = nxt
    return found


def _find_x(argument: ir.Value, reference) -> tuple[ir.Value, Expression] | None:
    for x in _candidates(argument):
        expr = collect_expression(argument, (x,))
        if isinstance(expr, Expression) and matches_function(expr, reference, [SAMPLE_POINTS]):
            return x, expr
    return None


def _find_outer(x: ir.Value, t_value: ir.Value) -> Expression | str:
    value = t_value
    for _ in range(_MAX_OUTPUT_STEPS):
        if value.is_graph_output() or not list(value.uses()):
            return f"{_NOT_GELU} (stopped at '{value.name}', a graph output or unread)"
        user = sole_user(value)
        if user is None:
            return f"'{value.name}' has several readers before the GELU product is complete"
        if not is_op(user, "Add", "Mul", "Div", "Sub"):
            return f"{user.op_type} after the {t_value.producer().op_type} is not part of 0.5 * x * (1 + t)"  # type: ignore[union-attr]
        value = user.outputs[0]
        expr = collect_expression(value, (x, t_value))
        if isinstance(expr, Expression) and matches_function(expr, _gelu_outer, [SAMPLE_POINTS, _T_SAMPLES]):
            return expr
    return _NOT_GELU


class FuseGeluPass(NodeRewritePass):
    """Fuse the erf and tanh forms of GELU into BlockGelu (float operands)."""

    op_types = frozenset({"Erf", "Tanh"})

    def match(self, model: ir.Model, node: ir.Node) -> GeluMatch | str | None:
        argument = node.inputs[0]
        if argument is None:
            return None
        if argument.dtype is not None and argument.dtype != FLOAT:
            return f"{node.op_type} on {argument.dtype.name}; BlockGelu takes float32"
        if sole_user(argument) is not node:
            return f"the {node.op_type} argument is read by other nodes too"
        approximate = "none" if node.op_type == "Erf" else "tanh"
        reference = _erf_argument if approximate == "none" else _tanh_argument
        found = _find_x(argument, reference)
        if found is None:
            what = "x / sqrt(2)" if approximate == "none" else "sqrt(2/pi) * (x + 0.044715 x^3)"
            return f"the {node.op_type} argument is not {what} of one tensor x"
        x, inner = found
        outer = _find_outer(x, node.outputs[0])
        if isinstance(outer, str):
            return outer
        return GeluMatch(node, x, inner, outer, approximate)

    def rewrite(self, model: ir.Model, matched: GeluMatch, report: PassReport) -> None:
        root = matched.outer.root
        last = root.producer()
        assert last is not None
        gelu = ir.node(
            ops.BLOCK_GELU,
            [matched.x],
            attributes={"approximate": matched.approximate},
            domain=ops.DOMAIN,
            name=node_name(last, "Gelu"),
        )
        old = [*matched.outer.nodes, matched.anchor, *matched.inner.nodes]
        replace_pattern(old, [gelu], root, gelu.outputs[0])
        register_domain(model)
        report.count(RULE_ERF if matched.approximate == "none" else RULE_TANH)
        report.count(RULE_KIND)  # now a BlockGelu, like QuantizeGeluPass's rewrites
