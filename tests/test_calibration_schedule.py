"""When the calibration forward runs: from the input file before canonicalization, in segments small at both ends."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from bct_onnx.models.synthetic_llama import LlamaShape, build
from bct_onnx.passes import compress_model, pipeline
from bct_onnx.passes.pipeline import canonicalize_passes, start_hessians
from onnx import TensorProto, helper, numpy_helper

from bct_onnx import api, calibration, model_io
from bct_onnx.calibration import (
    Calibration,
    HessianStore,
    collect_hessians,
    constant_weight_matmuls,
    segment_limit,
)
from bct_onnx.config import CompressConfig

TINY = LlamaShape(hidden=64, intermediate=96, layers=6, heads=4, vocab=128)
GPTQ_RULE = "MatMul weight rounded by GPTQ (calibrated)"


def _calibration(shape: LlamaShape, batches: int = 3) -> Calibration:
    rng = np.random.default_rng(0)
    return Calibration(tuple({"input_ids": rng.integers(0, shape.vocab, (1, 16))} for _ in range(batches)))


def _canonical(model):
    work = model.clone()
    for pass_ in canonicalize_passes(CompressConfig()):
        work = pass_(work).model
    return work


def test_segment_limit_grows_from_the_first_layer_and_shrinks_towards_the_last():
    mb = 1 << 20
    smallest = calibration.SMALLEST_SEGMENT_BYTES
    assert segment_limit(0, 400 * mb, 64 * mb) == smallest  # the first segment: about one layer
    assert segment_limit(20 * mb, 400 * mb, 64 * mb) == 20 * mb  # no more than has run before it
    assert segment_limit(200 * mb, 400 * mb, 64 * mb) == 64 * mb  # the middle: the largest
    assert segment_limit(300 * mb, 60 * mb, 64 * mb) == 30 * mb  # at most half of what is left
    assert segment_limit(390 * mb, 10 * mb, 64 * mb) == smallest
    assert segment_limit(200 * mb, 400 * mb, 0) == 0  # segment_bytes bounds every segment


def test_segments_are_small_at_both_ends_of_the_forward(tmp_path, monkeypatch):
    shape = LlamaShape(hidden=64, intermediate=96, layers=16, heads=4, vocab=128)
    path = build(tmp_path / "model.onnx", shape)
    layer = shape.layer_bytes()
    monkeypatch.setattr(calibration, "SMALLEST_SEGMENT_BYTES", layer + 1)
    graph = onnx.load(path, load_external_data=False).graph
    wanted = {activation for activation, _ in constant_weight_matmuls(model_io.load(path))}
    segments = calibration._segments(graph, 3 * layer, wanted)
    sizes = {tensor.name: calibration._tensor_bytes(tensor) for tensor in graph.initializer}
    matmul_bytes = [
        sum(sizes[name] for i in segment if graph.node[i].op_type == "MatMul" for name in graph.node[i].input if name in sizes)
        for segment in segments
    ]
    layers = [round(size / layer, 1) for size in matmul_bytes if size]
    assert max(layers) > 2  # the middle segments hold several layers
    assert layers[0] <= 1 and layers[-1] <= 1, layers  # the first and the last about one
    assert layers.index(max(layers)) not in (0, len(layers) - 1)
    every_matmul = sum(sizes[name] for node in graph.node if node.op_type == "MatMul" for name in node.input if name in sizes)
    # Each MatMul in one segment, but the output projection (no Hessian needs its output).
    assert sum(matmul_bytes) == every_matmul - 4 * shape.vocab * shape.hidden


@pytest.mark.parametrize("inline", [False, True], ids=["external-data", "inline-weights"])
def test_hessians_of_the_input_file_equal_those_of_its_canonical_form(tmp_path, monkeypatch, inline):
    """Measured on the input file as loaded (its weights mapped from there, nothing saved), the Hessians are
    the canonical model's, keyed by the canonical MatMuls once retargeted."""
    path = build(tmp_path / "model.onnx", TINY)
    if inline:  # one file holding its weights, as optimum writes models under 2 GB
        path = tmp_path / "single" / "model.onnx"
        path.parent.mkdir()
        onnx.save(onnx.load(tmp_path / "model.onnx"), path)
    model = model_io.load(path)
    calib = _calibration(TINY)
    canonical = _canonical(model)
    want = collect_hessians(canonical, calib)
    saved = []
    monkeypatch.setattr(calibration.ir, "save", lambda *args, **kwargs: saved.append(args))
    folders = []
    session = calibration.runtime.session

    def recording_session(data, providers, options, **kwargs):
        folders.append(options.get_session_config_entry(model_io.EXTERNAL_DATA_FOLDER_KEY))
        return session(data, providers, options, **kwargs)

    monkeypatch.setattr(calibration.runtime, "session", recording_session)
    got = collect_hessians(model, calib, model_file=path, background=True)
    try:
        assert got.retarget(constant_weight_matmuls(canonical)) is None
        assert sorted(got) == sorted(want) and len(want) == 7 * TINY.layers + 1
        for key in want:
            expected = want[key]
            np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    finally:
        got.close()
        want.close()
    assert not saved  # the input file itself ran
    assert folders and set(folders) == {str(path.parent.absolute())}


def test_retarget_refuses_activations_it_did_not_measure():
    store = HessianStore({("x", "w1"): 4, ("x", "w2"): 4, ("h", "w3"): 8})
    try:
        store.add("x", np.eye(4, dtype=np.float32))
        assert store.retarget({("x", "w1_folded"): 4, ("h", "w3"): 8}) is None
        np.testing.assert_array_equal(store[("x", "w1_folded")], np.eye(4))
        assert store.get(("x", "w1")) is None  # the old keys are gone
        assert store.retarget({("y", "w1"): 4}) == "activation 'y' was not measured"
        assert store.retarget({("x", "w1"): 6}) == "activation 'x' was measured with K=4, not 6"
        np.testing.assert_array_equal(store[("x", "w1_folded")], np.eye(4))  # unchanged by a refusal
    finally:
        store.close()


def test_compress_starts_the_forward_on_the_input_file_before_canonicalizing(tmp_path, monkeypatch):
    path = build(tmp_path / "model.onnx", TINY)
    calls = []
    collect = pipeline.collect_hessians

    def recording_collect(model, calib, *args, **kwargs):
        calls.append(kwargs.get("model_file"))
        return collect(model, calib, *args, **kwargs)

    monkeypatch.setattr(pipeline, "collect_hessians", recording_collect)
    result = api.compress(path, tmp_path / "out.onnx", calibration=_calibration(TINY), ops=frozenset({"MatMul"}))
    assert calls == [path]  # once, on the input file, never again on the canonical model
    assert result.report.rules[GPTQ_RULE] == 7 * TINY.layers + 1


def _gemm_model(path, rng):
    """x [8, 16] -> Gemm(transA=1) with x^T as its A: canonicalization gives the MatMul a new activation."""
    w1 = rng.standard_normal((8, 12)).astype(np.float32)
    w2 = rng.standard_normal((12, 6)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], transA=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 6])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_hessians_are_measured_again_when_canonicalization_gives_a_matmul_a_new_input(tmp_path, caplog):
    rng = np.random.default_rng(3)
    path = _gemm_model(tmp_path / "gemm.onnx", rng)
    model = model_io.load(path)
    calib = Calibration(tuple({"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(2)))
    config = CompressConfig(ops=frozenset({"MatMul"}), weight_bits=4, block_size=8)
    early = start_hessians(model, config, calib, path)
    assert early is not None
    with caplog.at_level(logging.INFO, logger=pipeline.__name__):
        result = compress_model(model, config, calibration=calib, hessians=early)
    assert "measured again" in caplog.text and "was not measured" in caplog.text
    assert result.rewritten[GPTQ_RULE] == 2  # both MatMuls rounded with Hessians of the canonical model
    assert early._cancelled  # the early store was closed


@pytest.mark.parametrize(
    ("config", "calib"),
    [
        (CompressConfig(rotation=True), True),  # the rotation changes the values the Hessians are of
        (CompressConfig(ops=frozenset({"Gather"})), True),  # no MatMul to round
        (CompressConfig(), False),  # no calibration
    ],
    ids=["rotation", "no-matmul", "no-calibration"],
)
def test_no_early_forward_where_its_hessians_would_not_serve(tmp_path, config, calib):
    path = build(tmp_path / "model.onnx", TINY)
    assert start_hessians(model_io.load(path), config, _calibration(TINY) if calib else None, path) is None


def test_background_collection_plans_its_segments_on_the_calling_thread(tmp_path, monkeypatch):
    """The plan is Python work: on the collection's thread it would contend with the caller's for the GIL
    and delay the first session; the collection's thread only runs sessions and sums."""
    import threading

    path = build(tmp_path / "model.onnx", TINY)
    planned_on = []
    plan = calibration._plan_segments

    def recording_plan(*args, **kwargs):
        planned_on.append(threading.current_thread())
        return plan(*args, **kwargs)

    monkeypatch.setattr(calibration, "_plan_segments", recording_plan)
    store = collect_hessians(model_io.load(path), _calibration(TINY), model_file=path, background=True)
    try:
        assert planned_on == [threading.current_thread()]
        assert len(store) == 7 * TINY.layers + 1
    finally:
        store.close()


def test_segment_sessions_share_one_arena_handed_back_after_the_last_run(tmp_path, monkeypatch):
    """Every calibration session allocates from ONNX Runtime's shared arena (no arena of its own to fault
    in again per segment), and only the collection's very last run asks the arena to shrink."""
    path = build(tmp_path / "model.onnx", TINY)
    shared, shrinks = [], []
    session = calibration.runtime.session

    class RecordingSession:
        def __init__(self, inner):
            self.inner = inner

        def run(self, outputs, feeds, run_options=None):
            entry = run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") if run_options else None
            shrinks.append(entry)
            return self.inner.run(outputs, feeds, run_options)

    def recording_session(data, providers, options, **kwargs):
        shared.append(options.get_session_config_entry("session.use_env_allocators"))
        return RecordingSession(session(data, providers, options, **kwargs))

    monkeypatch.setattr(calibration.runtime, "session", recording_session)
    calib = _calibration(TINY)
    store = collect_hessians(model_io.load(path), calib, model_file=path, segment_bytes=2 * TINY.layer_bytes())
    try:
        assert len(shared) > 2 and set(shared) == {"1"}
        assert shrinks[-1] == "cpu:0" and set(shrinks[:-1]) == {None}
        assert len(shrinks) == len(calib.feeds) * len(shared)  # every segment ran every batch
    finally:
        store.close()


def test_compress_collects_garbage_rarely_and_restores_the_thresholds(tmp_path, monkeypatch):
    """The model's graph lives through the whole call: compress raises the youngest generation's
    threshold while it runs (fewer full collections walking it) and puts the thresholds back after."""
    import gc

    path = build(tmp_path / "model.onnx", TINY)
    before = gc.get_threshold()
    seen = []
    run_pipeline = api._run_pipeline

    def recording(*args, **kwargs):
        seen.append(gc.get_threshold())
        return run_pipeline(*args, **kwargs)

    monkeypatch.setattr(api, "_run_pipeline", recording)
    api.compress(path, tmp_path / "out.onnx", calibration="none", ops=frozenset({"MatMul"}))
    assert seen == [(api.GC_THRESHOLD, *before[1:])]
    assert gc.get_threshold() == before
    gc.disable()
    try:
        with api._rare_garbage_collection():
            assert gc.get_threshold() == before  # switched off or rare already: left alone
    finally:
        gc.enable()


def test_background_forward_leaves_a_core_to_gptq(tmp_path, monkeypatch):
    """In the background (GPTQ rounds on the calling thread meanwhile) the calibration sessions run on
    one core fewer than the machine has (at least one); measured on its own, ONNX Runtime's default."""
    path = build(tmp_path / "model.onnx", TINY)
    model = model_io.load(path)
    threads = []
    session = calibration.runtime.session

    def recording_session(data, providers, options, *args, **kwargs):
        threads.append(options.intra_op_num_threads)
        return session(data, providers, options, *args, **kwargs)

    monkeypatch.setattr(calibration.runtime, "session", recording_session)
    monkeypatch.setattr(calibration.os, "cpu_count", lambda: 4)
    store = calibration.collect_hessians(model, _calibration(TINY), background=True)
    store.wait()
    store.close()
    assert threads and set(threads) == {3}
    threads.clear()
    monkeypatch.setattr(calibration.os, "cpu_count", lambda: 1)
    store = calibration.collect_hessians(model, _calibration(TINY), background=True)
    store.wait()
    store.close()
    assert threads and set(threads) == {1}
    threads.clear()
    calibration.collect_hessians(model, _calibration(TINY)).close()
    assert threads and set(threads) == {0}  # 0: ONNX Runtime's default


def test_scalar_tensors_find_initializers_then_constant_nodes(tmp_path):
    """The planning's scalar lookup (_ScalarTensors, indexed once) finds what a scan of the graph finds:
    an initializer first, else the first Constant node with that one output and a tensor value; not a
    tensor of several elements, nor a Constant given by another attribute."""
    constant = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([-np.inf], np.float32)))
    shadowed = helper.make_node("Constant", [], ["z"], value=numpy_helper.from_array(np.array(5.0, np.float32)))
    other = helper.make_node("Constant", [], ["f"], value_float=1.0)
    graph = helper.make_graph(
        [constant, shadowed, other], "g", [], [],
        [numpy_helper.from_array(np.array(0.0, np.float32), "z"), numpy_helper.from_array(np.ones(2, np.float32), "v")],
    )
    scalars = calibration._ScalarTensors(graph, str(tmp_path))
    assert scalars.value("z") == 0.0  # the initializer, not the Constant node of the same name
    assert scalars.value("c") == -np.inf
    assert scalars.value("v") is None and scalars.value("f") is None and scalars.value("missing") is None
