"""Checks of the input model before any work: one clear error instead of a traceback or a bad output.

``check_input`` runs, in order: initializer data against dtype and dims, UTF-8 names, models
already quantized or compressed (refused: compressing them again only grows or degrades them),
the ONNX checker with full shape inference (on a copy without the tensor data, so memory stays
small), and an ONNX Runtime load of the input file. Three kinds of damage that ONNX Runtime
tolerates in the input but that would break the output are repaired in place and named:
negative declared dimensions, and intermediate ``value_info`` shapes that contradict inference.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from bct_onnx import model_io, ops
from bct_onnx.errors import InvalidModelError, QuantizedModelError
from bct_onnx.external_data import StreamedTensor

logger = logging.getLogger(__name__)

# ONNX Runtime loads the input to check it only below this many bytes of tensors (it copies them).
RUNTIME_CHECK_MAX_BYTES = 1_800_000_000
# Initializers of at least this size are handed to the checker as data-less external references.
_STRIP_MIN_BYTES = 1024
_STRIPPED_FILE = "stripped.bin"

# Ops that only occur in models quantized by another tool (ONNX Runtime's quantizers, QDQ exports).
QUANTIZED_OPS = {
    "": {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
        "QLinearMatMul", "QLinearConv",
    },
    "com.microsoft": {
        "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
        "DynamicQuantizeLSTM", "QGemm", "QAttention", "QOrderedMatMul", "QEmbedLayerNormalization",
        "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearConcat",
        "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearWhere",
    },
}


def _invalid(label: str, why: str) -> InvalidModelError:
    return InvalidModelError(f"the input model is invalid: {label}: {why}")


def _nodes(model: ir.Model) -> Iterator[ir.Node]:
    for graph in model_io.graphs(model):
        yield from graph


def check_initializer_data(model: ir.Model, label: str) -> None:
    """Every initializer's data must decode to its declared dtype and dims."""
    for graph in model_io.graphs(model):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None:
                raise _invalid(label, f"initializer {name!r} has no data")
            if isinstance(tensor, StreamedTensor):
                continue  # its file, offset and length were checked at load (reading it would cost its size)
            try:
                tensor.numpy()
                _ = tensor.nbytes
            except (ValueError, TypeError, NotImplementedError, OSError) as exc:
                dims = list(tensor.shape.numpy()) if tensor.shape is not None else "?"
                raise _invalid(
                    label, f"initializer {name!r}: its data does not hold dtype {tensor.dtype} x dims {dims} ({exc})"
                ) from exc


def check_names(model: ir.Model, label: str) -> None:
    """Node and value names must be valid UTF-8 (else the model cannot be saved again)."""
    for node in _nodes(model):
        for what, text in (("node name", node.name), ("op type", node.op_type), ("domain", node.domain)):
            _utf8(text, label, f"{what} {text!r}")
        for value in (*node.inputs, *node.outputs):
            if value is not None:
                _utf8(value.name, label, f"tensor name {value.name!r} (node {node.name!r})")
    for graph in model_io.graphs(model):
        for value in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
            _utf8(value.name, label, f"tensor name {value.name!r}")


def _utf8(text: str | bytes | None, label: str, what: str) -> None:
    if isinstance(text, bytes):  # onnx-ir keeps what protobuf could not decode as bytes
        raise _invalid(label, f"{what} is not valid UTF-8")
    if text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _invalid(label, f"{what} is not valid UTF-8") from exc


def check_not_quantized(model: ir.Model, label: str) -> None:
    """Refuse a model compressed by bct-onnx or quantized by another tool, naming what was found."""
    ours: Counter[str] = Counter()
    theirs: Counter[str] = Counter()
    example = ""
    for node in _nodes(model):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain == ops.DOMAIN:
            ours[node.op_type] += 1
        elif node.op_type in QUANTIZED_OPS.get(domain, ()):
            theirs[node.op_type] += 1
            example = example or (node.name or "")
    if ours:
        raise QuantizedModelError(
            f"{label} is already compressed by bct-onnx ({_counts(ours)}); compress the original float model "
            "instead (compressing codes again only adds error)"
        )
    if theirs:
        where = f", e.g. node {example!r}" if example else ""
        raise QuantizedModelError(
            f"{label} is already quantized ({_counts(theirs)}{where}); bct-onnx compresses float models: "
            "give it the float model this one was made from"
        )


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{count} {op}" for op, count in counter.most_common(3)) + (
        f" and {len(counter) - 3} more op types" if len(counter) > 3 else ""
    )


def repair_negative_dims(model: ir.Model) -> list[str]:
    """Declared dimensions below zero (meaningless; ONNX Runtime treats them as unknown) become unknown."""
    fixed = []
    for graph in model_io.graphs(model):
        for value in (*graph.inputs, *graph.outputs):
            shape = value.shape
            if shape is None:
                continue
            dims = list(shape)
            if any(isinstance(d, int) and d < 0 for d in dims):
                value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in dims])
                fixed.append(f"{value.name} {[d if isinstance(d, int) else str(d) for d in dims]}")
    return fixed


def _intermediate_values(model: ir.Model) -> Iterator[ir.Value]:
    for node in _nodes(model):
        for value in node.outputs:
            if not value.is_graph_output():
                yield value


def _data_less(tensor: ir.TensorProtocol) -> ir.TensorProtocol | None:
    """A reference to the empty stand-in file for external or large tensors (the checker reads none)."""
    if isinstance(tensor, ir.ExternalTensor) or tensor.nbytes >= _STRIP_MIN_BYTES:
        return ir.ExternalTensor(_STRIPPED_FILE, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name or "")
    return None


def _skeleton(model: ir.Model, keep_intermediate_shapes: bool = True) -> onnx.ModelProto:
    with model_io.initializers_replaced(model, _data_less):
        proto = ir.serde.serialize_model(model)
    if not keep_intermediate_shapes:
        del proto.graph.value_info[:]
    return proto


def _run_checker(proto: onnx.ModelProto) -> None:
    """onnx.checker with full shape inference, from a folder holding the empty stand-in data file."""
    with tempfile.TemporaryDirectory(prefix="bct_onnx_check_") as tmp:
        Path(tmp, _STRIPPED_FILE).touch()
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as file:
            file.write(proto.SerializeToString())
        onnx.checker.check_model(path, full_check=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for prefix in ("[ShapeInferenceError] Inference error(s): ",):
        text = text.replace(prefix, "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def check_with_onnx(model: ir.Model, label: str, *, repair: bool = True) -> list[str]:
    """Run the ONNX checker (full); drop contradicting intermediate shapes when that alone fixes it."""
    checker_errors = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
    try:
        _run_checker(_skeleton(model))
        return []
    except checker_errors as first:
        if not repair:
            raise _invalid(label, _first_line(first)) from first
        try:
            _run_checker(_skeleton(model, keep_intermediate_shapes=False))
        except checker_errors as error:
            raise _invalid(label, _first_line(error)) from error
        except ValueError as error:  # the skeleton does not serialize: a model onnx-ir cannot write
            raise _invalid(label, _first_line(error)) from error
        dropped = 0
        for value in _intermediate_values(model):
            if value.shape is not None:
                value.shape = None
                dropped += 1
        return [f"dropped {dropped} intermediate value_info shapes that contradict shape inference ({_first_line(first)})"]
    except ValueError as error:
        raise _invalid(label, _first_line(error)) from error


def check_with_runtime(model_file: Path, label: str) -> None:
    """ONNX Runtime must load the input file (not run it): what it rejects, the output would not fix."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Opened with the weights mapped from the file, untouched (no prepacking): memory stays small.
    options.add_session_config_entry("session.disable_prepacking", "1")
    detached = model_io.model_bytes_without_weights(model_file)
    if detached is not None:
        options.add_session_config_entry(model_io.EXTERNAL_DATA_FOLDER_KEY, str(model_file.parent.absolute()))
    try:
        ort.InferenceSession(detached if detached is not None else str(model_file), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        message = _first_line(error)
        for marker in (" : FAIL : ", " : INVALID_GRAPH : ", " : INVALID_ARGUMENT : ", " : RUNTIME_EXCEPTION : "):
            message = message.split(marker, 1)[-1]
        raise _invalid(label, f"ONNX Runtime cannot load it: {message}") from error


def check_input(model: ir.Model, label: str, model_file: Path | None = None, *, repair: bool = True) -> list[str]:
    """Check (and where safe, repair) the loaded input; return the repairs made, for the report.

    model_file: the input on disk, loaded once by ONNX Runtime as a last check when the model is
    below RUNTIME_CHECK_MAX_BYTES of tensors (check_runtime_loads; None: not loaded). repair=False:
    what would need a repair is an error (the model is the caller's object and stays as it is).
    """
    check_initializer_data(model, label)
    check_names(model, label)
    check_not_quantized(model, label)
    repairs = []
    if repair:
        fixed = repair_negative_dims(model)
        repairs += [f"negative dimensions made unknown: {', '.join(fixed)}"] if fixed else []
    else:
        for graph in model_io.graphs(model):
            for value in (*graph.inputs, *graph.outputs):
                if value.shape is not None and any(isinstance(d, int) and d < 0 for d in value.shape):
                    raise _invalid(label, f"{value.name!r} declares a negative dimension: {value.shape}")
    repairs += check_with_onnx(model, label, repair=repair)
    if model_file is not None:
        check_runtime_loads(model, model_file, label)
    for text in repairs:
        logger.warning("%s: %s", label, text)
    return repairs


def check_runtime_loads(model: ir.Model, model_file: Path, label: str) -> None:
    """check_input's last check on its own: ONNX Runtime loads model_file (check_with_runtime) when the
    model is below RUNTIME_CHECK_MAX_BYTES of tensors. compress runs it once the calibration forward
    has started (half a second of SmolLM2's, beside the forward instead of before it)."""
    tensor_bytes = sum(v.const_value.nbytes for g in model_io.graphs(model) for v in g.initializers.values() if v.const_value)
    if tensor_bytes <= RUNTIME_CHECK_MAX_BYTES:
        check_with_runtime(model_file, label)
