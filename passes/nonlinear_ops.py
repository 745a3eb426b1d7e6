"""What the compressed nonlinear ops and BlockActMatMul look like to the passes: kinds, operand slots.

Shared by the quantize passes, FoldQuantizeDequantizePass and the coverage count, so the operand
convention of docs/ops.md (input/output 0..2 = value or codes, scales, zero points; op-specific
inputs from slot 3 on) is written down once.
"""

from __future__ import annotations

import onnx_ir as ir
from bct_onnx.passes.framework import node_label

from bct_onnx import ops

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


def settings_name(node: ir.Node) -> str:
    """The name overrides match against."""
    return node_label(node) if node.name else (node.outputs[0].name or "")
