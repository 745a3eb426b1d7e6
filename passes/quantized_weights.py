"""Constant lookup and quantized-initializer creation shared by the quantize passes.

A quantized tensor is stored as initializers named after its source initializer and its format
(``<source>.bct_<tag>.codes`` / ``.scales`` / ``.zero_points``, the last holding uint8 zero points,
packed at the code width for ``ZeroPointKind.PACKED`` (its readers get ``zero_points_packed = 1``),
or float16/float32 offsets as the format says) and tagged in metadata_props. A
second consumer that needs the same source in the same layout and format (a tied embedding table
read by a Gather and by the output projection) finds and reuses them: the graph is the cache, so
no state lives on a pass between calls.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from bct_onnx.block_format import BlockFormat, ScaleKind, unpack_zero_points
from bct_onnx.gptq import gptq_quantize
from bct_onnx.weight_quantizer import quantize_tensor

logger = logging.getLogger(__name__)

SOURCE_KEY = "bct_onnx.source"
FORMAT_KEY = "bct_onnx.format"
FLOAT_DTYPES = (ir.DataType.FLOAT,)
# The rule the quantize passes count for each tensor stored with float32 scales against the config
# (its values would overflow the configured scale kind); the compile report names it.
RULE_WIDE_SCALES = "float32 scales (values too large for the configured scale kind)"


ZERO_POINTS_PACKED = "zero_points_packed"  # node attribute: the zero-points input is packed at the code width
SCALE_FACTOR = "scale_factor"  # node attribute: float8e4m3 scales' per-tensor factor
SCALE_FACTOR_KEY = "bct_onnx.scale_factor"  # on a float8e4m3 scales initializer: its factor (repr of a float)


def zero_point_attributes(fmt: BlockFormat) -> dict[str, int]:
    """The node attributes that describe fmt's stored zero points (none unless they are packed)."""
    return {ZERO_POINTS_PACKED: 1} if fmt.packed_zero_points else {}


def scale_attributes(scales: ir.Value) -> dict[str, float]:
    """The node attributes a reader of these scales needs: scale_factor for float8e4m3 scales."""
    factor = scales.metadata_props.get(SCALE_FACTOR_KEY)
    return {} if factor is None else {SCALE_FACTOR: float(factor)}


def node_zero_points(node: ir.Node, zero_points: np.ndarray | None, scales: np.ndarray) -> np.ndarray | None:
    """One zero point a block (the scales' shape) of a BlockMatMul / BlockGather / BlockDequantize
    node's constant zero points (unpacked when the node's zero_points_packed attribute is set)."""
    attr = node.attributes.get(ZERO_POINTS_PACKED)
    if zero_points is None or attr is None or not attr.as_int():
        return zero_points
    return unpack_zero_points(zero_points, node.attributes["bits"].as_int(), scales.shape)


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind value (initializer or Constant node), or None.

    An initializer that is also a graph input can be overridden at run time: not a constant.
    """
    if value is None or value.is_graph_input():
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


# BlockMatMul's weight inputs: W_codes, W_scales, W_zero_points, bias.
BLOCK_MATMUL_WEIGHT_INPUTS = (1, 2, 3, 4)


def weight_stacking_problem(first: ir.Node, other: ir.Node, pair: str) -> str | None:
    """Why the weight inputs of two BlockMatMuls cannot be stacked along N into one node's (one has an
    input the other lacks, one is not a constant, or they are stored differently), or None. pair names
    the two in the message."""
    for index in BLOCK_MATMUL_WEIGHT_INPUTS:
        a = first.inputs[index] if index < len(first.inputs) else None
        b = other.inputs[index] if index < len(other.inputs) else None
        if (a is None) != (b is None):
            return f"{pair} differ in which of inputs 1..4 they have (input {index})"
        if a is None or b is None:
            continue
        at, bt = constant_tensor(a), constant_tensor(b)
        if at is None or bt is None:
            return f"input {index} of {pair} is not a constant initializer"
        if at.dtype != bt.dtype or tuple(at.shape)[1:] != tuple(bt.shape)[1:]:
            return f"{pair} store input {index} differently ({at.dtype.name} {tuple(at.shape)}, {bt.dtype.name} {tuple(bt.shape)})"
    return None


def concat_initializer(graph: ir.Graph, values: list[ir.Value], suffix: str) -> ir.Value:
    """A new initializer holding the constants of values one after the other along axis 0 (the N axis
    of a BlockMatMul's weight inputs), named after the first with suffix: several MatMuls' weights as
    one's."""
    arrays = []
    for value in values:
        tensor = constant_tensor(value)
        if tensor is None:
            raise ValueError(f"'{value.name}' is not a constant initializer")
        arrays.append(np.asarray(tensor.numpy()))
    array = np.concatenate(arrays, axis=0)
    name = _unique_name(graph, f"{values[0].name}.{suffix}")
    tensor = ir.tensor(array, name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def format_tag(fmt: BlockFormat, transposed: bool) -> str:
    kind = fmt.scale_kind.value
    # f: float offsets, p: integer zero points packed at the code width
    zero_points = "s" if fmt.symmetric else ("f" if fmt.float_offsets else ("p" if fmt.packed_zero_points else "a"))
    return f"q{fmt.bits}b{fmt.block_size}{zero_points}_{kind}{'_t' if transposed else ''}"


@dataclasses.dataclass(frozen=True)
class QuantizedInitializers:
    """Initializer values of one quantized tensor [rows, D] and whether they already existed."""

    codes: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    rows: int
    axis_size: int
    reused: bool
    widened: bool = False  # scales stored as float32: the requested scale kind could not hold them


# Largest weight quantized from a transposed copy rather than a view.
_TRANSPOSE_COPY_BYTES = 64 << 20


def _unique_name(graph: ir.Graph, base: str) -> str:
    name, n = base, 1
    while name in graph.initializers:
        name = f"{base}_{n}"
        n += 1
    return name


def _register(graph: ir.Graph, name: str, array: np.ndarray, source: str, tag: str) -> ir.Value:
    name = _unique_name(graph, name)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    value.metadata_props[SOURCE_KEY] = source
    value.metadata_props[FORMAT_KEY] = tag
    graph.register_initializer(value)
    return value


def _find(graph: ir.Graph, base: str, source: str, tag: str) -> ir.Value | None:
    value = graph.initializers.get(base)
    if value is None:
        return None
    if value.metadata_props.get(SOURCE_KEY) != source or value.metadata_props.get(FORMAT_KEY) != tag:
        return None
    return value


def existing_table_format(graph: ir.Graph, source: ir.Value, fmt: BlockFormat) -> BlockFormat | None:
    """fmt with the scale kind under which source was already quantized untransposed, if any."""
    source_name = source.name or "weight"
    for kind in ScaleKind:
        candidate = dataclasses.replace(fmt, scale_kind=kind)
        tag = format_tag(candidate, transposed=False)
        if _find(graph, f"{source_name}.bct_{tag}.codes", source_name, tag) is not None:
            return candidate
    return None


def existing_table_quantization(
    graph: ir.Graph, source: ir.Value, fmt: BlockFormat, rows: int, axis_size: int
) -> QuantizedInitializers | None:
    """Initializers made earlier from source untransposed with fmt's bits, block size and symmetry.

    Any scale kind and any rounding (plain, importance-weighted, GPTQ) qualify: a tied table that the
    output projection quantized first (GPTQ-rounded for it) is then shared by the Gather.
    """
    source_name = source.name or "weight"
    for kind in ScaleKind:
        candidate = dataclasses.replace(fmt, scale_kind=kind)
        for suffix in ("_gptq", "", "_aw"):
            tag = format_tag(candidate, transposed=False) + suffix
            base = f"{source_name}.bct_{tag}"
            codes = _find(graph, f"{base}.codes", source_name, tag)
            scales = _find(graph, f"{base}.scales", source_name, tag)
            zero_points = None if fmt.symmetric else _find(graph, f"{base}.zero_points", source_name, tag)
            if codes is not None and scales is not None and (fmt.symmetric or zero_points is not None):
                return QuantizedInitializers(codes, scales, zero_points, rows, axis_size, reused=True)
    return None


def quantized_initializers(
    graph: ir.Graph,
    source: ir.Value,
    tensor: ir.TensorProtocol,
    fmt: BlockFormat,
    transposed: bool,
    scale_search: bool,
    importance: np.ndarray | None = None,
    hessian: np.ndarray | None = None,
    keep_dead_inputs: bool = False,
    damping: float = 0.01,  # bct_onnx.calibration.DEFAULT_DAMPING
    scale_factor: float | None = None,
) -> QuantizedInitializers:
    """Quantize a constant 2-D tensor (its transpose when transposed) along the last axis, once per graph.

    Reuses initializers made earlier from the same source in the same layout and format. With a
    calibration hessian ([D, D] of the consumer's inputs) the codes are chosen by GPTQ
    (keep_dead_inputs, damping: see gptq_quantize). scale_factor: float8e4m3 scales' per-tensor factor
    (None: the tensor's own, block_format.float8e4m3_scale_factor).
    """
    source_name = source.name or "weight"
    requested = fmt
    # Read once (a streamed weight is read from its file on every access) and dropped on return.
    array = np.asarray(tensor.numpy(), dtype=np.float32)
    fmt = fitting_format(array, fmt, tensor.name)
    tag = format_tag(fmt, transposed) + ("_aw" if importance is not None else "") + ("_gptq" if hessian is not None else "")
    base = f"{source_name}.bct_{tag}"
    codes = _find(graph, f"{base}.codes", source_name, tag)
    scales = _find(graph, f"{base}.scales", source_name, tag)
    zero_points = None if fmt.symmetric else _find(graph, f"{base}.zero_points", source_name, tag)
    shape = tuple(tensor.shape.numpy())
    rows, axis_size = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    if codes is not None and scales is not None and (fmt.symmetric or zero_points is not None):
        return QuantizedInitializers(codes, scales, zero_points, rows, axis_size, reused=True, widened=fmt != requested)
    if transposed:
        # A contiguous copy quantizes about 2x faster; a large weight stays a view (the quantizers copy
        # it chunk by chunk), so memory never holds it twice.
        array = np.ascontiguousarray(array.T) if array.nbytes <= _TRANSPOSE_COPY_BYTES else array.T
    if hessian is not None:
        quantized = gptq_quantize(
            array, hessian, fmt, damping=damping, scale_search=scale_search, keep_dead_inputs=keep_dead_inputs,
            scale_factor=scale_factor,
        )
    else:
        quantized = quantize_tensor(array, fmt, scale_search=scale_search, importance=importance, scale_factor=scale_factor)
    codes = _register(graph, f"{base}.codes", quantized.codes, source_name, tag)
    scales = _register(graph, f"{base}.scales", quantized.scales, source_name, tag)
    if quantized.scale_factor is not None:
        scales.metadata_props[SCALE_FACTOR_KEY] = repr(float(quantized.scale_factor))
    zp_value = None
    if quantized.zero_points is not None:
        zp_value = _register(graph, f"{base}.zero_points", quantized.stored_zero_points, source_name, tag)
    return QuantizedInitializers(codes, scales, zp_value, rows, axis_size, reused=False, widened=fmt != requested)


# Largest finite magnitude of the narrow stored kinds (float16, float8e5m2; pow2 offsets are float16).
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT8E5M2_MAX = 57344.0


def fitting_format(array: np.ndarray, fmt: BlockFormat, name: str | None = None) -> BlockFormat:
    """fmt, or fmt with float32 scales when some block's scale (or float offset) would overflow fmt's kind.

    An infinite scale turns a whole block into NaN at run time where FP32 is finite; float32 scales
    cost 2-3 more bytes a block for this one tensor only.
    """
    if fmt.scale_kind is ScaleKind.FLOAT32:
        return fmt
    if array.size == 0:
        return fmt
    amax = max(float(np.max(array)), -float(np.min(array)))  # max |x| without an |x| copy of the weight
    if not np.isfinite(amax):
        return fmt  # non-finite weights: FP32 is not finite either
    # The largest stored scale is amax / 2**(bits-1) (symmetric) or the range / qmax (asymmetric).
    largest_scale = amax / (1 << (fmt.bits - 1)) if fmt.symmetric else 2 * amax / fmt.qmax
    limits = {ScaleKind.FLOAT16: _FLOAT16_MAX, ScaleKind.FLOAT8E5M2: _FLOAT8E5M2_MAX}
    scale_limit = limits.get(fmt.scale_kind, float("inf"))
    offsets_overflow = fmt.float_offsets and amax >= _FLOAT16_MAX / 2
    # Half the limit: scale search and float8 rounding away from zero may pick up to 2x more.
    if largest_scale >= scale_limit / 2 or offsets_overflow:
        logger.warning(
            "%s: values up to %.3g need float32 block scales (%s cannot hold %.3g)",
            name, amax, fmt.scale_kind.value, largest_scale,
        )
        return dataclasses.replace(fmt, scale_kind=ScaleKind.FLOAT32)
    return fmt


def trim_trailing_none(inputs: list[ir.Value | None]) -> list[ir.Value | None]:
    """Drop missing optional inputs at the end (ONNX allows omitting them)."""
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs
