"""Inspect a float model (what compress would do) and the compressed one (what it did)."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import bct_onnx
from bct_onnx.inspect import inspect_model

HERE = Path(__file__).resolve().parent


def build_mlp(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("example01", HERE.parent / "01_compress_and_run" / "example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_mlp(path)


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
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
