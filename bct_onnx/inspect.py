"""What is inside a model: per compressible node its format, bits, block size, scale kind and bytes.

Works on any .onnx: a bct-onnx model (custom ops), a standard "qdq" one (blocked DequantizeLinear
feeding MatMul / Gather), or a float model. For the nodes that are float it says why, by running
the compression pipeline on a copy (plain rounding, no calibration: fast) with the config the
model was made with (its metadata) or the default one, and collecting its reasons; for a model
that is not compressed yet that same run is the prediction of what ``compress`` would do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bct_onnx import code_entropy, model_io, model_metadata, ops
from bct_onnx.block_format import scale_kind_of
from bct_onnx.report import entropy_coding_line, format_bytes

logger = logging.getLogger(__name__)

# Op types (default domain) a quantize pass may compress, and the custom ops it writes.
FLOAT_CANDIDATES = frozenset({"MatMul", "Gemm", "Gather", "Softmax", "Gelu", "LayerNormalization"})
_CUSTOM_KIND = {
    ops.BLOCK_MATMUL: "MatMul",
    ops.BLOCK_GATHER: "Gather",
    ops.BLOCK_ACT_MATMUL: "AttentionMatMul",
    ops.BLOCK_ATTENTION: "Attention",
    ops.BLOCK_GELU: "Gelu",
    ops.BLOCK_SILU: "Silu",
    ops.BLOCK_SOFTMAX: "Softmax",
    ops.BLOCK_LAYER_NORM: "LayerNormalization",
    ops.BLOCK_RMS_NORM: "LayerNormalization",
    ops.BLOCK_QUANTIZE: "Quantize",
    ops.BLOCK_DEQUANTIZE: "Dequantize",
}
_LAYER = re.compile(r"(?:^|[/._])(?:layers?|h|blocks?|block)[/._](\d+)(?=$|[/._])", re.IGNORECASE)
_COMPONENTS = (  # first match wins; tested on lower-cased node and weight names
    ("lm_head", ("lm_head",)),
    ("embedding", ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")),
    ("mlp", ("mlp", "ffn", "intermediate", "gate_proj", "up_proj", "down_proj", "fc", "output/dense", "dense")),
    ("norm", ("norm", "ln_")),
)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """One compressible node: how it is stored now."""

    name: str
    op_type: str  # the node's op type (BlockMatMul, MatMul, ...)
    kind: str  # the op kind it computes (MatMul, Gather, Softmax, ...)
    format: str  # "bct" (custom op), "qdq" (standard DequantizeLinear), "float"
    layer: str | None
    component: str
    bits: int | None = None  # weight / table code width, or the compressed operand width
    block_size: int | None = None
    scale_kind: str | None = None
    zero_points: str | None = None  # None (symmetric), "integer", "packed" (integer at the code width) or "float"
    act_bits: int | None = None  # run-time activation bits (MatMul, AttentionMatMul)
    bytes: int = 0  # weight storage of this node (codes, scales, zero points, bias; 0 for activation ops)
    float_bytes: int = 0  # the same weights in float32
    shared: bool = False  # its weight tensors are also read by another node (counted once in totals)
    reason: str | None = None  # float nodes: why compress leaves it float, or that it would compress it


@dataclasses.dataclass
class Inspection:
    """The nodes of a model and their totals."""

    model: str
    file_bytes: int | None
    format: str  # "bct", "qdq", "float" or "mixed"
    made_by: dict[str, Any] | None
    opset: int | None
    nodes: list[NodeInfo]
    prediction: dict[str, Any] | None = None  # float model: what compress would do (default config)
    entropy_coding: dict[str, Any] | None = None  # code_entropy.coded_summary: bits a value before/after

    def totals_by_component(self) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = {}
        for node in self.nodes:
            entry = totals.setdefault(node.component, {"nodes": 0, "compressed": 0, "bytes": 0, "float_bytes": 0})
            entry["nodes"] += 1
            entry["compressed"] += node.format != "float"
            if node.shared:  # its weights are counted with the first node reading them
                continue
            entry["bytes"] += node.bytes
            entry["float_bytes"] += node.float_bytes
        return dict(sorted(totals.items()))

    def stayed_float(self) -> list[NodeInfo]:
        return [node for node in self.nodes if node.format == "float"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "file_bytes": self.file_bytes,
            "format": self.format,
            "made_by": self.made_by,
            "opset": self.opset,
            "totals_by_component": self.totals_by_component(),
            "nodes": [dataclasses.asdict(node) for node in self.nodes],
            "prediction": self.prediction,
            "entropy_coding": self.entropy_coding,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def summary(self, per_node: bool = False) -> str:
        """Text for a terminal: header, one line per layer (or per node), totals, float nodes and why."""
        lines = [f"{self.model}: {self.format} model, ONNX opset {self.opset}"
                 + (f", {format_bytes(self.file_bytes)}" if self.file_bytes is not None else "")]
        if self.made_by is not None:
            config = self.made_by.get("config", {})
            lines.append(
                f"made by bct-onnx {self.made_by['version']} (format {self.made_by['format']}; weight_bits "
                f"{config.get('weight_bits')}, act_bits {config.get('act_bits')}, block_size {config.get('block_size')})"
            )
        lines.append("")
        if per_node:
            lines.append(f"{'node':60} {'op':16} {'format':6} {'bits':>4} {'block':>5} {'scale':10} {'bytes':>10}")
            for node in self.nodes:
                lines.append(
                    f"{node.name[-60:]:60} {node.op_type[:16]:16} {node.format:6} {_txt(node.bits):>4} "
                    f"{_txt(node.block_size):>5} {_txt(node.scale_kind):10} {format_bytes(node.bytes):>10}"
                )
        else:
            lines.append(f"{'layer':10} {'nodes':>5} {'compressed':>10} {'bytes':>10}  formats")
            for layer, group in _by_layer(self.nodes):
                formats = sorted({_format_label(node) for node in group})
                stored = sum(node.bytes for node in group if not node.shared)
                done = sum(node.format != "float" for node in group)
                lines.append(f"{layer:10} {len(group):>5} {done:>10} {format_bytes(stored):>10}  {'; '.join(formats)}")
        lines.append("")
        lines.append(f"{'component':12} {'nodes':>5} {'compressed':>10} {'bytes':>10} {'as float32':>11}")
        for component, entry in self.totals_by_component().items():
            lines.append(
                f"{component:12} {entry['nodes']:>5} {entry['compressed']:>10} {format_bytes(entry['bytes']):>10} "
                f"{format_bytes(entry['float_bytes']):>11}"
            )
        if self.entropy_coding is not None:
            lines.append("")
            lines.append(entropy_coding_line(self.entropy_coding))
        floats = self.stayed_float()
        if floats:
            lines.append("")
            lines.append(f"float: {len(floats)} node(s)")
            reasons: dict[str, list[str]] = {}
            for node in floats:
                reason = node.reason or "not explained (inspect without --no-explain says why)"
                reason = re.sub(r"'[^']*'", "'...'", reason)  # group reasons that differ by a name
                reasons.setdefault(f"{node.kind}: {reason}", []).append(node.name)
            for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
                example = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
                lines.append(f"  {len(names):>4} x {reason} (e.g. {example})")
        if self.prediction is not None:
            lines.append("")
            p = self.prediction
            rewritten = ", ".join(f"{kind} {n}" for kind, n in sorted(p["rewritten"].items())) or "nothing"
            lines.append(
                f"compress with {p['config_source']} would rewrite: {rewritten}; weights "
                f"{format_bytes(p['weight_bytes_before'])} -> about {format_bytes(p['weight_bytes_after'])}"
            )
        return "\n".join(lines)


def _txt(value: object) -> str:
    return "-" if value is None else str(value)


def _format_label(node: NodeInfo) -> str:
    if node.format == "float":
        return f"{node.kind} float"
    bits = f"{node.bits}-bit" if node.bits else "float"
    block = f" b{node.block_size}" if node.block_size else ""
    scale = f" {node.scale_kind}" if node.scale_kind else ""
    return f"{node.kind} {node.format} {bits}{block}{scale}"


def _by_layer(nodes: Iterable[NodeInfo]) -> list[tuple[str, list[NodeInfo]]]:
    groups: dict[str, list[NodeInfo]] = {}
    for node in nodes:
        groups.setdefault(node.layer if node.layer is not None else "-", []).append(node)

    def order(item: tuple[str, list[NodeInfo]]) -> tuple[int, int]:
        digits = item[0].removeprefix("layer ")
        return (0, int(digits)) if digits.isdigit() else (1 if item[0] == "-" else 0, -1)

    return sorted(groups.items(), key=order)


def layer_of(*names: str) -> str | None:
    for name in names:
        match = _LAYER.search(name or "")
        if match:
            return f"layer {int(match.group(1))}"
    return None


def component_of(kind: str, *names: str) -> str:
    text = " ".join(n.lower() for n in names if n)
    for component, words in _COMPONENTS:
        if any(word in text for word in words):
            return component
    if kind == "Gather":
        return "embedding"
    if kind in ("Softmax", "AttentionMatMul", "Attention"):
        return "attention"
    if kind in ("Gelu", "Silu"):
        return "mlp"
    if kind == "LayerNormalization":
        return "norm"
    return "other"


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        return attr.as_tensor() if attr is not None else None
    return None


def _constant_weight(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind value, also through a Transpose (a tied table used as output projection)."""
    tensor = _const(value)
    if tensor is None and value is not None:
        producer = value.producer()
        if producer is not None and producer.op_type == "Transpose":
            tensor = _const(producer.inputs[0])
    return tensor


def _nbytes(*values: ir.Value | None) -> int:
    total = 0
    for value in values:
        tensor = _const(value)
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def _attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _custom_info(node: ir.Node, base: dict[str, Any]) -> NodeInfo:
    kind = _CUSTOM_KIND.get(node.op_type, node.op_type)
    if node.op_type in (ops.BLOCK_MATMUL, ops.BLOCK_GATHER):
        scales = _const(node.inputs[2]) if len(node.inputs) > 2 else None
        zp = node.inputs[3] if len(node.inputs) > 3 else None
        zp_tensor = _const(zp)
        zero_points = None
        if zp_tensor is not None:
            zero_points = "integer" if zp_tensor.dtype == ir.DataType.UINT8 else "float"
            if _attr(node, "zero_points_packed"):
                zero_points = "packed"
        scale_kind = scale_kind_of(np.empty(0, scales.dtype.numpy())).value if scales is not None else None
        bits = _attr(node, "bits")
        if node.op_type == ops.BLOCK_MATMUL:
            rows, cols = _attr(node, "N"), _attr(node, "K")
        else:
            codes = _const(node.inputs[1])
            rows = int(codes.shape[0]) if codes is not None else 0
            if codes is not None and code_entropy.is_coded(node):  # a stream: its header knows the rows
                rows = code_entropy.read_header(codes.numpy()).rows
            cols = _attr(node, "axis_size")
        bias = node.inputs[4] if node.op_type == ops.BLOCK_MATMUL and len(node.inputs) > 4 else None
        return NodeInfo(
            **base, kind=kind, format="bct", bits=bits, block_size=_attr(node, "block_size"),
            scale_kind=scale_kind, zero_points=zero_points,
            act_bits=(_attr(node, "act_bits") or None) if node.op_type == ops.BLOCK_MATMUL else None,
            bytes=_nbytes(node.inputs[1], node.inputs[2], zp, bias),
            float_bytes=4 * rows * cols + _nbytes(bias),
        )
    bits = _attr(node, "act_bits") or _attr(node, "out_bits") or _attr(node, "bits") or _attr(node, "in_bits") or None
    block = _attr(node, "block_size") or _attr(node, "out_block_size") or _attr(node, "in_block_size") or None
    params = _nbytes(*node.inputs)  # constant inputs only: LayerNorm's gamma and beta, say
    return NodeInfo(
        **base, kind=kind, format="bct", bits=bits, block_size=block, act_bits=_attr(node, "act_bits") or None,
        bytes=params, float_bytes=params,
    )


_QDQ_BITS = {
    ir.DataType.INT2: 2, ir.DataType.UINT2: 2, ir.DataType.INT4: 4, ir.DataType.UINT4: 4,
    ir.DataType.INT8: 8, ir.DataType.UINT8: 8,
}


_SCALE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}


_FORMAT_TAG = re.compile(r"^q(\d+)b\d+")


def _code_bits(codes_value: ir.Value, codes: ir.TensorProtocol) -> int | None:
    """Width of DequantizeLinear codes: from bct-onnx's format tag when present, else the type's, or
    for 8-bit containers the width the values use (3, 5, 6 and 7-bit codes have no standard type and
    are stored in int8 / uint8)."""
    from bct_onnx.passes.quantized_weights import FORMAT_KEY

    tagged = _FORMAT_TAG.match(codes_value.metadata_props.get(FORMAT_KEY, ""))
    if tagged:
        return int(tagged.group(1))
    bits = _QDQ_BITS.get(codes.dtype)
    if bits != 8:
        return bits
    values = codes.numpy()
    if values.size == 0:
        return bits
    low, high = int(values.min()), int(values.max())
    for width in range(2, 8):
        if codes.dtype == ir.DataType.INT8 and -(1 << (width - 1)) <= low and high < (1 << (width - 1)):
            return width
        if codes.dtype == ir.DataType.UINT8 and low >= 0 and high < (1 << width):
            return width
    return 8


def _dequantize_source(value: ir.Value | None) -> tuple[ir.Node, list[ir.Node]] | None:
    """The DequantizeLinear a weight comes from (through Transpose / offset Add chains), and the chain."""
    chain: list[ir.Node] = []
    while value is not None:
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "DequantizeLinear" and producer.domain in ("", "ai.onnx"):
            return producer, chain
        if producer.op_type not in ("Transpose", "Reshape", "Add", "Pad", "Slice") or len(chain) > 6:
            return None
        chain.append(producer)
        value = producer.inputs[0]
    return None


def _standard_info(node: ir.Node, base: dict[str, Any], kind: str) -> NodeInfo:
    weight = node.inputs[1] if kind == "MatMul" else node.inputs[0]
    found = _dequantize_source(weight)
    if found is not None:
        dq, chain = found
        codes = _const(dq.inputs[0])
        scales = _const(dq.inputs[1]) if len(dq.inputs) > 1 else None
        if codes is not None and scales is not None:
            zp = dq.inputs[2] if len(dq.inputs) > 2 else None
            offsets = [n.inputs[1] for n in chain if n.op_type == "Add"]
            zero_points = "integer" if zp is not None else ("float" if offsets else None)
            elements = int(np.prod(codes.shape.numpy()))
            bias = _bias_after(node)
            return NodeInfo(
                **base, kind=kind, format="qdq", bits=_code_bits(dq.inputs[0], codes),
                block_size=_attr(dq, "block_size") or None, scale_kind=_SCALE_NAMES.get(scales.dtype, scales.dtype.name.lower()),
                zero_points=zero_points, bytes=_nbytes(dq.inputs[0], dq.inputs[1], zp, *offsets, bias),
                float_bytes=4 * elements + _nbytes(bias),
            )
    tensor = _constant_weight(weight)
    size = int(tensor.nbytes) if tensor is not None else 0
    return NodeInfo(**base, kind=kind, format="float", bytes=size, float_bytes=size if tensor is not None and tensor.dtype == ir.DataType.FLOAT else 0)


def _bias_after(node: ir.Node) -> ir.Value | None:
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        other = uses[0].node.inputs[1 - uses[0].idx]
        if _const(other) is not None:
            return other
    return None


def describe_nodes(model: ir.Model) -> list[NodeInfo]:
    """NodeInfo of every compressible or compressed node, in graph order; shared weights marked."""
    infos: list[NodeInfo] = []
    weight_readers: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        label = node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else node.op_type)
        weight = _weight_name(node)
        base = {"name": label, "op_type": node.op_type, "layer": layer_of(label, weight or "")}
        if node.domain == ops.DOMAIN:
            kind = _CUSTOM_KIND.get(node.op_type, node.op_type)
            info = _custom_info(node, {**base, "component": component_of(kind, label, weight or "")})
        elif node.domain in ("", "ai.onnx") and node.op_type in FLOAT_CANDIDATES:
            kind = node.op_type
            if kind == "Gather" and not _is_table_gather(node):
                continue
            if kind in ("MatMul", "Gemm") and _constant_weight(node.inputs[1]) is None and _dequantize_source(node.inputs[1]) is None:
                kind = "AttentionMatMul" if kind == "MatMul" else kind
                info = NodeInfo(**base, kind=kind, format="float", component=component_of(kind, label))
            elif kind in ("MatMul", "Gather"):
                info = _standard_info(node, {**base, "component": component_of(kind, label, weight or "")}, kind)
            else:
                info = NodeInfo(**base, kind=kind, format="float", component=component_of(kind, label, weight or ""),
                                bytes=_nbytes(*node.inputs[1:]))
        else:
            continue
        if weight is not None and info.bytes:
            weight_readers[weight] = weight_readers.get(weight, 0) + 1
            if weight_readers[weight] > 1:
                info = dataclasses.replace(info, shared=True)
        infos.append(info)
    return infos


def _weight_name(node: ir.Node) -> str | None:
    """Name of the tensor a node's weight is stored in (codes, DequantizeLinear codes, or float weight)."""
    if node.domain == ops.DOMAIN and node.op_type in (ops.BLOCK_MATMUL, ops.BLOCK_GATHER):
        return node.inputs[1].name if node.inputs[1] is not None else None
    index = 0 if node.op_type == "Gather" else 1
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    found = _dequantize_source(node.inputs[index])
    if found is not None:
        return found[0].inputs[0].name if found[0].inputs[0] is not None else None
    producer = node.inputs[index].producer()
    if producer is not None and producer.op_type == "Transpose" and _const(producer.inputs[0]) is not None:
        return producer.inputs[0].name  # a tied table read as the output projection
    return node.inputs[index].name


def _is_table_gather(node: ir.Node) -> bool:
    data = node.inputs[0]
    tensor = _const(data)
    if tensor is not None:
        return tensor.dtype.is_floating_point() and len(tensor.shape) == 2
    return _dequantize_source(data) is not None


def _model_format(nodes: list[NodeInfo]) -> str:
    formats = {node.format for node in nodes if node.format != "float"}
    if not formats:
        return "float"
    return formats.pop() if len(formats) == 1 else "mixed"


def _reasons(model: ir.Model, config: Any) -> tuple[dict[str, str], set[str], dict[str, int], int]:
    """Run the pipeline on a copy: skip reasons by node, nodes it would rewrite, rule counts, weight bytes."""
    from bct_onnx.passes import compress_model

    result = compress_model(model, config)
    reasons = {skip.node: skip.reason for skip in result.skipped}
    rewritten_names = {
        node.name for node in ir.traversal.RecursiveGraphIterator(result.model.graph) if node.domain == ops.DOMAIN and node.name
    }
    weight_bytes = sum(int(v.const_value.nbytes) for v in result.model.graph.initializers.values() if v.const_value is not None)
    return reasons, rewritten_names, dict(result.rewritten), weight_bytes


def inspect_model(
    model: str | os.PathLike[str] | onnx.ModelProto | ir.Model,
    *,
    explain: bool = True,
    config: Any = None,
) -> Inspection:
    """Describe ``model``; with ``explain`` run the pipeline on a copy to say why float nodes stay float.

    config: the CompressConfig to explain with (default: the one stored in the model's metadata,
    else CompressConfig() with plain rounding).
    """

    file_bytes = None
    if isinstance(model, (str, os.PathLike)):
        path = model_io.resolve_model_file(model)
        label = str(path)
        loaded = model_io.load(path)
        file_bytes = model_io.file_bytes(path)
    else:
        label = "<in-memory model>"
        loaded = model_io.from_proto(model)
    made_by = model_metadata.read(loaded)
    nodes = describe_nodes(loaded)
    kind = _model_format(nodes)
    prediction = None
    if explain and any(node.format == "float" for node in nodes):
        source = "the given config"
        if config is None:
            config, source = _config_for(made_by)
        config = dataclasses.replace(config, weight_scale_search=False, entropy_code=False)
        reasons, would_rewrite, rules, after = _reasons(loaded, config)
        explained = []
        for node in nodes:
            if node.format == "float":
                # a node the run rewrote may still carry a note (its result stays float): rewritten wins
                if node.name in would_rewrite:
                    node = dataclasses.replace(node, reason=f"compressible: compress with {source} would rewrite it")
                elif node.name in reasons:
                    node = dataclasses.replace(node, reason=reasons[node.name])
                else:
                    node = dataclasses.replace(node, reason=f"not an op kind {source} compresses")
            explained.append(node)
        nodes = explained
        if kind == "float":
            from bct_onnx.api import _rewritten_op_types

            before = sum(int(v.const_value.nbytes) for v in loaded.graph.initializers.values() if v.const_value is not None)
            prediction = {
                "config_source": source,
                "rewritten": _rewritten_op_types(rules),
                "weight_bytes_before": before,
                "weight_bytes_after": after,
            }
    opset = loaded.opset_imports.get("", loaded.opset_imports.get("ai.onnx"))
    return Inspection(label, file_bytes, kind, made_by, opset, nodes, prediction, code_entropy.coded_summary(loaded))


def _config_for(made_by: dict[str, Any] | None) -> tuple[Any, str]:
    """The config a model was made with (from its metadata) or the default, and how to call it."""
    from bct_onnx.config import CompressConfig
    from bct_onnx.config_file import config_from_mapping

    if made_by is not None:
        stored = made_by.get("config", {})
        try:
            return config_from_mapping(_file_keys(stored), "model metadata"), "the config it was made with"
        except (ValueError, TypeError) as error:  # an older or foreign config: explain with the default
            logger.info("the model's stored config is not usable here (%s); explaining with the default", error)
    return CompressConfig(), "the default config"


def _file_keys(config: dict[str, Any]) -> dict[str, Any]:
    from bct_onnx.config_file import TOP_LEVEL_KEYS

    return {key: value for key, value in config.items() if key in TOP_LEVEL_KEYS and value is not None}
