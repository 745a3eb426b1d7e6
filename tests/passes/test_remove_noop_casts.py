"""RemoveNoOpCastsPass: Casts to their input's own dtype go; real conversions and graph outputs stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from bct_onnx.passes import RemoveNoOpCastsPass
from onnx import TensorProto, helper

from bct_onnx.runtime import session


def _model() -> ir.Model:
    nodes = [
        helper.make_node("Cast", ["x"], ["x_same"], to=TensorProto.FLOAT, name="noop"),
        helper.make_node("Relu", ["x_same"], ["r"], name="relu"),
        helper.make_node("Cast", ["ids"], ["ids_float"], to=TensorProto.FLOAT, name="convert"),
        helper.make_node("Add", ["r", "ids_float"], ["y"], name="add"),
        helper.make_node("Cast", ["y"], ["out"], to=TensorProto.FLOAT, name="into_output"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_only_the_cast_to_its_own_dtype_goes(tmp_path) -> None:
    model = _model()
    result = RemoveNoOpCastsPass()(model)
    assert result.modified
    assert [n.name for n in model.graph] == ["relu", "convert", "add", "into_output"]
    assert sum(result.rewritten.values()) == 1
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    x = np.array([[-1, 2, 3], [4, -5, 6]], np.float32)
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    (out,) = session(str(path), with_library=False).run(None, {"x": x, "ids": ids})
    np.testing.assert_array_equal(out, np.maximum(x, 0) + ids.astype(np.float32))


def test_nothing_to_drop_is_not_a_change() -> None:
    model = _model()
    RemoveNoOpCastsPass()(model)
    assert not RemoveNoOpCastsPass()(model).modified
