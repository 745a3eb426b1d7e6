"""FuseAttentionPass: scaled, masked attention -> one ai.bct_onnx BlockAttention (docs/ops.md).

Found from each Softmax over the last axis whose input is, through at most a scale (Mul / Div by a
scalar) and then an additive mask (Add), a MatMul of two run-time tensors Q x K^T, and whose result
(through at most Where(IsNaN(P), 0, P) or a Cast) is read only by a MatMul P x V. The op needs
Q [B, Hq, Sq, Dh], K and V [B, Hkv, Sk, Dh]:
- K^T as a Transpose swapping the last two axes of K (Llama), or BERT's Transpose [0, 2, 3, 1] of
  [B, S, H, Dh], which becomes a Transpose [0, 2, 1, 3];
- a grouped-query expansion of K or V (Reshape(Expand(Unsqueeze(x, axis 2))), repeat_kv) is folded
  away: the op reads the KV head h // (Hq / Hkv) itself;
- scalar factors on Q, on K^T (SDPA exports scale both by sqrt(scale)) and on the scores go into the
  `scale` attribute when their value is static (a constant, or arithmetic on static dims of a Shape,
  as 1 / sqrt(head_size)); a dynamic factor on Q stays in the graph, one on K^T is a skip.
When Q, K and V are all an encoder's head split of [B, S, H * Dh] tensors (head_layout.split_heads; K
also as BERT's Transpose [0, 2, 3, 1] of the Reshape) and the result is only merged back (Transpose ->
Reshape [B, S, H * Dh]), the op reads and writes [B, S, H * Dh] itself (attribute q_heads) and those
Reshape / Transpose nodes go; otherwise it reads [B, H, S, Dh].
Q x K^T keeps the settings (act_bits, block_size) of QuantizeActMatMulPass's AttentionMatMul kind.
The fused op keeps P and V in float32 where the unfused chain quantizes both, so it is at least as
accurate (reference_attention.chain_tolerance bounds the difference), and it never stores P.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import PassReport, node_name, onnx_opset
from bct_onnx.passes.graph_patterns import (
    FLOAT,
    is_op,
    producer,
    sole_user,
    static_value,
    value_rank,
    value_shape,
)
from bct_onnx.passes.head_layout import NoFit, merge_heads, split_heads, split_reshape
from bct_onnx.passes.operand_ops import OperandRewritePass, replace_with_ours
from bct_onnx.passes.quantized_weights import constant_tensor

from bct_onnx import ops

logger = logging.getLogger(__name__)

RULE = "Attention (fused)"
RULE_GQA = "Attention: grouped-query expansion folded"
RULE_LAYOUT = "Attention: head split / merge in the op"
RULE_MASK = "Attention: additive mask"
RULE_SCALE = "Attention: static scale folded"


def _scalar_factor(node: ir.Node, data: ir.Value) -> tuple[float | None, bool]:
    """(static factor, is a scalar op) of a Mul / Div node applied to ``data``."""
    other = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
    shape = value_shape(other)
    if shape is None or not all(isinstance(d, int) and d == 1 for d in shape):
        return None, False
    if node.op_type == "Div" and node.inputs[1] is not other:
        return None, False  # s / x is not a scaling of x
    value = static_value(other)
    if value is None or value.size != 1:
        return None, True
    factor = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
    return (1.0 / factor if node.op_type == "Div" else factor), True


def _scaled_input(value: ir.Value) -> tuple[ir.Value, float | None, ir.Node | None]:
    """value = x * static factor (Mul / Div by a scalar)? -> (x, factor, node); else (value, 1.0, None).
    A dynamic scalar factor gives (value, None, node)."""
    node = producer(value, "Mul", "Div")
    if node is None:
        return value, 1.0, None
    for data in node.inputs[:1] if node.op_type == "Div" else node.inputs:
        if data is None:
            continue
        factor, scalar_op = _scalar_factor(node, data)
        if scalar_op:
            return (data, factor, node) if factor is not None else (value, None, node)
    return value, 1.0, None


def _int_list(value: ir.Value | None) -> list[int] | None:
    tensor = constant_tensor(value) if value is not None else None
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def unrepeated_kv(value: ir.Value, model: ir.Model) -> ir.Value | None:
    """x when value = Reshape(Expand(Unsqueeze(x, axes [2]), ...)) with x of rank 4 (repeat_kv)."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsqueeze is None or unsqueeze.inputs[0] is None:
        return None
    axes = _int_list(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    if axes is None and "axes" in unsqueeze.attributes:  # opset < 13
        axes = list(unsqueeze.attributes["axes"].as_ints())
    source = unsqueeze.inputs[0]
    if axes not in ([2], [-3]) or value_rank(source) != 4:
        return None
    return source


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Q, K, V as [B, S, H * Dh] tensors and the merge nodes that end the chain."""

    q: ir.Value
    k: ir.Value
    v: ir.Value
    q_heads: int
    merge: list[ir.Node]


def packed_layout(
    q: ir.Value, k: ir.Value, k_split_only: bool, v: ir.Value, result: ir.Value
) -> PackedLayout | None:
    """The encoder's [B, S, H * Dh] sources of Q, K (k_split_only: k is the Reshape, as BERT's K^T
    transposes it itself), V, and the merge of the result; None when any of them is not there."""
    try:
        qx, hq, dh = split_heads(q, None, None)
        kx, hk, _ = split_reshape(k, None, dh) if k_split_only else split_heads(k, None, dh)
        vx, _, _ = split_heads(v, hk, dh)
        _, merge = merge_heads(result, hq * dh)
    except NoFit:
        return None
    if hq % hk != 0:
        return None
    return PackedLayout(qx, kx, vx, hq, merge)


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    chain: list[ir.Node]  # the nodes from Q x K^T to P x V that the op replaces
    q: ir.Value
    k: ir.Value
    k_transpose: list[int] | None  # perm of a new Transpose to apply to k, or None
    v: ir.Value
    mask: ir.Value | None
    scale: float
    gqa: bool
    act_bits: int
    block_size: int
    layout: PackedLayout | None


class FuseAttentionPass(OperandRewritePass):
    """Rewrite Q x K^T -> scale -> mask -> Softmax -> x V into BlockAttention."""

    op_types = frozenset({"Softmax"})
    needs_shapes = True

    def match(self, model: ir.Model, node: ir.Node) -> AttentionMatch | str | None:
        x = node.inputs[0]
        if x is None:
            return None
        rank = value_rank(x)
        attr = node.attributes.get("axis")
        axis = attr.as_int() if attr is not None else (-1 if (onnx_opset(model) or 13) >= 13 else 1)
        if rank != 4 or axis not in (-1, 3):
            return None  # not 4-D attention probabilities over keys
        chain: list[ir.Node] = [node]
        # Backwards: [Add mask] <- [Mul/Div scale] <- MatMul.
        mask = None
        value = x
        add = producer(value, "Add")
        if add is not None:
            a, b = add.inputs[0], add.inputs[1]
            scores_side = a if (producer(a, "MatMul", "Mul", "Div") is not None) else b
            mask = b if scores_side is a else a
            if mask is None or scores_side is None or sole_user(scores_side) is not add:
                return "attention Add: the scores are read elsewhere"
            if mask.dtype is not None and mask.dtype != FLOAT:
                return f"attention mask dtype {mask.dtype.name} is not float32"
            mask_rank = value_rank(mask)
            if mask_rank is None or mask_rank > 4:
                return f"attention mask of rank {mask_rank}; BlockAttention takes a mask of rank <= 4"
            chain.insert(0, add)
            value = scores_side
        scale = 1.0
        scaled = producer(value, "Mul", "Div")
        if scaled is not None:
            inner, factor, scale_node = _scaled_input(value)
            if factor is None or scale_node is None:
                return "attention scores scaled by a factor that is not static"
            if sole_user(inner) is not scale_node:
                return "attention scores read elsewhere"
            scale *= factor
            chain.insert(0, scale_node)
            value = inner
        qk = producer(value, "MatMul")
        if qk is None or qk.inputs[0] is None or qk.inputs[1] is None:
            return None
        if sole_user(value) is not chain[0]:
            return "attention scores read elsewhere"
        if any(constant_tensor(v) is not None for v in qk.inputs):
            return None
        chain.insert(0, qk)
        # Forwards: [IsNaN + Where | Cast] -> MatMul P x V.
        p = node.outputs[0]
        users = [use.node for use in p.uses()]
        if p.is_graph_output():
            return "attention probabilities are a graph output"
        if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
            isnan = next(u for u in users if u.op_type == "IsNaN")
            where = next(u for u in users if u.op_type == "Where")
            fill = static_value(where.inputs[1])
            if (
                where.inputs[0] is not isnan.outputs[0]
                or where.inputs[2] is not p
                or fill is None
                or np.any(fill != 0)
                or sole_user(isnan.outputs[0]) is not where
            ):
                return "attention probabilities read by something other than P x V"
            chain += [isnan, where]
            p = where.outputs[0]
        elif len(users) == 1 and is_op(users[0], "Cast", "Identity", "Dropout"):
            chain.append(users[0])
            p = users[0].outputs[0]
        pv = sole_user(p)
        if not is_op(pv, "MatMul") or pv is None or pv.inputs[0] is not p or pv.inputs[1] is None:
            return "attention probabilities not read by one MatMul P x V"
        chain.append(pv)
        settings = self.config.settings_for("AttentionMatMul", node_name(qk))
        if not settings.enabled or settings.act_bits is None:
            return "AttentionMatMul is disabled or weight-only for Q x K^T: BlockAttention needs act_bits"
        q = qk.inputs[0]
        q_inner, q_factor, _ = _scaled_input(q)
        if q_factor is not None and q_inner is not q:
            scale *= q_factor
            q = q_inner
        kt_inner, k_factor, _ = _scaled_input(qk.inputs[1])
        if k_factor is None:
            return "K^T scaled by a factor that is not static"
        scale *= k_factor
        transpose = producer(kt_inner, "Transpose")
        perm = (
            list(transpose.attributes["perm"].as_ints())
            if transpose and "perm" in transpose.attributes
            else None
        )
        if transpose is None or transpose.inputs[0] is None or perm not in ([0, 1, 3, 2], [0, 2, 3, 1]):
            return f"K^T is not a Transpose of K (perm {perm}); BlockAttention reads K [B, H, S, Dh]"
        k = transpose.inputs[0]
        k_transpose = [0, 2, 1, 3] if perm == [0, 2, 3, 1] else None
        v = pv.inputs[1]
        gqa = False
        if k_transpose is None:
            source = unrepeated_kv(k, model)
            if source is not None:
                k, gqa = source, True
        v_source = unrepeated_kv(v, model)
        if v_source is not None:
            v = v_source
            gqa = True
        for what, t in (("Q", q), ("K", k), ("V", v), ("P x V", pv.outputs[0])):
            if value_rank(t) != 4:
                return f"attention {what} has rank {value_rank(t)}; BlockAttention takes 4-D [B, H, S, Dh]"
            if t.dtype is not None and t.dtype != FLOAT:
                return f"attention {what} dtype {t.dtype.name} is not float32"
        if not np.isfinite(scale) or scale == 0:
            return f"attention scale {scale} is not a finite nonzero number"
        layout = None if gqa else packed_layout(q, k, k_transpose is not None, v, pv.outputs[0])
        if layout is not None:
            chain += layout.merge
        return AttentionMatch(
            chain,
            q,
            k,
            k_transpose,
            v,
            mask,
            float(scale),
            gqa,
            settings.act_bits,
            settings.block_size,
            layout,
        )

    def rewrite(self, model: ir.Model, matched: AttentionMatch, report: PassReport) -> None:
        new_nodes: list[ir.Node] = []
        q, k, v = matched.q, matched.k, matched.v
        qk = matched.chain[0]
        pv = next(n for n in reversed(matched.chain) if n.op_type == "MatMul")
        attributes: dict[str, int | float] = {
            "act_bits": matched.act_bits,
            "block_size": matched.block_size,
            "scale": matched.scale,
        }
        if matched.layout is not None:
            q, k, v = matched.layout.q, matched.layout.k, matched.layout.v
            attributes["q_heads"] = matched.layout.q_heads
        elif matched.k_transpose is not None:
            t = ir.node("Transpose", [k], attributes={"perm": matched.k_transpose}, name=f"{node_name(qk)}/K")
            new_nodes.append(t)
            k = t.outputs[0]
        inputs: list[ir.Value | None] = [q, k, None, None, v]
        if matched.mask is not None:
            inputs += [None, None, matched.mask]
        fused = ir.node(
            ops.BLOCK_ATTENTION,
            inputs,
            attributes=attributes,
            domain=ops.DOMAIN,
            name=pv.name,
        )
        new_nodes.append(fused)
        replace_with_ours(model, matched.chain, new_nodes, report, RULE)
        if matched.layout is not None:
            report.count(RULE_LAYOUT)
        if matched.gqa:
            report.count(RULE_GQA)
        if matched.mask is not None:
            report.count(RULE_MASK)
        if matched.scale != 1.0:
            report.count(RULE_SCALE)
