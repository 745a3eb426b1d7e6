"""QuantizeMatMulPass: MatMul(A, W) with a constant float32 [K, N] weight -> ai.bct_onnx BlockMatMul.

The weight is stored transposed, [N, K], quantized along K (docs/ops.md). A weight reached through
``Transpose(perm=[1, 0])`` of a constant [N, K] (a tied embedding table used as output projection)
is quantized as it is, without a transpose, and shares its codes with a Gather of the same table
when the formats agree. A following ``Add`` of a constant [N] bias is fused when the MatMul output
has no other consumer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from bct_onnx.passes.framework import DEFAULT_DOMAINS, NodeRewritePass, PassReport, node_name, register_domain
from bct_onnx.passes.quantized_weights import (
    FLOAT_DTYPES,
    RULE_WIDE_SCALES,
    constant_tensor,
    existing_table_format,
    quantized_initializers,
    scale_attributes,
    trim_trailing_none,
    zero_point_attributes,
)

from bct_onnx import ops
from bct_onnx.block_format import BlockFormat, ScaleKind, float8e4m3_scale_factor
from bct_onnx.calibration import DEFAULT_DAMPING, MatMulKey
from bct_onnx.config import CompressConfig

logger = logging.getLogger(__name__)

RULE_MATMUL = "MatMul"
RULE_BIAS = "MatMul+Add(bias)"
RULE_TRANSPOSED = "MatMul(Transpose(weight))"
RULE_SHARED = "shared quantized weight"
RULE_GPTQ = "MatMul weight rounded by GPTQ (calibrated)"
RULE_IMPORTANCE = "MatMul weight scales searched with measured channel importance"


@dataclasses.dataclass(frozen=True)
class MatMulMatch:
    """Everything the rewrite needs, found by match."""

    matmul: ir.Node
    activation: ir.Value
    source: ir.Value  # the constant initializer the weight comes from
    source_tensor: ir.TensorProtocol
    source_is_transposed: bool  # True: source is [N, K] reached through Transpose(perm=[1, 0])
    k: int
    n: int
    bias_add: ir.Node | None
    bias: np.ndarray | ir.Value | None  # an [N] float32 initializer value, or values to register
    hessian: np.ndarray | None = None  # calibration X^T X of the activation [K, K]: GPTQ rounding
    damping: float = DEFAULT_DAMPING  # GPTQ damping of that Hessian
    importance: np.ndarray | None = None  # measured mean square of each input channel [K]: weighted scale search


def _weight_source(weight: ir.Value) -> tuple[ir.Value, ir.TensorProtocol, bool] | str:
    """(source value, its tensor, is_transposed) or a skip reason."""
    tensor = constant_tensor(weight)
    if tensor is not None:
        return weight, tensor, False
    producer = weight.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain in DEFAULT_DOMAINS:
        inner = producer.inputs[0]
        inner_tensor = constant_tensor(inner)
        perm_attr = producer.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else None
        if (
            inner is not None
            and inner_tensor is not None
            and len(inner_tensor.shape) == 2
            and perm in (None, [1, 0])
        ):
            return inner, inner_tensor, True
    if weight.is_graph_input():
        return f"weight (input B) '{weight.name}' is a graph input, not a constant"
    what = producer.op_type if producer is not None else "unknown"
    return (
        f"weight (input B) is computed at run time (produced by {what}): activation x activation "
        "MatMul (e.g. attention) is not compressed by this pass"
    )


def _bias_of(
    model: ir.Model, matmul: ir.Node, n: int, a_rank: int | None
) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """The Add after the MatMul and its constant bias (reshaped to [N]) when it can be fused."""
    out = matmul.outputs[0]
    if out.is_graph_output():
        return None
    uses = list(out.uses())
    if len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or add.graph is not matmul.graph:
        return None
    other = add.inputs[1 - uses[0].idx]
    tensor = constant_tensor(other)
    if other is None or tensor is None or tensor.dtype not in FLOAT_DTYPES:
        return None
    shape = tuple(tensor.shape.numpy())
    if not shape or shape[-1] != n or any(dim != 1 for dim in shape[:-1]):
        return None
    # A bias of rank r > 1 broadcasts the output to rank r: only fusable if A has at least that rank.
    if len(shape) > 1 and (a_rank is None or a_rank < len(shape)):
        return None
    return add, other, np.asarray(tensor.numpy(), dtype=np.float32).reshape(n)


def _only_matmul_reading(matched: MatMulMatch) -> bool:
    """True when no other MatMul reads the weight's source (GPTQ fits the codes to this one's inputs).

    A tied embedding table qualifies: besides this MatMul (through one Transpose) it is read only by
    Gathers, which then share the codes that GPTQ chose for the output projection.
    """
    uses = list(matched.source.uses())
    if not matched.source_is_transposed:
        return len(uses) == 1
    transposes = [use.node for use in uses if use.node.op_type == "Transpose"]
    others = [use.node for use in uses if use.node.op_type not in ("Transpose", "Gather")]
    if others or len(transposes) != 1:
        return False
    readers = [use.node for use in transposes[0].outputs[0].uses()]
    return readers == [matched.matmul]


def _input_importance(matched: MatMulMatch) -> np.ndarray | None:
    """Expected square of each input channel [K] when A comes from a LayerNormalization, else None.

    A LayerNormalization output is about gamma * z + beta with z of zero mean and unit variance per
    row, so E[a_k^2] ~ gamma_k^2 + beta_k^2: channels with large gamma or beta weigh more in the
    weight error that the scale search minimises. Only for weights read by this MatMul alone.
    """
    if len(list(matched.source.uses())) != 1:
        return None
    producer = matched.activation.producer()
    if producer is None or producer.op_type != "LayerNormalization" or producer.domain not in DEFAULT_DOMAINS:
        return None
    gamma = constant_tensor(producer.inputs[1]) if len(producer.inputs) > 1 else None
    beta = constant_tensor(producer.inputs[2]) if len(producer.inputs) > 2 else None
    if gamma is None or gamma.size != matched.k:
        return None
    imp = np.square(np.asarray(gamma.numpy(), dtype=np.float32).reshape(-1))
    if beta is not None and beta.size == matched.k:
        imp = imp + np.square(np.asarray(beta.numpy(), dtype=np.float32).reshape(-1))
    return imp / max(float(imp.mean()), 1e-12)


def _scale_search_importance(matched: MatMulMatch) -> np.ndarray | None:
    """Per-input-channel weights of the scale search: measured ones, else a LayerNormalization's, else none.

    GPTQ-rounded weights (a Hessian) get none: GPTQ itself weighs the error by the Hessian.
    """
    if matched.hessian is not None:
        return None
    return matched.importance if matched.importance is not None else _input_importance(matched)


def _shared_scale_factor(matched: MatMulMatch, fmt: BlockFormat, config: CompressConfig) -> float | None:
    """float8e4m3 scales: one scale_factor for the MatMuls reading this activation with a weight in fmt
    (a layer's q/k/v, its gate/up), the largest any of them needs, so that FuseMatMulEpiloguePass can
    concatenate gate and up; None (each weight its own factor) for other scale kinds.

    A sibling rewritten earlier holds the factor its group got while every weight was still float; it
    is taken when it has the same width and is no smaller than this weight's own (never saturating).
    """
    if fmt.scale_kind is not ScaleKind.FLOAT8E4M3 or matched.source_is_transposed:
        return None

    def needed(tensor: ir.TensorProtocol) -> float:
        return float8e4m3_scale_factor(np.asarray(tensor.numpy(), dtype=np.float32).T, fmt)

    own = needed(matched.source_tensor)
    group = [own]
    for use in matched.activation.uses():
        node = use.node
        if use.idx != 0 or node is matched.matmul:
            continue
        if node.domain == ops.DOMAIN and node.op_type == ops.BLOCK_MATMUL:
            factor = node.attributes.get("scale_factor")
            width = tuple(node.attributes[a].as_int() for a in ("bits", "block_size", "symmetric") if a in node.attributes)
            if factor is not None and factor.as_float() >= own and width == (fmt.bits, fmt.block_size, int(fmt.symmetric)):
                return factor.as_float()
        elif node.op_type == "MatMul" and node.domain in DEFAULT_DOMAINS and node.inputs[1] is not None:
            found = _weight_source(node.inputs[1])
            if isinstance(found, str) or found[2] or len(found[1].shape) != 2:
                continue
            if config.settings_for("MatMul", node_name(node)).weight_format == fmt:
                group.append(needed(found[1]))
    return max(group)


class QuantizeMatMulPass(NodeRewritePass):
    """Rewrite MatMul with a constant 2-D float32 weight into BlockMatMul (+ fused bias)."""

    op_types = frozenset({"MatMul"})

    def __init__(
        self,
        config: CompressConfig,
        hessians: Mapping[MatMulKey, np.ndarray] | None = None,
        damping: float = DEFAULT_DAMPING,
        importances: Mapping[MatMulKey, np.ndarray] | None = None,
    ) -> None:
        """hessians: calibration X^T X per (activation name, weight name), measured by the caller
        (bct_onnx.calibration.collect_hessians) on the model this pass receives; their weights are
        rounded by GPTQ with that damping (Calibration.damping). importances: measured mean square
        of each input channel [K] per (activation name, weight name)
        (bct_onnx.channel_importance.collect_channel_importance): the scale search of weights without
        a Hessian weighs each channel's error by it. The pass itself runs no inference."""
        super().__init__()
        self.config = config
        # Kept as given: a HessianStore reads each Hessian from disk only when its MatMul is rewritten.
        self.hessians: Mapping[MatMulKey, np.ndarray] = hessians if hessians is not None else {}
        self.damping = damping
        self.importances: Mapping[MatMulKey, np.ndarray] = importances if importances is not None else {}

    def match(self, model: ir.Model, node: ir.Node) -> MatMulMatch | str | None:
        activation, weight = node.inputs[0], node.inputs[1]
        if activation is None or weight is None:
            return "MatMul with a missing input"
        found = _weight_source(weight)
        if isinstance(found, str):
            return found
        source, tensor, is_transposed = found
        if not self.config.settings_for("MatMul", node_name(node)).enabled:
            return "MatMul compression is disabled for this node by the config"
        if tensor.dtype not in FLOAT_DTYPES:
            return f"weight dtype {tensor.dtype.name} is not FLOAT (float32)"
        rank = len(tensor.shape)
        if rank != 2:
            return f"weight has rank {rank}; only 2-D [K, N] weights are compressed"
        dims = tuple(tensor.shape.numpy())
        k, n = (dims[1], dims[0]) if is_transposed else (dims[0], dims[1])
        if k < 1 or n < 1:
            return f"weight has an empty dimension (K={k}, N={n})"
        if activation.dtype is not None and activation.dtype not in FLOAT_DTYPES:
            return f"activation dtype {activation.dtype.name} is not FLOAT (BlockMatMul takes float32)"
        a_rank = None
        if activation.shape is not None:
            a_rank = len(activation.shape)
            last = activation.shape[-1] if a_rank else None
            if isinstance(last, int) and last != k:
                return f"activation's last dimension {last} does not match the weight's K={k}"
        bias = _bias_of(model, node, n, a_rank)
        bias_add: ir.Node | None = None
        bias_value: np.ndarray | ir.Value | None = None
        if bias is not None:
            bias_add, given, bias_value = bias
            bias_shape = tuple(given.shape.numpy()) if given.shape is not None else None
            if given.is_initializer() and bias_shape == (n,):
                bias_value = given  # reuse the [N] initializer as it is
        matched = MatMulMatch(node, activation, source, tensor, is_transposed, k, n, bias_add, bias_value)
        key = (activation.name or "", source.name or "")
        hessian = self.hessians.get(key)
        if hessian is not None and _only_matmul_reading(matched):
            matched = dataclasses.replace(matched, hessian=hessian, damping=self.damping)
        importance = self.importances.get(key)
        if importance is not None and matched.hessian is None and importance.shape == (k,) and _only_matmul_reading(matched):
            matched = dataclasses.replace(matched, importance=importance)
        return matched

    def rewrite(self, model: ir.Model, matched: MatMulMatch, report: PassReport) -> None:
        graph = model.graph
        config = self.config
        matmul = matched.matmul
        settings = config.settings_for("MatMul", node_name(matmul))  # per-node overrides
        fmt = settings.weight_format
        if matched.source_is_transposed:
            # The table may already be stored in its Gather layout (by another reader, or by
            # QuantizeGatherPass run on its own before this pass), maybe with another scale kind:
            # with equal bits and block size, reuse it in that format so the table is stored once.
            fmt = existing_table_format(graph, matched.source, fmt) or fmt
        quantized = quantized_initializers(
            graph,
            matched.source,
            matched.source_tensor,
            fmt,
            transposed=not matched.source_is_transposed,
            scale_search=config.weight_scale_search,
            importance=_scale_search_importance(matched) if config.weight_scale_search else None,
            hessian=matched.hessian,
            damping=matched.damping,
            keep_dead_inputs=matched.source_is_transposed,
            scale_factor=_shared_scale_factor(matched, fmt, config),
        )
        name = node_name(matched.matmul, "MatMul")
        bias: ir.Value | None = None
        if isinstance(matched.bias, ir.Value):
            bias = matched.bias
        elif matched.bias is not None:
            base = f"{name}.bias"
            unique, i = base, 1
            while unique in graph.initializers:
                unique, i = f"{base}_{i}", i + 1
            tensor = ir.tensor(matched.bias, name=unique)
            bias = ir.Value(
                name=unique, shape=ir.Shape([matched.n]), type=ir.TensorType(tensor.dtype), const_value=tensor
            )
            graph.register_initializer(bias)
        inputs = trim_trailing_none(
            [matched.activation, quantized.codes, quantized.scales, quantized.zero_points, bias]
        )
        new_node = ir.node(
            ops.BLOCK_MATMUL,
            inputs,
            attributes={
                "K": matched.k,
                "N": matched.n,
                "bits": fmt.bits,
                "block_size": fmt.block_size,
                "symmetric": int(fmt.symmetric),
                **zero_point_attributes(fmt),
                **scale_attributes(quantized.scales),
                "act_bits": settings.act_bits or 0,
            },
            domain=ops.DOMAIN,
            name=name,
        )
        old_nodes = [matched.matmul] if matched.bias_add is None else [matched.matmul, matched.bias_add]
        old_output = old_nodes[-1].outputs[0]
        owner = matched.matmul.graph
        assert owner is not None
        ir.convenience.replace_nodes_and_values(
            owner, old_nodes[-1], old_nodes, [new_node], [old_output], [new_node.outputs[0]]
        )
        register_domain(model)
        report.count(RULE_MATMUL)
        if matched.bias_add is not None:
            report.count(RULE_BIAS)
        if matched.source_is_transposed:
            report.count(RULE_TRANSPOSED)
        if quantized.reused:
            report.count(RULE_SHARED)
        if quantized.widened:
            report.count(RULE_WIDE_SCALES)
        if matched.hessian is not None:
            report.count(RULE_GPTQ)
        elif matched.importance is not None and config.weight_scale_search:
            report.count(RULE_IMPORTANCE)
