"""ConvertOpsetPass: raise the model's ONNX opset with onnx.version_converter, converting every node.

Never a bare bump of the opset number: each node of the default domain goes through the ONNX
version adapters (ReduceMean's ``axes`` attribute becomes an input at 18, and so on). Nodes of
other domains (ai.bct_onnx) are left as they are. The IR version is raised to the one the new opset
needs. Tensors are not copied into the result: every initializer keeps its original tensor object
(an external-data tensor stays a reference to its file), and none is copied for the conversion.
"""

from __future__ import annotations

import logging

import onnx
import onnx.helper
import onnx.version_converter
import onnx_ir as ir
from bct_onnx.passes.framework import UnsupportedModelError, check_model_basics, onnx_opset

logger = logging.getLogger(__name__)


class OpsetConversionError(UnsupportedModelError):
    """onnx.version_converter could not convert the model; the message names the opsets and the cause."""


def min_ir_version(opset: int) -> int:
    """The lowest IR version a model importing the default-domain ``opset`` may declare."""
    return int(onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]))


def convert_opset(model: ir.Model, target: int) -> bool:
    """Convert model in place to ONNX opset >= target; False when it already imports target or newer."""
    current = onnx_opset(model)
    if current is None:
        raise OpsetConversionError("the model imports no default ONNX opset")
    if current >= target:
        return False
    proto = _structure_only(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as error:  # the converter raises plain RuntimeError / ValidationError
        raise OpsetConversionError(
            f"onnx.version_converter could not convert the model from opset {current} to {target}: {error}"
        ) from error
    converted.ir_version = max(converted.ir_version, min_ir_version(target))
    new = ir.serde.deserialize_model(converted)
    _keep_original_tensors(model.graph, new.graph)
    model.graph = new.graph
    model.ir_version = new.ir_version
    logger.info("converted ONNX opset %d -> %d", current, target)
    return True


_PLACEHOLDER = "bct_onnx.opset_conversion.placeholder"  # never read: the converter only needs structure


def _structure_only(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose initializers refer to a placeholder file instead of holding data.

    The version adapters only read node structure, so no tensor byte is copied (models whose
    tensors exceed protobuf's 2 GB limit convert too); _keep_original_tensors puts them back.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                _PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=value.name or ""
            )
    try:
        return ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _keep_original_tensors(old: ir.Graph, new: ir.Graph) -> None:
    """Give every initializer of new (main graph and subgraphs) the tensor object it had in old."""
    originals: dict[str, ir.Value] = {}
    for graph in (old, *old.subgraphs()):
        originals.update(graph.initializers)
    for graph in (new, *new.subgraphs()):
        for name, value in graph.initializers.items():
            original = originals.get(name)
            if original is not None and original.const_value is not None:
                value.const_value = original.const_value
                value.metadata_props.update(original.metadata_props)
            elif isinstance(value.const_value, ir.ExternalTensor) and value.const_value.location == _PLACEHOLDER:
                raise OpsetConversionError(f"initializer '{name}' lost its data in the opset conversion")


class ConvertOpsetPass(ir.passes.InPlacePass):
    """Convert the model to ONNX opset ``target`` (onnx.version_converter); a newer model is left alone."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    def requires(self, model: ir.Model) -> None:
        check_model_basics(model, type(self).__name__)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, convert_opset(model, self.target))
