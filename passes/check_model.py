"""CheckModelPass: the onnx checker, also on models whose small initializers live in external files.

onnx_ir's CheckerPass drops initializers above 1 KB before serializing, but serializes smaller
external-data tensors as references that the checker, given bytes and no directory, cannot
resolve ("... should be stored in X.data, but it is not regular file"). This pass loads those
small tensors into memory for the duration of the check and restores them afterwards.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass

_SMALL_TENSOR_BYTES = 1000  # CheckerPass keeps initializers up to this size in the proto


class CheckModelPass(CheckerPass):
    """onnx.checker on the model (custom domains unchecked); never modifies the model."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= _SMALL_TENSOR_BYTES:
                swapped.append((value, tensor))
                value.const_value = ir.tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
        try:
            return super().call(model)
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
