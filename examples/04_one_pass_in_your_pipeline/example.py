"""Use one bct-onnx pass in an onnx-ir pipeline, then edit the result with onnx-graphsurgeon."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
from bct_onnx.passes import QuantizeMatMulPass
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

import bct_onnx
from bct_onnx.config import CompressConfig

HERE = Path(__file__).resolve().parent


def build_mlp(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("example01", HERE.parent / "01_compress_and_run" / "example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_mlp(path)


def main(out_dir: Path) -> None:
    model = ir.load(build_mlp(out_dir / "model.onnx"))
    quantize = QuantizeMatMulPass(CompressConfig(weight_bits=4, act_bits=None))
    pipeline = ir.passes.PassManager([quantize, RemoveUnusedNodesPass(), TopologicalSortPass()])
    result = pipeline(model)
    print("ops after the pipeline:", [node.op_type for node in result.model.graph])
    # the pass's own report: counts per rule and a reason for every node it left alone
    check = QuantizeMatMulPass(CompressConfig())(result.model)
    print("a second run rewrites nothing:", check.rewritten, "modified:", check.modified)
    target = out_dir / "model.bct.onnx"
    ir.save(result.model, target)

    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        print("onnx-graphsurgeon not installed: pip install onnx-graphsurgeon")
        return
    graph = gs.import_onnx(ir.to_proto(result.model))
    graph.cleanup().toposort()
    edited = gs.export_onnx(graph)
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    (before,) = bct_onnx.session(target).run(None, {"x": x})
    (after,) = bct_onnx.session(edited.SerializeToString()).run(None, {"x": x})
    print("graphsurgeon round trip identical:", bool(np.array_equal(before, after)))
    recompressed = bct_onnx.compress(gs.import_onnx(ir.to_proto(ir.load(out_dir / "model.onnx"))), calibration="none")
    print("compress(graphsurgeon Graph):", recompressed.report.rewritten)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
