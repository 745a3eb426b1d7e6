"""The budget allocator (bct_onnx.budget): convex hulls, greedy allocation, units of a graph, plans."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import bct_onnx
from bct_onnx.budget import (
    BudgetError,
    BudgetPlanner,
    Candidate,
    _lower_hull,
    allocate,
    find_units,
    format_bytes,
    measurement_batches,
    synthetic_feeds,
    unit_format,
)
from bct_onnx.config import CompressConfig


def _ladder(rows: int) -> list[Candidate]:
    """bits 2..8 at one block size: bytes grow by `rows` per bit, error falls 4x per bit."""
    return [Candidate(bits, 32, rows * bits, 4.0 ** (-bits)) for bits in range(2, 9)]


def test_lower_hull_drops_dominated_and_non_convex_points():
    a = Candidate(2, 32, 100, 1.0)
    b = Candidate(3, 32, 200, 0.5)
    dominated = Candidate(3, 64, 250, 0.6)  # more bytes than b, more error
    above = Candidate(4, 64, 300, 0.45)  # saves little for its bytes: above the segment b -> d
    d = Candidate(4, 32, 400, 0.1)
    assert _lower_hull([d, above, dominated, b, a]) == [a, b, d]


def test_allocate_respects_the_budget_and_favours_sensitive_units():
    candidates = {"calm": _ladder(1000), "fragile": _ladder(1000)}
    sensitivities = {"calm": 1.0, "fragile": 50.0}
    chosen = allocate(candidates, sensitivities, budget_bytes=9000)
    assert sum(c.nbytes for c in chosen.values()) <= 9000
    assert chosen["fragile"].bits > chosen["calm"].bits
    # A budget for every unit at 8 bits gives every unit 8 bits.
    assert {c.bits for c in allocate(candidates, sensitivities, budget_bytes=16000).values()} == {8}


def test_allocate_matches_exhaustive_search_on_hull_budgets():
    """At budgets the greedy path lands on exactly, no plan within the budget has less error."""
    rng = np.random.default_rng(0)
    candidates = {f"u{i}": _ladder(int(rng.integers(50, 500))) for i in range(3)}
    sensitivities = {name: float(rng.uniform(0.1, 10.0)) for name in candidates}
    smallest = sum(options[0].nbytes for options in candidates.values())
    for budget in (int(smallest * f) for f in (1.2, 1.7, 2.5, 3.5)):
        chosen = allocate(candidates, sensitivities, budget_bytes=budget)
        used = sum(c.nbytes for c in chosen.values())
        greedy_error = sum(sensitivities[n] * c.relative_error for n, c in chosen.items())
        best = min(
            sum(sensitivities[n] * c.relative_error for n, c in zip(candidates, combo))
            for combo in itertools.product(*candidates.values())
            if sum(c.nbytes for c in combo) <= used
        )
        assert greedy_error <= best * (1 + 1e-9)


def test_allocate_max_error_stops_at_the_bound():
    candidates = {"a": _ladder(100), "b": _ladder(300)}
    sensitivities = {"a": 2.0, "b": 1.0}
    chosen = allocate(candidates, sensitivities, max_error=1e-3)
    error = sum(sensitivities[n] * c.relative_error for n, c in chosen.items())
    assert error <= 1e-3
    # One bit fewer on either unit breaks the bound or was never needed: the plan is not wasteful.
    for name in chosen:
        cheaper = [c for c in candidates[name] if c.bits == chosen[name].bits - 1]
        if cheaper:
            other = sum(sensitivities[n] * c.relative_error for n, c in chosen.items() if n != name)
            assert other + sensitivities[name] * cheaper[0].relative_error > 1e-3 * 0.25


def test_allocate_rejects_impossible_goals():
    with pytest.raises(BudgetError, match="below their smallest size"):
        allocate({"a": _ladder(100)}, {"a": 1.0}, budget_bytes=10)
    with pytest.raises(BudgetError, match="target bytes or a maximum error"):
        allocate({"a": _ladder(100)}, {"a": 1.0})
    with pytest.raises(ValueError, match="target_ratio must be a number > 1"):
        CompressConfig(target_ratio=0.5)
    with pytest.raises(ValueError, match="max_error must be a number > 0"):
        CompressConfig(max_error=-1.0)


def _tiny_model(seed: int = 0) -> onnx.ModelProto:
    """input_ids -> Gather(table [V, D]) -> MatMul(w1 [D, H]) -> Relu -> MatMul(w2 [H, D]) -> MatMul(table^T).

    The table is tied: the embedding Gather and the output projection (through a Transpose) read it.
    """
    rng = np.random.default_rng(seed)
    vocab, d, h = 256, 128, 256
    table = rng.standard_normal((vocab, d)).astype(np.float32)
    w1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "w1"], ["hidden"], name="up"),
        helper.make_node("Relu", ["hidden"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "w2"], ["back"], name="down"),
        helper.make_node("Add", ["back", "emb"], ["resid"], name="residual"),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tie"),
        helper.make_node("MatMul", ["resid", "table_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [numpy_helper.from_array(a, n) for a, n in ((table, "table"), (w1, "w1"), (w2, "w2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_find_units_counts_a_tied_table_once_with_both_readers():
    model = ir.serde.deserialize_model(_tiny_model())
    units = {u.source: u for u in find_units(model, CompressConfig())}
    assert set(units) == {"table", "w1", "w2"}
    assert units["table"].consumers == (("Gather", "embed"), ("MatMul", "lm_head"))
    assert not units["table"].transposed and (units["table"].rows, units["table"].axis_size) == (256, 128)
    assert units["w1"].transposed and (units["w1"].rows, units["w1"].axis_size) == (256, 128)
    fmt = unit_format(units["w1"], CompressConfig(), 4, 32)
    assert format_bytes(units["w1"], fmt) == 256 * (64 + 4 * 2)  # 128 codes of 4 bits + 4 float16 scales


def test_sensitivities_are_measured_on_a_bounded_number_of_calibration_tokens():
    def batch(rows, seq, real):
        mask = np.zeros((rows, seq), np.int64)
        mask[:, :real] = 1
        ids = np.arange(rows * seq).reshape(rows, seq)
        return {"input_ids": ids, "attention_mask": mask, "past": np.zeros((rows, 2, 0, 4), np.float32)}

    # Padded batches (an encoder's): whole batches while their real tokens fit, at most two.
    padded = [batch(8, 80, 40), batch(8, 50, 20), batch(8, 50, 20)]
    picked = measurement_batches(padded, 512)
    assert [b["input_ids"].shape for b in picked] == [(8, 80), (8, 50)]
    assert measurement_batches(padded, 400)[0] is not padded[0]
    assert [b["input_ids"].shape for b in measurement_batches(padded, 400)] == [(8, 80)]
    # A decoder's packed batch of 8 x 128 tokens: its first 4 rows, every input cut alike.
    (packed,) = measurement_batches([batch(8, 128, 128)] * 2, 512)
    assert packed["input_ids"].shape == (4, 128) and packed["past"].shape == (4, 2, 0, 4)
    np.testing.assert_array_equal(packed["input_ids"], np.arange(512).reshape(4, 128))
    # Never empty: one row even when a single row holds more than the budget.
    (one,) = measurement_batches([{"input_ids": np.zeros((3, 700), np.int64)}], 512)
    assert one["input_ids"].shape == (1, 700)


def test_synthetic_feeds_fill_text_inputs_and_name_the_rest():
    model = ir.serde.deserialize_model(_tiny_model())
    (feeds,) = synthetic_feeds(model, batch=2, sequence=5)
    assert feeds["input_ids"].shape == (2, 5) and feeds["input_ids"].max() < 256
    proto = _tiny_model()
    proto.graph.input.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", 7]))
    (feeds,) = synthetic_feeds(ir.serde.deserialize_model(proto), batch=2, sequence=5)
    assert feeds["noise"].shape == (2, 7) and feeds["noise"].dtype == np.float32
    proto.graph.input.append(helper.make_tensor_value_info("bucket_index", TensorProto.INT64, [1, 3]))
    with pytest.raises(BudgetError, match="bucket_index"):
        synthetic_feeds(ir.serde.deserialize_model(proto))


def test_planner_measures_the_sensitive_weight_and_plans_within_budget():
    model = ir.serde.deserialize_model(_tiny_model())
    config = CompressConfig(ops=frozenset({"MatMul", "Gather"}), act_bits=None)
    input_bytes = 4 * 3 * 256 * 128 + 2000
    planner = BudgetPlanner(model, config, input_bytes)
    assert set(planner.sensitivities) == {"table", "w1", "w2"}
    _, plan = planner.plan(planner.budget_bytes(6.0), None)
    assert plan.planned_bytes <= input_bytes / 6.0
    measured = planner.measure(plan)
    assert measured.measured_error is not None
    # Errors of separate weights add to first order: prediction and measurement agree within 2x.
    assert 0.5 < measured.measured_error / plan.predicted_error < 2.0


def test_compress_with_target_ratio_writes_the_planned_bits(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_model(), path)
    out = tmp_path / "out.onnx"
    _, report = bct_onnx.compress(
        path, out, ops=frozenset({"MatMul", "Gather"}), act_bits=None, target_ratio=5.0, calibration="none"
    )
    assert report.config["target_ratio"] == 5.0
    assert report.compression_ratio >= 5.0
    assert report.budget is not None and report.budget["inputs"] == "synthetic"
    planned = {unit["source"]: unit for unit in report.budget["units"]}
    written = onnx.load(out)
    by_name = {node.name: node for node in written.graph.node}
    for source, node_names in (("table", ("embed", "lm_head")), ("w1", ("up",)), ("w2", ("down",))):
        for name in node_names:
            attrs = {a.name: helper.get_attribute_value(a) for a in by_name[name].attribute}
            assert attrs["bits"] == planned[source]["bits"], (name, attrs, planned[source])
            assert attrs["block_size"] == planned[source]["block_size"]
    assert "budget:" in report.summary()


def test_explicit_bits_switch_a_budget_off_and_user_overrides_pin_their_tensors():
    from bct_onnx.api import make_config
    from bct_onnx.config import NodeOverride, OpSettings

    budgeted = CompressConfig(target_ratio=8.0, budget_floor=True)
    assert not make_config(budgeted, weight_bits=8).budgeted
    assert make_config(budgeted, weight_bits=8, target_ratio=6.0).target_ratio == 6.0
    assert make_config(budgeted, block_size=64).budgeted
    pinned = CompressConfig(
        target_ratio=4.0, overrides=(NodeOverride("down", OpSettings(weight_bits=8), op="MatMul"),)
    )
    model = ir.serde.deserialize_model(_tiny_model())
    units = {u.source: u for u in find_units(model, pinned)}
    assert units["w2"].pinned == (8, 32) and units["w1"].pinned is None
    planned, plan = BudgetPlanner(model, pinned, 4 * 3 * 256 * 128).plan(None, 1e-2)
    assert next(c for c in plan.choices if c.source == "w2").bits == 8
    assert planned.settings_for("MatMul", "down").weight_bits == 8


def test_budget_floor_keeps_a_plan_no_worse_than_the_fixed_widths():
    model = ir.serde.deserialize_model(_tiny_model())
    config = CompressConfig(ops=frozenset({"MatMul", "Gather"}), act_bits=None, weight_bits=4, target_ratio=8.5)
    planner = BudgetPlanner(model, config, 4 * 3 * 256 * 128)
    ceiling = planner.fixed_width_error()
    _, aggressive = planner.plan(planner.budget_bytes(8.5), None)
    assert aggressive.predicted_error > ceiling and not aggressive.floored  # 8.5x costs more than 4-bit
    _, floored = planner.plan(planner.budget_bytes(8.5), None, floor=True)
    assert floored.floored and floored.predicted_error <= ceiling
    _, easy = planner.plan(planner.budget_bytes(4.0), None, floor=True)
    assert not easy.floored  # a roomy budget beats the fixed widths by itself
    from bct_onnx.api import make_config

    assert not make_config(CompressConfig(), target_ratio=6.0).budget_floor  # explicit ratio: honoured


def test_fake_quantize_of_float8e4m3_is_the_weight_quantizer():
    """The budget measures what the passes store: one float8e4m3 factor for the whole tensor."""
    from bct_onnx.block_format import BlockFormat, dequantize
    from bct_onnx.budget import fake_quantize
    from bct_onnx.weight_quantizer import quantize_tensor

    values = (np.random.default_rng(3).standard_normal((70, 96)) * np.geomspace(1e-3, 10, 70)[:, None]).astype(np.float32)
    fmt = BlockFormat(4, 32, True, "float8e4m3")
    for search in (True, False):
        np.testing.assert_array_equal(fake_quantize(values, fmt, search), dequantize(quantize_tensor(values, fmt, search)))
