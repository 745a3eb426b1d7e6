"""bct_onnx.report: JSON fields, the human summary, atomic write."""

from __future__ import annotations

import json
from pathlib import Path

from bct_onnx.config import CompressConfig, NodeOverride, OpSettings
from bct_onnx.report import CompileReport, SkippedNode, config_to_dict, format_bytes


def _report(**changes: object) -> CompileReport:
    fields: dict[str, object] = {
        "input": "in.onnx",
        "output": "out.onnx",
        "input_bytes": 90_000_000,
        "output_bytes": 12_000_000,
        "rewritten": {"MatMul": 36, "Gather": 3},
        "skipped": [SkippedNode("attn_scores", "MatMul", "weight is computed at run time")],
        "config": config_to_dict(CompressConfig()),
        "timings": {"load": 0.2, "compress": 2.5, "save": 0.05},
    }
    fields.update(changes)
    return CompileReport(**fields)  # type: ignore[arg-type]


def test_json_fields() -> None:
    data = json.loads(_report().to_json())
    assert data["input_bytes"] == 90_000_000
    assert data["output_bytes"] == 12_000_000
    assert data["compression_ratio"] == 7.5
    assert data["rewritten"] == {"Gather": 3, "MatMul": 36}
    assert data["skipped"] == [
        {"node": "attn_scores", "op_type": "MatMul", "reason": "weight is computed at run time"}
    ]
    assert data["config"]["weight_bits"] == 4
    assert data["timings"] == {"load": 0.2, "compress": 2.5, "save": 0.05}


def test_summary_lines() -> None:
    lines = _report().summary().splitlines()
    assert lines[0] == "in.onnx -> out.onnx"
    assert lines[1] == "size: 90.0 MB -> 12.0 MB (7.50x smaller)"
    assert lines[2] == "rewritten: Gather 3, MatMul 36"
    assert lines[3] == (
        "not rewritten: 1 node (MatMul: weight is computed at run time (x1); all in the JSON report)"
    )
    assert lines[4] == "time: 2.8 s (load 200 ms, compress 2.5 s, save 50 ms)"


def test_summary_names_the_slowest_passes() -> None:
    passes = [
        {"name": "FoldShapeArithmeticPass", "modified": True, "seconds": 0.3, "rewritten": {}, "skipped": 0},
        {"name": "CollectHessians (calibration)", "modified": False, "seconds": 7.7, "rewritten": {}, "skipped": 0},
        {"name": "QuantizeMatMulPass", "modified": True, "seconds": 22.7, "rewritten": {}, "skipped": 0},
        {"name": "TopologicalSortPass", "modified": False, "seconds": 0.02, "rewritten": {}, "skipped": 0},
    ]
    lines = _report(passes=passes).summary().splitlines()
    assert lines[5] == (
        "slowest passes: QuantizeMatMulPass 22.7 s, CollectHessians (calibration) 7.7 s, "
        "FoldShapeArithmeticPass 300 ms (every pass in the JSON report)"
    )
    assert len(_report().summary().splitlines()) == 5  # no passes recorded, no line


def test_nothing_rewritten_nothing_skipped() -> None:
    lines = _report(rewritten={}, skipped=[]).summary().splitlines()
    assert lines[2] == "rewritten: nothing"
    assert lines[3] == "not rewritten: none"


def test_config_with_overrides_is_json() -> None:
    config = CompressConfig(overrides=(NodeOverride("fc*", OpSettings(weight_bits=8)),))
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["overrides"][0]["pattern"] == "fc*"
    assert data["overrides"][0]["settings"]["weight_bits"] == 8
    assert data["ops"] == sorted(config.ops)
    assert data["scale_kind"] == "float16" and data["target_ratio"] is None


def test_write_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    path = _report().write(tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text())["compression_ratio"] == 7.5
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]


def test_format_bytes() -> None:
    assert format_bytes(999) == "999 B"
    assert format_bytes(12_900_000) == "12.9 MB"
    assert format_bytes(3_200_000_000) == "3.2 GB"


def test_summary_groups_reasons_that_differ_by_a_node_name() -> None:
    skipped = [
        SkippedNode(f"n{i}", "BlockGelu", f"result stays float32: read by Add 'add_{i}'") for i in range(4)
    ]
    line = _report(skipped=skipped).summary().splitlines()[4]
    assert line == (
        "compressed, result kept float32: 4 nodes (BlockGelu: read by Add '...' (x4); all in the JSON report)"
    )


def test_summary_tells_nodes_left_float_from_rewritten_nodes_with_float_results() -> None:
    skipped = [
        SkippedNode("mm", "MatMul", "weight is computed at run time"),
        SkippedNode("ln", "BlockLayerNorm", "result stays float32: read by Add 'add'"),
    ]
    lines = _report(skipped=skipped).summary().splitlines()
    assert lines[3].startswith("not rewritten: 1 node (MatMul: weight is computed")
    assert lines[4].startswith("compressed, result kept float32: 1 node (BlockLayerNorm: read by Add")
