"""compress_model: the whole pass list on small models, reports, debug mode, preconditions."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from bct_onnx.passes import (
    DEBUG_DIR_ENV,
    DomainVersionError,
    OpsetTooOldError,
    PipelineResult,
    build_passes,
    compress_model,
)
from bct_onnx.passes import pipeline as pipeline_module
from bct_onnx.passes.pipeline import OMITTED_WEIGHTS_FILE
from support import model_from_text, op_types, run_bct_session, run_ort, run_reference

from bct_onnx.config import CompressConfig
from bct_onnx.ops import DOMAIN

RNG = np.random.default_rng(5)
V, D, HIDDEN = 100, 64, 96

# A GPT-2-like decoder as torch.onnx exports it: Gemm layers on a flattened activation, and an output
# projection that reads the embedding table through Transpose (tied weights).
TIED = f"""<ir_version: 8, opset_import: ["" : 17]>
g (int64[1, S] ids) => (float[1, S, {V}] logits) {{
  h = Gather(wte, ids)
  flat = Reshape(h, flat_shape)
  fc = Gemm(flat, fc_w, fc_b)
  act = Relu(fc)
  proj = Gemm <transB = 1> (act, proj_wt, proj_b)
  h2 = Reshape(proj, back_shape)
  lm_w = Transpose <perm = [1, 0]> (wte)
  logits = MatMul(h2, lm_w)
}}"""


def tied_model() -> ir.Model:
    inits = {
        "wte": RNG.standard_normal((V, D)).astype(np.float32),
        "flat_shape": np.array([-1, D], np.int64),
        "back_shape": np.array([1, -1, D], np.int64),
        "fc_w": RNG.standard_normal((D, HIDDEN)).astype(np.float32) * 0.1,
        "fc_b": RNG.standard_normal(HIDDEN).astype(np.float32),
        "proj_wt": RNG.standard_normal((D, HIDDEN)).astype(np.float32) * 0.1,
        "proj_b": RNG.standard_normal(D).astype(np.float32),
    }
    return model_from_text(TIED, inits)


def test_tied_decoder_end_to_end():
    model = tied_model()
    ids = np.array([[1, 7, 99, 0, 42]], np.int64)
    (expected,) = run_ort(model, {"ids": ids})
    result = compress_model(model, CompressConfig(act_bits=None))
    assert isinstance(result, PipelineResult) and result.modified
    assert op_types(result.model) == [
        "BlockGather",
        "Reshape",
        "BlockMatMul",
        "Relu",
        "BlockMatMul",
        "Reshape",
        "BlockMatMul",
    ]
    assert result.rewritten == {
        "Gemm": 2,
        "Gather": 1,
        "MatMul": 3,
        "MatMul+Add(bias)": 2,
        "MatMul(Transpose(weight))": 1,
        "shared quantized table": 1,  # the lm_head quantizes the table first, the Gather reuses it
    }
    assert result.skipped == []
    graph = result.model.graph
    gather, lm_head = graph.node(0), graph.node(6)
    assert lm_head.inputs[1] is gather.inputs[1] and lm_head.inputs[2] is gather.inputs[2]  # one table
    # No float copy of any weight survives: only codes, scales, biases and the two shape constants.
    floats = [v.name for v in graph.initializers.values() if v.dtype == ir.DataType.FLOAT]
    assert sorted(floats) == ["fc_b", "proj_b"]
    assert result.model.opset_imports == {"": 17, DOMAIN: 1}
    (actual,) = run_reference(result.model, {"ids": ids})
    assert np.abs(actual - expected).max() / np.abs(expected).max() < 0.2
    (session_out,) = run_bct_session(result.model, {"ids": ids})
    np.testing.assert_allclose(session_out, actual, rtol=1e-4, atol=1e-4)


def test_untied_formats_quantize_the_table_once_per_layout():
    result = compress_model(tied_model(), CompressConfig(embedding_bits=8))
    graph = result.model.graph
    gather, lm_head = graph.node(0), graph.node(6)
    assert gather.attributes["bits"].value == 8 and lm_head.attributes["bits"].value == 4
    assert gather.inputs[1] is not lm_head.inputs[1]
    assert "shared quantized weight" not in result.rewritten


def test_input_model_and_file_untouched_and_second_run_is_a_no_op(tmp_path):
    path = tmp_path / "model.onnx"
    ir.save(tied_model(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = ir.load(path)
    before = ir.to_proto(model).SerializeToString()
    first = compress_model(model, CompressConfig())
    assert ir.to_proto(model).SerializeToString() == before
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    second = compress_model(first.model, CompressConfig())
    assert not second.modified
    assert [record.name for record in second.passes if record.modified] == []
    assert second.rewritten == {} and second.skipped == []


def test_external_data_model(tmp_path):
    path = tmp_path / "big.onnx"
    ir.save(tied_model(), path, external_data="big.onnx.data")
    data_digest = hashlib.sha256((tmp_path / "big.onnx.data").read_bytes()).hexdigest()
    model = ir.load(path)
    assert isinstance(model.graph.initializers["wte"].const_value, ir.ExternalTensor)
    result = compress_model(model, CompressConfig())
    assert result.rewritten["MatMul"] == 3 and result.rewritten["Gather"] == 1
    out = tmp_path / "out.onnx"
    ir.save(result.model, out)
    onnx.checker.check_model(str(out))
    assert hashlib.sha256((tmp_path / "big.onnx.data").read_bytes()).hexdigest() == data_digest


def test_only_configured_ops_are_quantized():
    result = compress_model(tied_model(), CompressConfig(ops=frozenset({"Gather"})))
    assert op_types(result.model).count("BlockGather") == 1
    assert "BlockMatMul" not in op_types(result.model)


def test_skips_are_summed_with_reasons():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8] q, float[2, 8] k) => (float[2, 2] s) {
      kt = Transpose(k)
      s = MatMul(q, kt)
    }"""
    result = compress_model(model_from_text(text), CompressConfig())
    assert not result.modified
    assert [(s.op_type, s.reason.split(":")[0]) for s in result.skipped] == [
        ("MatMul", "weight (input B) is computed at run time (produced by Transpose)")
    ]
    assert "skipped: 1" in result.summary()
    assert DOMAIN not in result.model.opset_imports


def test_debug_dir_saves_changed_passes(tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_DIR_ENV, str(tmp_path))
    result = compress_model(tied_model(), CompressConfig())
    saved = sorted(p.name for p in tmp_path.iterdir())
    changed = [f"{i:02d}_{r.name}.onnx" for i, r in enumerate(result.passes, start=1) if r.modified]
    assert saved == sorted(changed)
    assert "06_QuantizeGatherPass.onnx" in saved
    # Graphs only by default: large tensors point at a file that is never written.
    proto = onnx.load(str(tmp_path / "05_QuantizeMatMulPass.onnx"), load_external_data=False)
    omitted = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert omitted == {OMITTED_WEIGHTS_FILE}
    assert not (tmp_path / OMITTED_WEIGHTS_FILE).exists()


def test_debug_weights_keeps_every_tensor(tmp_path):
    compress_model(tied_model(), CompressConfig(), debug_dir=tmp_path, debug_weights=True)
    for snapshot in sorted(tmp_path.glob("*.onnx")):
        onnx.checker.check_model(str(snapshot), full_check=True)


def test_default_pipeline_folds_per_layer_shape_reads(helpers):
    # Two Reshapes whose targets read the static dims of x through Shape -> Gather -> Unsqueeze ->
    # Concat chains, as exporters write them per layer: both become one constant target.
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 8] x) => (float[2, 3, 2, 4] y0, float[2, 3, 2, 4] y1) {
      sx0 = Shape(x)
      b0 = Gather<axis = 0>(sx0, zero)
      b10 = Unsqueeze(b0, axes)
      t0 = Concat<axis = 0>(b10, tail)
      y0 = Reshape(x, t0)
      sx1 = Shape(x)
      b1 = Gather<axis = 0>(sx1, zero)
      b11 = Unsqueeze(b1, axes)
      t1 = Concat<axis = 0>(b11, tail)
      x1 = Neg(x)
      y1 = Reshape(x1, t1)
    }"""
    initializers = {
        "zero": np.array(0, np.int64),
        "axes": np.array([0], np.int64),
        "tail": np.array([3, 2, 4], np.int64),
    }
    model = helpers.model_from_text(text, initializers)
    feeds = {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32)}
    expected = helpers.run_ort(model, feeds)
    result = compress_model(model, CompressConfig())
    assert helpers.op_types(result.model) == ["Reshape", "Neg", "Reshape"]
    assert result.rewritten["static dim read folded"] == 2
    for want, have in zip(expected, helpers.run_ort(result.model, feeds)):
        np.testing.assert_array_equal(have, want)


def test_debug_dir_saves_input_of_failing_pass(tmp_path, monkeypatch):
    class BrokenPass(ir.passes.InPlacePass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            model.graph.remove(model.graph.node(0))  # half-done work must not leak into the snapshot
            raise RuntimeError("boom")

    monkeypatch.setitem(pipeline_module.QUANTIZE_PASSES, "Gather", lambda config: BrokenPass())
    with pytest.raises(RuntimeError, match="boom"):
        compress_model(tied_model(), CompressConfig(), debug_dir=tmp_path)
    failed_input = tmp_path / "06_BrokenPass.input.onnx"
    assert failed_input.is_file()
    ops = [node.op_type for node in onnx.load(str(failed_input)).graph.node]
    assert ops[0] == "Gather" and "Gemm" not in ops and "BlockMatMul" in ops and "MatMul" not in ops


def test_opset_too_old_is_refused_not_bumped():
    text = """<ir_version: 5, opset_import: ["" : 9]>
    g (float[2, 8] a) => (float[2, 4] y) { y = MatMul(a, w) }"""
    model = model_from_text(text, {"w": np.ones((8, 4), np.float32)})
    with pytest.raises(OpsetTooOldError, match="opset 9; this pass needs >= 11"):
        compress_model(model, CompressConfig())
    assert model.opset_imports[""] == 9


def test_conflicting_domain_version_is_refused():
    model = tied_model()
    model.opset_imports[DOMAIN] = 7
    first = next(iter(model.graph))
    model.graph.insert_before(first, ir.node("BlockQuantize", [first.inputs[0]], domain=DOMAIN, num_outputs=2))
    with pytest.raises(DomainVersionError, match="ai.bct_onnx version 7"):
        compress_model(model, CompressConfig())


def test_an_unused_import_of_the_domain_is_replaced():
    # ONNX Runtime's transformer optimizer, in a process that registered the library, imports every
    # custom domain it knows at version 1000, with no node in it.
    model = tied_model()
    model.opset_imports[DOMAIN] = 1000
    result = compress_model(model, CompressConfig())
    assert result.model.opset_imports[DOMAIN] == 1


def test_progress_callback():
    calls = []
    compress_model(tied_model(), CompressConfig(), progress=lambda *args: calls.append(args))
    assert [c[1:] for c in calls] == [(i, len(calls)) for i in range(1, len(calls) + 1)]
    assert calls[-1][0] == "CheckModelPass"


def test_input_that_already_fails_the_checker_is_reported_not_blamed():
    # torch.onnx's dynamo exporter, asked for opset 17, writes Split with num_outputs (an opset-18
    # attribute); the checker rejects that model before and after our passes.
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8] a) => (float[2, 4] y, float[2, 4] z) {
      h = MatMul(a, w)
      y, z = Split <axis = 1, num_outputs = 2> (h)
    }"""
    model = model_from_text(text, {"w": np.ones((8, 8), np.float32)}, check=False)
    result = compress_model(model, CompressConfig())
    assert op_types(result.model) == ["BlockMatMul", "Split"]
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("the input model already fails the ONNX checker")
    assert "num_outputs" in result.warnings[0]


def test_checker_failure_caused_by_a_pass_is_raised(monkeypatch):
    class BreakingPass(ir.passes.InPlacePass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            node = next(node for node in model.graph if node.op_type == "Relu")
            node.attributes["bogus"] = ir.AttrInt64("bogus", 1)
            return ir.passes.PassResult(model, True)

    monkeypatch.setitem(pipeline_module.QUANTIZE_PASSES, "MatMul", lambda config: BreakingPass())
    with pytest.raises(onnx.checker.ValidationError, match="bogus"):
        compress_model(tied_model(), CompressConfig())


def test_if_branches_reading_outer_weights_are_compressed_and_share_codes():
    # optimum's merged decoders: an If whose two branches read the same outer-scope weights.
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (bool cond, float[2, 16] a) => (float[2, 8] y) {
      y = If (cond) <
        then_branch = t () => (float[2, 8] y_then) { y_then = MatMul(a, w) },
        else_branch = e () => (float[2, 8] y_else) {
          w_alias = Identity(w)
          mm = MatMul(a, w_alias)
          y_else = Add(mm, b)
        }
      >
    }"""
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    b = RNG.standard_normal(8).astype(np.float32)
    model = model_from_text(text, {"w": w, "b": b})
    a = RNG.standard_normal((2, 16)).astype(np.float32)
    result = compress_model(model, CompressConfig(act_bits=None))
    assert result.rewritten == {
        "fold Identity": 1,
        "MatMul": 2,
        "MatMul+Add(bias)": 1,
        "shared quantized weight": 1,
    }
    assert result.skipped == []
    if_node = result.model.graph.node(0)
    then_graph, else_graph = if_node.attributes["then_branch"].value, if_node.attributes["else_branch"].value
    assert [n.op_type for n in then_graph] == ["BlockMatMul"]
    assert [n.op_type for n in else_graph] == ["BlockMatMul"]
    assert then_graph.node(0).inputs[1] is else_graph.node(0).inputs[1]
    assert "w" not in result.model.graph.initializers  # the float weight is gone
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "a": a}
        (expected,) = run_ort(model_from_text(text, {"w": w, "b": b}), feeds)
        (actual,) = run_reference(result.model, feeds)
        assert np.abs(actual - expected).max() / np.abs(expected).max() < 0.2


def test_debug_snapshots_of_an_external_data_model_carry_their_own_data(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    ir.save(tied_model(), source / "m.onnx", external_data="m.onnx.data")
    debug = tmp_path / "debug"
    compress_model(ir.load(source / "m.onnx"), CompressConfig(), debug_dir=debug, debug_weights=True)
    snapshots = sorted(debug.glob("*.onnx"))
    assert snapshots
    for snapshot in snapshots:
        onnx.checker.check_model(str(snapshot))  # resolves external data next to the snapshot
        proto = onnx.load(str(snapshot), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations <= {f"{snapshot.name}.data"}


DEFAULT_ORDER = [
    "LiftConstantsToInitializersPass",
    "FoldConstantWeightsPass",
    "GemmToMatMulPass",
    "FoldShapeArithmeticPass",
    "QuantizeMatMulPass",
    "QuantizeGatherPass",
    "QuantizeFusedOpsPass",
    "FuseAttentionPass",
    "QuantizeActMatMulPass",
    "FuseGeluPass",
    "QuantizeGeluPass",
    "FuseSiluPass",
    "QuantizeSiluPass",
    "QuantizeSoftmaxPass",
    "FuseLayerNormPass",
    "FuseRMSNormPass",
    "QuantizeLayerNormPass",
    "FuseMatMulEpiloguePass",
    "CompressIntermediatesPass",
    "FuseAddNormPass",
    "CompressKVCachePass",
    "FuseAttentionStepPass",
    "PackSharedInputMatMulsPass",
    "RemoveBroadcastExpandsPass",
    "RemoveNoOpCastsPass",
    "RemoveUnusedNodesPass",
    "RemoveUnusedOpsetsPass",
    "TopologicalSortPass",
    "CheckModelPass",
]


def test_pass_order_is_pinned():
    """The order QUANTIZE_PASSES' comment states; a change here is a change of behaviour: say why there."""
    assert [type(p).__name__ for p in build_passes(CompressConfig())] == DEFAULT_ORDER
    weights_only = [
        type(p).__name__ for p in build_passes(CompressConfig(ops=frozenset({"MatMul", "Gather"})))
    ]
    assert weights_only == [
        name for name in DEFAULT_ORDER if name not in DEFAULT_ORDER[7:20] and name not in ("FuseAttentionStepPass", "PackSharedInputMatMulsPass")
    ]
    float_cache = [type(p).__name__ for p in build_passes(CompressConfig(kv_cache_bits=None))]
    assert float_cache == [name for name in DEFAULT_ORDER if name != "CompressKVCachePass"]
    qdq = [type(p).__name__ for p in build_passes(CompressConfig(format="qdq"))]
    assert "CompressKVCachePass" not in qdq


def test_docs_list_the_passes_in_the_order_they_run():
    text = (Path(__file__).resolve().parents[2] / "docs" / "passes.md").read_text(encoding="utf-8")
    table = text.split("## Pipeline", 1)[1].split("\n\n", 2)[1]  # the paragraph after the intro
    rows = [row.split("|") for row in table.splitlines()]
    # Rows whose step names a format ("format qdq") or an option off by default ("option rotation")
    # list passes the default pipeline does not run.
    default_rows = [cells for cells in rows if not cells[1].strip().startswith(("format", "option"))]
    listed = [name for cells in default_rows for name in re.findall(r"`(\w+Pass)`", cells[2])]
    assert listed == DEFAULT_ORDER


def nested_if_model() -> ir.Model:
    """A graph with an If whose then-branch holds another If: subgraphs two deep."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (bool cond, float[2, 16] a) => (float[2, 8] y, float[2, 16] z) {
      z = Relu(a)
      y = If (cond) <
        then_branch = t () => (float[2, 8] y_then) {
          inner = If (cond) <
            then_branch = t2 () => (float[2, 8] y2) { y2 = MatMul(a, w) },
            else_branch = e2 () => (float[2, 8] y3) { t3 = Neg(a)  y3 = MatMul(t3, w) }
          >
          y_then = Identity(inner)
        },
        else_branch = e () => (float[2, 8] y_else) { y_else = MatMul(a, w) }
      >
    }"""
    return model_from_text(text, {"w": RNG.standard_normal((16, 8)).astype(np.float32)})


def test_all_nodes_is_the_recursive_iteration():
    """framework.all_nodes (the passes' fast walk) gives the nodes of ir.traversal.RecursiveGraphIterator,
    in its order: each node, then the nodes of its subgraphs (nested If branches included)."""
    from bct_onnx.passes.framework import all_nodes, iter_nodes

    model = nested_if_model()
    expected = list(ir.traversal.RecursiveGraphIterator(model.graph))
    got = all_nodes(model.graph)
    assert list(iter_nodes(model.graph)) == got
    assert [node.op_type for node in got] == ["Relu", "If", "If", "MatMul", "Neg", "MatMul", "Identity", "MatMul"]
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))


def test_model_graphs_is_onnx_irs_order():
    """model_io.graphs (the input checks' fast walk) gives model.graphs(): the main graph, then each
    subgraph once as RecursiveGraphIterator enters it (nested branches included)."""
    from bct_onnx import model_io

    model = nested_if_model()
    expected = list(model.graphs())
    got = model_io.graphs(model)
    assert [graph.name for graph in got] == ["g", "t", "t2", "e2", "e"]
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))
