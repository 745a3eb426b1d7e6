"""Inspect a float model (what compress would do) and the compressed one (what it did)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/_common.py
import json

from _common import build_mlp, run

import bct_onnx
from bct_onnx.inspect import inspect_model


def main(out_dir: Path) -> None:
    source = build_mlp(out_dir / "model.onnx")
    print(inspect_model(source).summary())
    print()
    target = out_dir / "model.bct.onnx"
    bct_onnx.compress(source, target, ops=["MatMul"], weight_bits=4, calibration="none")
    inspection = inspect_model(target)
    print(inspection.summary(per_node=True))
    data = json.loads(inspection.to_json())
    print(f"json: {len(data['nodes'])} nodes, components {sorted(data['totals_by_component'])}")


if __name__ == "__main__":
    run(main)
