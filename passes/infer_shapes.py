"""annotate_shapes: inferred shapes for the matchers, kept out of the model.

The activation rules need ranks and last dimensions that exporters often leave out. Writing ONNX
shape inference's results into the model is harmful: ONNX Runtime trusts value_info when it plans
buffers, and symbolic dims that the inference unified wrongly make sessions fail ("Shape mismatch
attempting to re-use buffer", e.g. on the tiny Pythia and BART exports). So the inferred shape of a value
that has none is put in ``value.meta`` (onnx-ir's in-memory metadata, never serialized) under
SHAPE_KEY, and ``graph_patterns.value_shape`` reads it; the model itself is unchanged.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

logger = logging.getLogger(__name__)

SHAPE_KEY = "bct_onnx.inferred_shape"
TYPE_KEY = "bct_onnx.inferred_dtype"
_DONE_KEY = "bct_onnx.shapes_annotated"


def ensure_shapes(model: ir.Model) -> None:
    """annotate_shapes once per model object (passes used on their own call it; the pipeline first)."""
    if not model.meta.get(_DONE_KEY):
        annotate_shapes(model)


def annotate_shapes(model: ir.Model) -> int:
    """Infer shapes on a clone and record them in value.meta of model's shapeless values; returns how many."""
    model.meta[_DONE_KEY] = True
    clone = model.clone()  # tensors are shared, not copied
    try:
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    except Exception as error:  # noqa: BLE001 (inference is advisory; rules then skip with reasons)
        logger.warning("shape inference failed (%s); nonlinear rules see only declared shapes", error)
        return 0
    inferred: dict[str, ir.Shape] = {}
    dtypes: dict[str, ir.DataType] = {}
    for graph in clone.graphs():
        for node in graph:
            for value in node.outputs:
                if value.name and value.shape is not None:
                    inferred.setdefault(value.name, value.shape)
                if value.name and value.dtype is not None:
                    dtypes.setdefault(value.name, value.dtype)
    count = 0
    for graph in model.graphs():
        for node in graph:
            for value in node.outputs:
                if value.shape is None and value.name in inferred:
                    value.meta[SHAPE_KEY] = inferred[value.name]
                    count += 1
                if value.dtype is None and value.name in dtypes:
                    value.meta[TYPE_KEY] = dtypes[value.name]
    return count
