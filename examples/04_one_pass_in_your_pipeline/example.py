"""Use one bct-onnx pass in an onnx-ir pipeline, then edit the result with onnx-graphsurgeon."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/_common.py
import numpy as np
import onnx_ir as ir
from _common import build_mlp, run, sample_input
from bct_onnx.passes import QuantizeMatMulPass
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

import bct_onnx
from bct_onnx.config import CompressConfig


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
    x = sample_input()
    (before,) = bct_onnx.session(target).run(None, {"x": x})
    (after,) = bct_onnx.session(edited.SerializeToString()).run(None, {"x": x})
    print("graphsurgeon round trip identical:", bool(np.array_equal(before, after)))
    recompressed = bct_onnx.compress(gs.import_onnx(ir.to_proto(ir.load(out_dir / "model.onnx"))), calibration="none")
    print("compress(graphsurgeon Graph):", recompressed.report.rewritten)


if __name__ == "__main__":
    run(main)
