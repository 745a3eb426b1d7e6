"""Where a compressed model's bytes and error come from, per node and per layer.

Measured from the models themselves: bytes of every initializer (and of the FP32 tensor it was
made from), the relative quantization error of every quantized weight (dequantized with the block
format spec against its FP32 source), and optionally the relative error of every compressed node's
float output against the FP32 model's same tensor on the given inputs (calibration batches).
The HTML report (bct_onnx/html_report.py) draws these.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bct_onnx import block_format, code_entropy, ops
from bct_onnx.block_format import BlockFormat, ZeroPointKind
from bct_onnx.kv_cache import compress_feeds, read_formats
from bct_onnx.passes.quantized_weights import FORMAT_KEY, SOURCE_KEY, node_zero_points

logger = logging.getLogger(__name__)

# Exporters name nodes after module paths: "/bert/encoder/layer.3/...", "/model/layers.3/...",
# "/transformer/h.3/...", "/gpt_neox/layers.3/...", "/decoder/block.3/...".
_LAYER = re.compile(r"(?:^|[/._])(?:layers?|h|blocks?)[._/](\d+)(?=[/._]|$)")
_WEIGHT_OPS = {ops.BLOCK_MATMUL: "MatMul weights", ops.BLOCK_GATHER: "embedding tables"}
NON_LAYER = "outside layers"


def layer_of(name: str) -> str:
    """"layer N" for a node of the N-th transformer block, else NON_LAYER (embeddings, head)."""
    match = _LAYER.search(name)
    return f"layer {int(match.group(1))}" if match else NON_LAYER


def layer_order(layer: str) -> tuple[int, int]:
    """Sort key: embeddings and head first, then layers by number."""
    return (0, 0) if layer == NON_LAYER else (1, int(layer.split()[1]))


@dataclasses.dataclass(frozen=True)
class TensorSize:
    """One stored tensor (a quantized weight counts its codes, scales and zero points together)."""

    name: str  # the FP32 source initializer's name when quantized, else the initializer's
    node: str  # the first node reading it
    layer: str
    component: str
    output_bytes: int
    input_bytes: int | None  # the FP32 source's bytes (None when the source is unknown)


@dataclasses.dataclass(frozen=True)
class WeightError:
    """Relative quantization error ||W' - W|| / ||W|| of one quantized weight."""

    node: str
    layer: str
    op_type: str
    source: str
    bits: int
    block_size: int
    elements: int
    relative_error: float


@dataclasses.dataclass(frozen=True)
class OutputError:
    """Relative error ||y' - y|| / ||y|| of one compressed node's float output against FP32."""

    node: str
    layer: str
    op_type: str
    output: str
    relative_error: float


@dataclasses.dataclass
class ModelAnalysis:
    sizes: list[TensorSize]
    weight_errors: list[WeightError]
    output_errors: list[OutputError]
    output_error_note: str  # what the output errors were measured on, or why they were not

    def to_dict(self) -> dict[str, Any]:
        return {
            "sizes": [dataclasses.asdict(s) for s in self.sizes],
            "weight_errors": [dataclasses.asdict(e) for e in self.weight_errors],
            "output_errors": [dataclasses.asdict(e) for e in self.output_errors],
            "output_error_note": self.output_error_note,
        }


def _component(node: ir.Node, quantized: bool) -> str:
    if quantized:
        return _WEIGHT_OPS.get(node.op_type, f"{node.op_type} tables")
    if node.domain == ops.DOMAIN:
        return f"float parameters of {node.op_type}"  # biases, LayerNorm gains
    return f"left float ({node.op_type})"


def _initializer_readers(graph: ir.Graph) -> dict[str, ir.Node]:
    """Initializer name -> the first node (graph order) that reads it."""
    readers: dict[str, ir.Node] = {}
    for node in graph:
        for value in node.inputs:
            if value is not None and value.name in graph.initializers and value.name not in readers:
                readers[value.name] = node
    return readers


def _nbytes(value: ir.Value) -> int:
    tensor = value.const_value
    return int(tensor.nbytes) if tensor is not None else 0


def tensor_sizes(original: ir.Model | None, compressed: ir.Model) -> list[TensorSize]:
    """Every initializer of ``compressed``, quantized parts grouped by their FP32 source."""
    graph = compressed.graph
    readers = _initializer_readers(graph)
    originals = original.graph.initializers if original is not None else {}
    grouped: dict[str, list[ir.Value]] = {}
    for name, value in graph.initializers.items():
        key = value.metadata_props.get(SOURCE_KEY, name)
        grouped.setdefault(key, []).append(value)
    sizes = []
    for key, values in grouped.items():
        reader = next((readers[v.name] for v in values if v.name in readers), None)
        if reader is None:
            continue  # not read by any node
        node_name = reader.name or key
        source = originals.get(key)
        sizes.append(
            TensorSize(
                name=key,
                node=node_name,
                layer=layer_of(node_name),
                component=_component(reader, any(SOURCE_KEY in v.metadata_props for v in values)),
                output_bytes=sum(_nbytes(v) for v in values),
                input_bytes=_nbytes(source) if source is not None else None,
            )
        )
    return sizes


def _weight_format(node: ir.Node, scales: np.ndarray, zero_points: np.ndarray | None) -> BlockFormat:
    attrs = node.attributes
    symmetric = bool(attrs["symmetric"].as_int()) if "symmetric" in attrs else zero_points is None
    float_offsets = zero_points is not None and zero_points.dtype != np.uint8
    return BlockFormat(
        bits=attrs["bits"].as_int(),
        block_size=attrs["block_size"].as_int(),
        symmetric=symmetric,
        scale_kind=block_format.scale_kind_of(scales),
        zero_point_kind=ZeroPointKind.FLOAT if float_offsets else ZeroPointKind.INTEGER,
    )


def weight_errors(original: ir.Model, compressed: ir.Model) -> list[WeightError]:
    """Relative error of every BlockMatMul / BlockGather weight against its FP32 source.

    Needs the quantize passes' metadata on the weight initializers (present on the in-memory
    result of compress); weights without it are left out.
    """
    sources = original.graph.initializers
    errors = []
    seen: set[tuple[str, str]] = set()
    for node in compressed.graph:
        if node.domain != ops.DOMAIN or node.op_type not in _WEIGHT_OPS:
            continue
        parts = [v for v in node.inputs if v is not None and v.const_value is not None and SOURCE_KEY in v.metadata_props]
        if len(parts) < 2:
            continue
        source_name = parts[0].metadata_props[SOURCE_KEY]
        tag = parts[0].metadata_props.get(FORMAT_KEY, "")
        source = sources.get(source_name)
        if source is None or source.const_value is None or (source_name, tag) in seen:
            continue
        seen.add((source_name, tag))
        codes, scales = parts[0].const_value.numpy(), parts[1].const_value.numpy()
        if code_entropy.is_coded(node):  # entropy-coded codes: their packed layout first
            row_length = node.attributes["K" if node.op_type == ops.BLOCK_MATMUL else "axis_size"].as_int()
            codes = code_entropy.decode_packed(codes, node.attributes["bits"].as_int(), row_length)
        zero_points = node_zero_points(node, parts[2].const_value.numpy() if len(parts) > 2 else None, scales)
        fmt = _weight_format(node, scales, zero_points)
        reference = np.asarray(source.const_value.numpy(), dtype=np.float32)
        if "t" in tag.split("_"):  # stored transposed: [N, K] from a [K, N] MatMul weight
            reference = reference.T
        axis_size = reference.shape[-1]
        values = block_format.dequantize(block_format.QuantizedTensor(codes, scales, zero_points, axis_size, fmt))
        if values.shape != reference.shape:
            logger.warning("weight %s: dequantized shape %s differs from %s; not measured", source_name, values.shape, reference.shape)
            continue
        norm = float(np.linalg.norm(reference))
        error = float(np.linalg.norm(values - reference) / norm) if norm else 0.0
        name = node.name or source_name
        errors.append(WeightError(name, layer_of(name), node.op_type, source_name, fmt.bits, fmt.block_size, int(reference.size), error))
    return errors


def _expose(model: ir.Model, names: Sequence[str]) -> bytes:
    """The model serialized with ``names`` added as float graph outputs."""
    import onnx

    from bct_onnx.model_io import _tensors_in_memory

    with _tensors_in_memory(model):  # weights in external files must travel inside the bytes
        proto = ir.serde.serialize_model(model)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return proto.SerializeToString()


def output_errors(
    original: ir.Model, compressed: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], max_batches: int = 2
) -> list[OutputError]:
    """Relative error of each compressed node's float output against the FP32 model's same tensor.

    Compared where both graphs have a float tensor of the same name (the passes keep the names of
    the outputs they replace); outputs that stay compressed (codes) are not compared.
    """
    from bct_onnx import runtime

    fp32_names = {
        v.name for node in original.graph for v in node.outputs if v.name and v.dtype in (None, ir.DataType.FLOAT)
    }
    measured: list[tuple[ir.Node, str]] = []
    for node in compressed.graph:
        if node.domain != ops.DOMAIN or not node.outputs:
            continue
        out = node.outputs[0]
        if out.name in fp32_names and out.dtype in (None, ir.DataType.FLOAT):
            measured.append((node, out.name))
    if not measured:
        return []
    names = [name for _, name in measured]
    cpu = ["CPUExecutionProvider"]
    fp32 = runtime.session(_expose(original, names), providers=cpu, with_library=False)
    ours = runtime.session(_expose(compressed, names), providers=cpu)
    squared_error = np.zeros(len(names))
    squared_norm = np.zeros(len(names))
    cache_formats = read_formats(compressed.metadata_props)  # a compressed KV cache takes codes
    for batch in list(feeds)[:max_batches]:
        reference = fp32.run(names, dict(batch))
        result = ours.run(names, compress_feeds(batch, cache_formats))
        for i, (y, y_ref) in enumerate(zip(result, reference, strict=True)):
            diff = np.asarray(y, dtype=np.float64) - np.asarray(y_ref, dtype=np.float64)
            squared_error[i] += float(np.sum(diff * diff))
            squared_norm[i] += float(np.sum(np.square(np.asarray(y_ref, dtype=np.float64))))
    return [
        OutputError(
            node.name or name, layer_of(node.name or name), node.op_type, name,
            float(np.sqrt(squared_error[i] / squared_norm[i])) if squared_norm[i] else 0.0,
        )
        for i, (node, name) in enumerate(measured)
    ]


def analyze(
    original: ir.Model | None,
    compressed: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    feeds_description: str = "",
) -> ModelAnalysis:
    """Sizes, weight errors and (with feeds) output errors of ``compressed`` against ``original``."""
    sizes = tensor_sizes(original, compressed)
    weights = weight_errors(original, compressed) if original is not None else []
    if original is None:
        outputs, note = [], "not measured: the FP32 model was not given"
    elif not feeds:
        outputs, note = [], "not measured: no calibration inputs (a tokenizer next to the model, or --tokenizer DIR)"
    else:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        # onnxruntime's errors share no base class but Exception: name the ones a run can raise.
        run_errors = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph,
                      ort_errors.RuntimeException, ort_errors.NotImplemented, ValueError)
        try:
            outputs = output_errors(original, compressed, feeds)
            note = f"measured on {min(len(feeds), 2)} batch(es) of {feeds_description or 'the given inputs'}"
        except run_errors as error:  # the rest of the report is still worth writing
            logger.warning("output errors not measured: %s", error)
            outputs, note = [], f"not measured: {error}"
    return ModelAnalysis(sizes, weights, outputs, note)
