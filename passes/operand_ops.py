"""The operand ops as the passes see them: op kinds, operand slots, the shared rewrite steps.

The operand ops are the ai.bct_onnx ops whose input 0 and output 0 may be float or codes: BlockGelu,
BlockSilu, BlockSoftmax, BlockLayerNorm, BlockRMSNorm (elementwise and row ops) and BlockActMatMul.

Shared by the quantize passes, CompressIntermediatesPass and the coverage count, so the operand
convention of docs/ops.md (input/output 0..2 = value or codes, scales, zero points; op-specific
inputs from slot 3 on) is written down once.
"""

from __future__ import annotations

import onnx_ir as ir
from bct_onnx.passes.framework import NodeRewritePass, PassReport, node_name, register_domain
from bct_onnx.passes.graph_patterns import FLOAT, replace_pattern, value_dtype

from bct_onnx import ops
from bct_onnx.config import CompressConfig

# ai.bct_onnx op type -> op kind of bct_onnx.config (for per-kind / per-node settings).
KIND_OF_OP: dict[str, str] = {
    ops.BLOCK_GELU: "Gelu",
    ops.BLOCK_SILU: "Silu",
    ops.BLOCK_SOFTMAX: "Softmax",
    ops.BLOCK_LAYER_NORM: "LayerNormalization",
    ops.BLOCK_RMS_NORM: "LayerNormalization",
    ops.BLOCK_ACT_MATMUL: "AttentionMatMul",
}
OPERAND_OPS = frozenset(KIND_OF_OP)
# One-signed results (softmax probabilities, post-GELU values >= -0.17, post-SiLU >= -0.28) use
# asymmetric codes.
ASYMMETRIC_RESULTS = frozenset({ops.BLOCK_GELU, ops.BLOCK_SILU, ops.BLOCK_SOFTMAX})
OPERAND_SLOTS = 3  # op-specific inputs start here


def is_ours(node: ir.Node, *op_types: str) -> bool:
    return node.domain == ops.DOMAIN and (not op_types or node.op_type in op_types)


def int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def operand_inputs(x: ir.Value, extra: list[ir.Value | None]) -> list[ir.Value | None]:
    """Inputs of an operand op with a float operand x: [x, '', ''] + op-specific inputs."""
    inputs: list[ir.Value | None] = [x, None, None, *extra]
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


class OperandRewritePass(NodeRewritePass):
    """Base of the passes rewriting an ONNX op into an operand op, configured per node."""

    def __init__(self, config: CompressConfig) -> None:
        super().__init__()
        self.config = config


def operand_skip_reason(
    config: CompressConfig, node: ir.Node, kind: str, *, inferred_dtype: bool = False
) -> str | None:
    """Why node's operand (input 0) is not rewritten into the op of config kind ``kind``, or None.

    The dtype is the declared one, or with ``inferred_dtype`` also the inferred one (value_dtype).
    """
    x = node.inputs[0]
    if x is None:
        return f"{node.op_type} with a missing input"
    if not config.settings_for(kind, node_name(node)).enabled:
        return f"{kind} compression is disabled for this node by the config"
    dtype = value_dtype(x) if inferred_dtype else x.dtype
    if dtype is not None and dtype != FLOAT:
        return f"input dtype {dtype.name} is not float32"
    return None


def replace_with_ours(
    model: ir.Model, old_nodes: list[ir.Node], new_nodes: list[ir.Node], report: PassReport, rule: str
) -> None:
    """Replace old_nodes (ending in the matched node) by new_nodes (ending in the new op), register
    the ai.bct_onnx domain and count the rewrite under ``rule``."""
    replace_pattern(old_nodes, new_nodes, old_nodes[-1].outputs[0], new_nodes[-1].outputs[0])
    register_domain(model)
    report.count(rule)
