"""RemoveBroadcastExpandsPass: an Expand whose readers broadcast anyway goes, with the same output bits;
an Expand read any other way stays (expand_paths gives the reason), and is no skip of the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from bct_onnx.passes import RemoveBroadcastExpandsPass
from bct_onnx.passes.remove_broadcast_expands import expand_paths
from onnx import TensorProto, helper

from bct_onnx.ops import DOMAIN
from bct_onnx.runtime import session

B, S, H, DH = 2, 5, 2, 32


def _model(nodes, inputs, outputs, initializers=(), value_info=()) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info)
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    return ir.from_proto(helper.make_model(graph, opset_imports=opsets, ir_version=9))


def _run(model: ir.Model, path: Path, feeds: dict[str, np.ndarray], with_library: bool) -> list[np.ndarray]:
    ir.save(model, path)
    return session(str(path), with_library=with_library).run(None, feeds)


def _bits_equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(
        x.shape == y.shape and np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(a, b)
    )


def _attention_with_expanded_mask() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """BERT's mask chain: Unsqueeze -> Expand to [B, 1, S, S] -> Cast -> (1 - m) -> Where(bool, lowest,
    .) -> BlockAttention's mask."""
    lowest = float(np.finfo(np.float32).min)
    nodes = [
        helper.make_node("Unsqueeze", ["attention_mask", "axes"], ["m4"], name="unsqueeze"),
        helper.make_node("Expand", ["m4", "target"], ["expanded"], name="expand"),
        helper.make_node("Cast", ["expanded"], ["m_float"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Sub", ["one", "m_float"], ["inverted"], name="sub"),
        helper.make_node("Cast", ["inverted"], ["is_masked"], to=TensorProto.BOOL, name="to_bool"),
        helper.make_node("Where", ["is_masked", "lowest", "inverted"], ["additive"], name="where"),
        helper.make_node(
            "BlockAttention", ["q", "k", "", "", "v", "", "", "additive"], ["y"], domain=DOMAIN, name="attention",
            act_bits=8, block_size=32, scale=DH**-0.5, q_heads=H,
        ),
    ]  # fmt: skip
    initializers = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("target", TensorProto.INT64, [4], [B, 1, S, S]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("lowest", TensorProto.FLOAT, [], [lowest]),
    ]
    inputs = [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, H * DH]) for n in ("q", "k", "v")]
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, S, H * DH)).astype(np.float32) for n in ("q", "k", "v")}
    feeds["attention_mask"] = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    return model, feeds


def test_the_attention_mask_is_not_expanded_and_gives_the_same_bits(tmp_path: Path) -> None:
    model, feeds = _attention_with_expanded_mask()
    before = _run(model, tmp_path / "before.onnx", feeds, with_library=True)
    result = RemoveBroadcastExpandsPass()(model)
    assert result.modified and sum(result.rewritten.values()) == 1
    assert "Expand" not in [n.op_type for n in model.graph]
    after = _run(model, tmp_path / "after.onnx", feeds, with_library=True)
    assert _bits_equal(before, after)
    assert not RemoveBroadcastExpandsPass()(model).modified


def test_an_expand_to_the_shape_of_the_other_operand_goes(tmp_path: Path) -> None:
    """sentence-transformers' normalization: x / Expand(norm, Shape(x))."""
    nodes = [
        helper.make_node("ReduceL2", ["x"], ["norm"], axes=[1], keepdims=1, name="l2"),
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Expand", ["norm", "x_shape"], ["norm_wide"], name="expand"),
        helper.make_node("Div", ["x", "norm_wide"], ["y"], name="div"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
    )
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)}
    before = _run(model, tmp_path / "before.onnx", feeds, with_library=False)
    assert RemoveBroadcastExpandsPass()(model).modified
    assert [n.op_type for n in model.graph] == ["ReduceL2", "Shape", "Div"]
    assert _bits_equal(before, _run(model, tmp_path / "after.onnx", feeds, with_library=False))


def _expand_then(reader: list[onnx.NodeProto], outputs: list[str], other_shape: list[int]) -> ir.Model:
    nodes = [helper.make_node("Expand", ["m", "target"], ["expanded"], name="expand"), *reader]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("m", TensorProto.FLOAT, [B, 1, 1, S]),
            helper.make_tensor_value_info("other", TensorProto.FLOAT, other_shape),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [
            helper.make_tensor("target", TensorProto.INT64, [4], [B, 1, S, S]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [-3.0]),
        ],
    )


@pytest.mark.parametrize(
    ("reader", "outputs", "other_shape", "reason"),
    [
        (
            [helper.make_node("ReduceSum", ["expanded"], ["y"], keepdims=1, name="sum")],
            ["y"],
            [1],
            "read by ReduceSum 'sum', which does not broadcast",
        ),
        ([helper.make_node("Relu", ["expanded"], ["r"], name="relu")], ["r"], [1], "'r' is a graph output"),
        (  # the other operand is smaller than the expanded shape: the result would shrink
            [helper.make_node("Add", ["other", "expanded"], ["y"], name="add")],
            ["y"],
            [1, 1, S, S],
            "read by Add 'add', whose result shape may depend on it",
        ),
    ],
    ids=["reduce", "graph_output", "smaller_other"],
)
def test_an_expand_read_otherwise_stays_with_the_reason(
    reader: list[onnx.NodeProto], outputs: list[str], other_shape: list[int], reason: str
) -> None:
    model = _expand_then(reader, outputs, other_shape)
    result = RemoveBroadcastExpandsPass()(model)
    assert not result.modified and not result.skipped  # nothing left uncompressed: no skip in the report
    expand = next(n for n in model.graph if n.op_type == "Expand")
    assert expand_paths(expand) == ([], reason)


def test_an_add_whose_other_operand_has_the_full_shape_ends_the_path(tmp_path: Path) -> None:
    """Known equal shapes: the Add's result keeps the other operand's [B, H, S, S]."""
    model = _expand_then(
        [
            helper.make_node("Mul", ["expanded", "scale"], ["scaled"], name="mul"),
            helper.make_node("Add", ["other", "scaled"], ["y"], name="add"),
        ],
        ["y"],
        [B, H, S, S],
    )
    model.graph.outputs[0].shape = ir.Shape([B, H, S, S])
    rng = np.random.default_rng(2)
    feeds = {"m": rng.standard_normal((B, 1, 1, S)).astype(np.float32)}
    feeds["other"] = rng.standard_normal((B, H, S, S)).astype(np.float32)
    before = _run(model, tmp_path / "before.onnx", feeds, with_library=False)
    assert RemoveBroadcastExpandsPass()(model).modified
    after = _run(model, tmp_path / "after.onnx", feeds, with_library=False)
    assert after[0].shape == (B, H, S, S) and _bits_equal(before, after)
