"""GPTQ rounding (bct_onnx.gptq) and its calibration path through the pipeline."""

from __future__ import annotations

import os

import numpy as np
import pytest
from bct_onnx.passes import compress_model
from support import model_from_text, op_types, run_bct_session, run_ort, run_reference

from bct_onnx import gptq
from bct_onnx.block_format import (
    BlockFormat,
    ScaleKind,
    choose_scales,
    codes_for,
    dequantize,
    dequantize_codes,
    pad_to_blocks,
    unpack_codes,
)
from bct_onnx.calibration import (
    PACKED_BATCH_TOKENS,
    TEXT_DAMPING,
    Calibration,
    CalibrationError,
    collect_hessians,
    text_feeds,
)
from bct_onnx.config import CompressConfig
from bct_onnx.gptq import gptq_quantize, inverse_hessian_factor
from bct_onnx.weight_quantizer import quantize_tensor, search_scales


def _correlated_inputs(rng: np.random.Generator, rows: int, k: int, seed: int = 7) -> np.ndarray:
    """Rows of one distribution (fixed by seed) with correlated channels of very different size,
    as real layers have; rng draws the rows."""
    shape_rng = np.random.default_rng(seed)
    mix = shape_rng.standard_normal((k, k)) / np.sqrt(k)
    channel_scale = shape_rng.uniform(0.2, 4.0, k)
    return ((rng.standard_normal((rows, k)) @ mix) * channel_scale).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_kind", [ScaleKind.FLOAT16, ScaleKind.POW2, ScaleKind.FLOAT8E4M3])
def test_gptq_lowers_output_error_and_stays_in_format(symmetric, scale_kind):
    rng = np.random.default_rng(0)
    k, n = 200, 48  # K not a multiple of the block size: a partial last block
    x = _correlated_inputs(rng, 1024, k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    fmt = BlockFormat(4, 32, symmetric, scale_kind)
    gptq = gptq_quantize(w, x.T.astype(np.float64) @ x, fmt)
    plain = quantize_tensor(w, fmt)
    assert gptq.codes.shape == plain.codes.shape and gptq.scales.shape == plain.scales.shape
    assert gptq.scales.dtype == fmt.scale_dtype
    assert (gptq.zero_points is None) == symmetric
    assert unpack_codes(gptq.codes, 4, k).max() <= 15
    assert gptq.scale_factor == plain.scale_factor  # float8e4m3: the factor of the uncorrected weight
    err_gptq = np.linalg.norm(x @ (dequantize(gptq) - w).T)
    err_plain = np.linalg.norm(x @ (dequantize(plain) - w).T)
    assert err_gptq < 0.9 * err_plain, (err_gptq, err_plain)


def _reference_gptq(w, hessian, fmt, damping=0.01, scale_search=True, act_order=False, weighted_scales=False):
    """The textbook per-column GPTQ loop: after each column, update every later column at once.

    act_order: columns in order of decreasing Hessian diagonal, every block's scale chosen from the
    weights before the loop ("static groups"); otherwise a block's scale is chosen from the
    corrected weights at its first column, its search weighing channel k's squared error by
    1 / u_kk^2 (scaled to mean 1) with weighted_scales. Unpacked codes [N, K], stored scales and
    zero points [N, nb]: what the lazy-batch implementation must match.
    """
    w = w.astype(np.float64).copy()
    n, k = w.shape
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(k)
    # The walk is under test here, with the factor it uses (tested on its own below).
    u, dead = inverse_hessian_factor(hessian[np.ix_(order, order)], damping)
    w[:, order[dead]] = 0.0
    bs = fmt.block_size
    codes = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, fmt.num_blocks(k)), fmt.scale_dtype)
    zero_points = None if fmt.zero_point_dtype is None else np.zeros(scales.shape, fmt.zero_point_dtype)

    weights = 1.0 / np.diag(u) ** 2
    weights = (weights / weights.mean()).astype(np.float32)

    def choose(b):
        block = pad_to_blocks(w[:, b * bs : (b + 1) * bs].astype(np.float32), fmt)
        importance = None
        if weighted_scales:
            importance = np.zeros(block.shape[-1], np.float32)
            part = weights[b * bs : (b + 1) * bs]
            importance[: len(part)] = part
        s, zp = search_scales(block, fmt, importance=importance) if scale_search else choose_scales(block, fmt)
        scales[:, b] = s[:, 0]
        if zero_points is not None:
            zero_points[:, b] = zp[:, 0]

    if act_order:
        for b in range(scales.shape[1]):
            choose(b)
    for step, j in enumerate(order):
        b = j // bs
        if not act_order and j % bs == 0:
            choose(b)
        zp = None if zero_points is None else zero_points[:, b : b + 1]
        code = codes_for(w[:, j, None, None].astype(np.float32), scales[:, b : b + 1], zp, fmt)[:, 0, 0]
        codes[:, j] = code
        value = dequantize_codes(code[:, None], scales[:, b : b + 1], zp, fmt)[:, 0]
        err = (w[:, j] - value) / u[step, step]
        w[:, order[step:]] -= np.outer(err, u[step, step:])
    return codes, scales, zero_points


@pytest.mark.parametrize(
    "fmt",
    [
        BlockFormat(4, 32),
        BlockFormat(3, 16, False),
        BlockFormat(8, 64, True, ScaleKind.POW2),
        BlockFormat(4, 32, False, ScaleKind.FLOAT16, "float"),
        BlockFormat(2, 32, True, ScaleKind.FLOAT8E5M2),
        BlockFormat(5, 48, True, ScaleKind.FLOAT32),
    ],
    ids=lambda fmt: f"{fmt.bits}b{fmt.block_size}-{'sym' if fmt.symmetric else 'asym'}-{fmt.scale_kind.value}",
)
@pytest.mark.parametrize("scale_search", [True, False])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("weighted_scales", [True, False], ids=["weighted", "plain"])
def test_lazy_batch_gptq_gives_the_codes_of_the_per_column_loop(fmt, scale_search, act_order, weighted_scales):
    """Lazy batches reorder the updates, not the algorithm: same codes and scales as the textbook loop
    (K = 300 spans three lazy batches and ends in a partial block; one input channel is dead).
    Weighted scale search applies to the in-order walk only (act-order fixes scales beforehand)."""
    rng = np.random.default_rng(11)
    k, n = 300, 24
    x = _correlated_inputs(rng, 512, k)
    x[:, 7] = 0.0
    w = (rng.standard_normal((n, k)) * 0.05 + (0.02 if fmt.float_offsets else 0.0)).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    got = gptq_quantize(w, hessian, fmt, scale_search=scale_search, act_order=act_order, weighted_scales=weighted_scales)
    want_codes, want_scales, want_zero_points = _reference_gptq(
        w, hessian, fmt, scale_search=scale_search, act_order=act_order,
        weighted_scales=weighted_scales and not act_order,
    )
    np.testing.assert_array_equal(unpack_codes(got.codes, fmt.bits, k), want_codes)
    np.testing.assert_array_equal(got.scales.view(np.uint8), want_scales.view(np.uint8))
    if want_zero_points is None:
        assert got.zero_points is None
    else:
        assert got.zero_points is not None
        np.testing.assert_array_equal(got.zero_points.view(np.uint8), want_zero_points.view(np.uint8))


def test_act_order_lowers_the_output_error_further_in_the_same_format():
    """Channels of very different activity (as real layers have): taking the most active first
    leaves the least active to absorb the error; the blocks and their layout do not change."""
    rng = np.random.default_rng(6)
    k, n = 192, 64
    x = _correlated_inputs(rng, 1024, k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    fmt = BlockFormat(4, 32)
    in_order = gptq_quantize(w, hessian, fmt)
    act_order = gptq_quantize(w, hessian, fmt, act_order=True)
    plain = quantize_tensor(w, fmt)
    assert act_order.codes.shape == in_order.codes.shape and act_order.scales.shape == in_order.scales.shape
    errors = [np.linalg.norm(x @ (dequantize(q) - w).T) for q in (plain, in_order, act_order)]
    assert errors[2] < errors[1] < 0.9 * errors[0], errors


def test_weighted_scale_search_lowers_the_output_error_on_held_out_rows():
    """Weighing a block's scale search by each channel's GPTQ loss, 1 / [H^-1]_kk, fits the scales to
    the channels that move the output: less output error on rows of the same distribution that
    the Hessian never saw, in the same format. Channel sizes spread over two orders of magnitude, as
    a decoder's are (a few outlier channels of the residual stream)."""
    rng = np.random.default_rng(8)
    k, n = 256, 64
    sizes = np.exp(np.random.default_rng(9).normal(0.0, 1.2, k)).astype(np.float32)
    x = _correlated_inputs(rng, 1024, k) * sizes
    held_out = _correlated_inputs(rng, 2048, k) * sizes
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    fmt = BlockFormat(4, 32, True, ScaleKind.FLOAT8E5M2)
    plain = gptq_quantize(w, hessian, fmt, weighted_scales=False)
    weighted = gptq_quantize(w, hessian, fmt)  # the default
    assert weighted.scales.shape == plain.scales.shape and not np.array_equal(weighted.scales, plain.scales)
    errors = [np.linalg.norm(held_out @ (dequantize(q) - w).T) for q in (plain, weighted)]
    assert errors[1] < 0.97 * errors[0], errors


def _rows_case(seed: int, k: int = 96, n: int = 23) -> tuple[np.ndarray, np.ndarray, BlockFormat]:
    """A weight [n, k], the Hessian of correlated inputs and an asymmetric 4-bit format."""
    rng = np.random.default_rng(seed)
    x = _correlated_inputs(rng, 256, k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return w, x.T.astype(np.float64) @ x, BlockFormat(4, 32, False)


def test_gptq_in_row_chunks_gives_the_same_result(monkeypatch):
    """Rows are walked in chunks to bound memory; 5-row chunks of 23 rows change nothing."""
    w, hessian, fmt = _rows_case(12)
    k = w.shape[1]
    for act_order in (False, True):
        whole = gptq_quantize(w, hessian, fmt, act_order=act_order)
        with monkeypatch.context() as patch:
            patch.setattr(gptq, "_CHUNK_BYTES", 8 * k * 5)
            chunked = gptq_quantize(w, hessian, fmt, act_order=act_order)
        np.testing.assert_array_equal(chunked.codes, whole.codes)
        np.testing.assert_array_equal(chunked.scales, whole.scales)
        np.testing.assert_array_equal(chunked.zero_points, whole.zero_points)


def test_gptq_on_threads_gives_the_codes_of_one_thread(monkeypatch):
    """Chunks of rows walked on several threads at once (sharing one inverse-Hessian factor) give the
    codes, scales and zero points of one thread."""
    import threading

    w, hessian, fmt = _rows_case(13)
    monkeypatch.setattr(gptq, "GPTQ_THREADS", 1)
    one = gptq_quantize(w, hessian, fmt)
    together = threading.Barrier(3, timeout=30)  # broken unless the 3 chunks are walked at the same time
    walk = gptq._gptq_walk

    def walk_together(*args):
        together.wait()
        walk(*args)

    monkeypatch.setattr(gptq, "_gptq_walk", walk_together)
    monkeypatch.setattr(gptq, "GPTQ_THREADS", 3)
    monkeypatch.setattr(gptq, "_MIN_THREAD_ROWS", 4)  # 3 chunks of 8, 8 and 7 rows
    threaded = gptq_quantize(w, hessian, fmt)
    np.testing.assert_array_equal(threaded.codes, one.codes)
    np.testing.assert_array_equal(threaded.scales, one.scales)
    np.testing.assert_array_equal(threaded.zero_points, one.zero_points)



def test_gptq_walks_on_one_thread_while_hessians_are_collected(monkeypatch):
    """While a background Hessian collection keeps the cores busy, GPTQ walks a weight in one chunk on
    one thread (same codes); the collection marks the cores busy for its whole run, and only then."""
    w, hessian, fmt = _rows_case(14)
    monkeypatch.setattr(gptq, "GPTQ_THREADS", 3)
    monkeypatch.setattr(gptq, "_MIN_THREAD_ROWS", 4)
    walked_rows = []
    walk = gptq._gptq_walk

    def recording_walk(w_t, *args):
        walked_rows.append(w_t.shape[1])
        walk(w_t, *args)

    monkeypatch.setattr(gptq, "_gptq_walk", recording_walk)
    threaded = gptq_quantize(w, hessian, fmt)
    assert sorted(walked_rows) == [7, 8, 8]  # chunks walked on three threads, in any order
    walked_rows.clear()
    with gptq.CORE_SHARING.busy():
        assert gptq.CORE_SHARING.threads() == 1
        shared = gptq_quantize(w, hessian, fmt)
    assert walked_rows == [23] and gptq.CORE_SHARING.threads() == 3
    np.testing.assert_array_equal(shared.codes, threaded.codes)
    np.testing.assert_array_equal(shared.scales, threaded.scales)

    from bct_onnx import calibration

    seen = []
    run_segments = calibration._run_segments

    def recording_segments(*args):
        seen.append(gptq.CORE_SHARING.threads())
        run_segments(*args)

    monkeypatch.setattr(calibration, "_run_segments", recording_segments)
    rng = np.random.default_rng(15)
    store = collect_hessians(_mlp(rng), Calibration(({"x": _correlated_inputs(rng, 64, 64)},)), background=True)
    store.wait()
    store.close()
    assert seen == [1] and gptq.CORE_SHARING.threads() == 3


def test_inverse_hessian_factor_is_the_cholesky_factor_of_the_inverse():
    rng = np.random.default_rng(5)
    x = _correlated_inputs(rng, 256, 96)
    hessian = x.T.astype(np.float64) @ x
    factor, dead = inverse_hessian_factor(hessian, damping=0.01)
    dampened = hessian + 0.01 * np.mean(np.diag(hessian)) * np.eye(96)
    want = np.linalg.cholesky(np.linalg.inv(dampened)).T
    # float32 LAPACK: within float32 rounding of a matrix of condition number ~100
    np.testing.assert_allclose(factor, want, rtol=0, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(np.tril(factor, -1), 0.0)
    assert factor.dtype == np.float64 and not dead.any()
    # Positive definite only in float64 (1 - 1e-9 rounds to 1 in float32): the float64 path takes over.
    nearly_singular = np.array([[1.0, 1 - 1e-9], [1 - 1e-9, 1.0]])
    factor, _ = inverse_hessian_factor(nearly_singular, damping=0.0)
    np.testing.assert_allclose(factor.T @ factor, np.linalg.inv(nearly_singular), rtol=1e-6)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        inverse_hessian_factor(-np.eye(4), damping=0.0)


def test_gptq_rejects_mismatched_hessian():
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(np.zeros((4, 64), np.float32), np.eye(32), BlockFormat(4, 32))


MLP = """<ir_version: 8, opset_import: ["" : 17]>
g (float[B, 64] x) => (float[B, 16] y) {
  h = MatMul(x, w1)
  r = Relu(h)
  y = MatMul(r, w2)
}"""


def _mlp(rng):
    return model_from_text(
        MLP,
        {"w1": (rng.standard_normal((64, 96)) * 0.1).astype(np.float32),
         "w2": (rng.standard_normal((96, 16)) * 0.1).astype(np.float32)},
    )


def test_pipeline_with_calibration_uses_gptq_and_beats_plain_rounding():
    rng = np.random.default_rng(1)
    model = _mlp(rng)
    calib = Calibration(tuple({"x": _correlated_inputs(rng, 256, 64)} for _ in range(2)))
    test_x = _correlated_inputs(rng, 128, 64)
    (expected,) = run_ort(model, {"x": test_x})
    config = CompressConfig(weight_bits=4, act_bits=None, ops=frozenset({"MatMul"}))
    calibrated = compress_model(model, config, calibration=calib)
    plain = compress_model(model, config)
    assert calibrated.rewritten["MatMul weight rounded by GPTQ (calibrated)"] == 2
    assert "MatMul weight rounded by GPTQ (calibrated)" not in plain.rewritten
    assert op_types(calibrated.model) == ["BlockMatMul", "Relu", "BlockMatMul"]
    (got_calibrated,) = run_reference(calibrated.model, {"x": test_x})
    (got_plain,) = run_reference(plain.model, {"x": test_x})
    assert np.linalg.norm(got_calibrated - expected) < np.linalg.norm(got_plain - expected)
    (through_ort,) = run_bct_session(calibrated.model, {"x": test_x})
    np.testing.assert_allclose(through_ort, got_calibrated, rtol=1e-4, atol=1e-4)


def test_hessians_are_sums_of_x_transpose_x():
    rng = np.random.default_rng(2)
    model = _mlp(rng)
    batches = [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(3)]
    hessians = collect_hessians(model, Calibration(tuple({"x": b} for b in batches)))
    stacked = np.concatenate(batches).astype(np.float64)
    expected = stacked.T @ stacked
    # float32 sums: relative to the entry, or to the largest entry for entries that nearly cancel
    np.testing.assert_allclose(hessians[("x", "w1")], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert hessians[("r", "w2")].shape == (96, 96)


def test_hessian_updates_on_the_worker_thread_equal_the_serial_sums(monkeypatch):
    """Each batch's rank-k updates run on a worker while ONNX Runtime runs the next batch: one worker,
    in batch order, so the float32 sums are bit-identical to adding the batches one after the other;
    an error on the worker reaches the caller."""
    from bct_onnx import calibration

    monkeypatch.setattr(calibration, "PENDING_ROW_BYTES", 1)  # one syrk per batch
    rng = np.random.default_rng(4)
    model = _mlp(rng)
    batches = [(rng.standard_normal((int(rng.integers(1, 40)), 64)) * 10 ** rng.uniform(-2, 2)).astype(np.float32)
               for _ in range(9)]
    hessians = collect_hessians(model, Calibration(tuple({"x": b} for b in batches)))
    serial = calibration._HessianSums()
    for b in batches:
        serial.add("x", b)
    ((_, want),) = serial.finished()
    np.testing.assert_array_equal(hessians[("x", "w1")], want)

    def failing_add(self, name, value):
        raise RuntimeError("syrk failed")

    monkeypatch.setattr(calibration._HessianSums, "add", failing_add)
    with pytest.raises(RuntimeError, match="syrk failed"):
        collect_hessians(model, Calibration(tuple({"x": b} for b in batches)))


def test_background_hessians_are_handed_out_as_their_segments_finish(monkeypatch):
    """collect_hessians(background=True) returns at once; asking for a Hessian still to come waits for
    it (the same array as a run in the foreground); an error on the collection's thread reaches the
    caller; close() stops a collection still running."""
    import threading

    from bct_onnx import calibration

    rng = np.random.default_rng(6)
    model = _mlp(rng)
    calib = Calibration(tuple({"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(3)))
    foreground = collect_hessians(model, calib)
    want = {key: np.array(foreground[key]) for key in foreground}
    foreground.close()

    release = threading.Event()
    add = calibration.HessianStore.add

    def held_add(self, activation, hessian):
        if activation == "r":
            release.wait(timeout=30)  # the second MatMul's Hessian comes only when released
        add(self, activation, hessian)

    monkeypatch.setattr(calibration.HessianStore, "add", held_add)
    store = collect_hessians(model, calib, segment_bytes=1, background=True)  # x's segment, then r's
    try:
        np.testing.assert_array_equal(store[("x", "w1")], want[("x", "w1")])
        assert not store.has("r")  # still held
        threading.Timer(0.2, release.set).start()
        np.testing.assert_array_equal(store[("r", "w2")], want[("r", "w2")])  # waits for it
        assert store.wait() > 0 and sorted(store) == sorted(want)
        assert store.get(("y", "nothing")) is None
    finally:
        store.close()
    monkeypatch.setattr(calibration.HessianStore, "add", add)

    def failing_add(self, name, value):
        raise RuntimeError("syrk failed")

    monkeypatch.setattr(calibration._HessianSums, "add", failing_add)
    store = collect_hessians(model, calib, background=True)
    try:
        with pytest.raises(CalibrationError, match="syrk failed"):
            store[("x", "w1")]
        with pytest.raises(CalibrationError, match="syrk failed"):
            store.wait()
    finally:
        store.close()
    store = collect_hessians(model, calib, background=True)
    folder = store._folder.name
    store.close()
    assert store._thread is not None and not store._thread.is_alive()
    assert not os.path.exists(folder)


def test_calibration_runs_only_the_nodes_its_hessians_need(monkeypatch):
    """ONNX Runtime would run a node nobody reads (a decoder's output projection): it is left out of the
    calibration sessions, and the Hessian of its input is still measured."""
    import onnx

    from bct_onnx import calibration

    rng = np.random.default_rng(2)
    model = _mlp(rng)
    run_nodes = []
    session = calibration.runtime.session

    def recording_session(data, *args, **kwargs):
        run_nodes.extend(node.output[0] for node in onnx.ModelProto.FromString(data).graph.node)
        return session(data, *args, **kwargs)

    monkeypatch.setattr(calibration.runtime, "session", recording_session)
    batch = rng.standard_normal((8, 64)).astype(np.float32)
    hessians = collect_hessians(model, Calibration(({"x": batch},)))
    assert sorted(run_nodes) == ["h", "r"]  # not y = MatMul(r, w2)
    relu = np.maximum(batch @ model.graph.initializers["w1"].const_value.numpy(), 0).astype(np.float64)
    expected = relu.T @ relu
    np.testing.assert_allclose(hessians[("r", "w2")], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_quantize_matmul_pass_takes_hessians_and_runs_no_inference(monkeypatch):
    """The pipeline measures the Hessians; the pass only uses the ones it is handed."""
    from bct_onnx.passes import QuantizeMatMulPass

    from bct_onnx import runtime

    rng = np.random.default_rng(3)
    model = _mlp(rng)
    calib = Calibration(tuple({"x": _correlated_inputs(rng, 256, 64)} for _ in range(2)))
    config = CompressConfig(weight_bits=4, act_bits=None, ops=frozenset({"MatMul"}))
    hessians = collect_hessians(model, calib)
    expected = compress_model(model, config, calibration=calib).model

    def no_session(*args, **kwargs):
        raise AssertionError("a pass opened an inference session")

    monkeypatch.setattr(runtime, "session", no_session)
    only_w1 = {key: h for key, h in hessians.items() if key == ("x", "w1")}
    result = QuantizeMatMulPass(config, only_w1)(model.clone())
    assert result.rewritten == {"MatMul": 2, "MatMul weight rounded by GPTQ (calibrated)": 1}
    full = QuantizeMatMulPass(config, hessians)(model.clone()).model
    quantized = expected.graph.initializers  # the codes and scales of the pipeline's output
    assert len(quantized) >= 4
    for name, value in quantized.items():
        np.testing.assert_array_equal(full.graph.initializers[name].const_value.numpy(), value.const_value.numpy())


def test_text_feeds_names_inputs_text_cannot_fill():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (int64[B, S] input_ids, float[B, 2, P, 8] past_key) => (int64[B, S] y) { y = Identity(input_ids) }"""
    model = model_from_text(text)
    with pytest.raises(CalibrationError, match="past_key"):
        text_feeds(model, tokenizer=None, texts=["hello"])


def test_empty_calibration_is_refused():
    with pytest.raises(CalibrationError, match="at least one batch"):
        Calibration(())


class _NoPadTokenizer:
    """A decoder tokenizer without a pad token: asking it to pad is an error, as in transformers."""

    pad_token = None

    def __call__(self, texts, padding=False, truncation=True, max_length=128, return_tensors="np"):
        lengths = {len(t.split()) for t in texts}
        if padding and len(lengths) > 1:
            raise ValueError("Asking to pad but the tokenizer does not have a padding token.")
        ids = np.array([[len(word) for word in t.split()][:max_length] for t in texts], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_text_feeds_without_pad_token_packs_texts_into_equal_sequences():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (int64[B, S] input_ids, int64[B, S] attention_mask) => (int64[B, S] y) { y = Identity(input_ids) }"""
    model = model_from_text(text)
    texts = ["one two three", "four five", "six seven eight nine"]
    calibration = text_feeds(model, _NoPadTokenizer(), texts=texts, max_length=4, batch_size=2)
    # The tokens (here: word lengths) of all texts run together, cut into rows of 4, two rows a batch;
    # the 9th token is a batch of its own: no padding anywhere.
    ids = [batch["input_ids"].tolist() for batch in calibration.feeds]
    assert ids == [[[3, 3, 5, 4], [4, 3, 5, 5]], [[4]]]
    assert all(batch["attention_mask"].all() for batch in calibration.feeds)
    assert calibration.damping == TEXT_DAMPING
    # Each text keeps at most max_length tokens before packing.
    (only,) = text_feeds(model, _NoPadTokenizer(), texts=["a bb ccc dddd eeeee"], max_length=3).feeds
    assert only["input_ids"].tolist() == [[1, 2, 3]]
    # Long rows run a few at a time (at most PACKED_BATCH_TOKENS tokens a batch): a batch's attention
    # scores grow with its rows, its Hessian sums do not care.
    length = PACKED_BATCH_TOKENS // 2
    long_rows = text_feeds(model, _NoPadTokenizer(), texts=["word " * length] * 3, max_length=length)
    assert [batch["input_ids"].shape for batch in long_rows.feeds] == [(2, length), (1, length)]


TIED_LM = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[B, S] ids, float[B, S, 64] h) => (float[B, S, 64] emb, float[B, S, 300] logits) {
  emb = Gather(table, ids)
  table_t = Transpose<perm = [1, 0]>(table)
  logits = MatMul(h, table_t)
}"""


def test_tied_table_is_gptq_rounded_for_the_output_projection_and_shared():
    rng = np.random.default_rng(3)
    table = (rng.standard_normal((300, 64)) * 0.05).astype(np.float32)
    table[:, 5] = 0.3  # an input channel never active in calibration: the Gather still needs it
    model = model_from_text(TIED_LM, {"table": table})

    def feeds(rows):
        h = _correlated_inputs(rng, rows, 64)
        h[:, 5] = 0.0
        return {"ids": rng.integers(0, 300, (1, rows)), "h": h.reshape(1, rows, 64)}

    calib = Calibration(tuple(feeds(128) for _ in range(2)))
    assert collect_hessians(model, calib)[("h", "table")].shape == (64, 64)
    config = CompressConfig(weight_bits=4, act_bits=None, ops=frozenset({"MatMul", "Gather"}))
    calibrated = compress_model(model, config, calibration=calib)
    plain = compress_model(model, config)
    assert calibrated.rewritten["MatMul weight rounded by GPTQ (calibrated)"] == 1
    assert calibrated.rewritten["shared quantized table"] == 1
    graph = calibrated.model.graph
    gather, lm_head = graph.node(0), graph.node(1)
    assert (gather.op_type, lm_head.op_type) == ("BlockGather", "BlockMatMul")
    assert gather.inputs[1] is lm_head.inputs[1]  # one copy of the table
    codes = [v for v in graph.initializers.values() if v.name.endswith(".codes")]
    assert len(codes) == 1
    test = feeds(256)
    _, expected = run_ort(model, test)
    emb_c, logits_c = run_reference(calibrated.model, test)
    _, logits_p = run_reference(plain.model, test)
    assert np.linalg.norm(logits_c - expected) < 0.9 * np.linalg.norm(logits_p - expected)
    # The dead channel is rounded plainly, not zeroed: the embedding keeps it.
    np.testing.assert_allclose(emb_c[..., 5], 0.3, rtol=0.1)
    through_ort = run_bct_session(calibrated.model, test)
    np.testing.assert_allclose(through_ort[1], logits_c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale_kind", [ScaleKind.FLOAT16, ScaleKind.FLOAT32])
def test_gptq_float_offsets(scale_kind):
    """GPTQ with fixed per-block scale and float offset: in format, better than plain rounding."""
    rng = np.random.default_rng(2)
    k, n = 200, 48
    x = _correlated_inputs(rng, 1024, k)
    w = (rng.standard_normal((n, k)) * 0.05 + 0.02).astype(np.float32)
    fmt = BlockFormat(4, 32, False, scale_kind, "float")
    gptq = gptq_quantize(w, x.T.astype(np.float64) @ x, fmt)
    plain = quantize_tensor(w, fmt)
    assert gptq.zero_points is not None and gptq.zero_points.dtype == fmt.zero_point_dtype
    assert gptq.zero_points.shape == (n, 7)
    err_gptq = np.linalg.norm(x @ (dequantize(gptq) - w).T)
    err_plain = np.linalg.norm(x @ (dequantize(plain) - w).T)
    assert err_gptq < 0.9 * err_plain, (err_gptq, err_plain)


def test_gptq_keeps_a_q4_1_grid_exact():
    """A weight already on a float-offset 4-bit grid (GGUF Q4_1-like) comes back exactly, GPTQ or not."""
    rng = np.random.default_rng(4)
    n, k = 16, 64
    d = rng.uniform(1e-3, 5e-2, (n, 2)).astype(np.float16).astype(np.float32)
    m = (-8 * d).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, 2, 32))
    q[..., 0], q[..., 1] = 0, 15
    w = (d[..., None] * q + m[..., None]).astype(np.float32).reshape(n, k)
    x = _correlated_inputs(rng, 256, k)
    fmt = BlockFormat(4, 32, False, ScaleKind.FLOAT16, "float")
    np.testing.assert_array_equal(dequantize(quantize_tensor(w, fmt)), w)
    np.testing.assert_array_equal(dequantize(gptq_quantize(w, x.T.astype(np.float64) @ x, fmt)), w)



def test_a_shared_hessian_is_factored_once(monkeypatch):
    """MatMuls reading one activation share its Hessian object (HessianStore), and its factor."""
    rng = np.random.default_rng(8)
    x = _correlated_inputs(rng, 256, 64)
    hessian = x.T.astype(np.float64) @ x
    calls = []
    real = gptq.inverse_hessian_factor
    monkeypatch.setattr(gptq, "inverse_hessian_factor", lambda h, d: calls.append(d) or real(h, d))
    fmt = BlockFormat(4, 32)
    first = gptq_quantize((rng.standard_normal((8, 64)) * 0.05).astype(np.float32), hessian, fmt)
    w = (rng.standard_normal((16, 64)) * 0.05).astype(np.float32)
    shared = gptq_quantize(w, hessian, fmt)
    assert len(calls) == 1 and first.codes.shape == (8, 32)
    gptq_quantize(w, hessian, fmt, damping=0.1)
    gptq_quantize(w, hessian, fmt, damping=0.1, act_order=True)
    fresh = gptq_quantize(w, hessian.copy(), fmt)
    assert calls == [0.01, 0.1, 0.1, 0.01]
    np.testing.assert_array_equal(shared.codes, fresh.codes)


def test_hessian_store_hands_out_one_read_only_array_per_activation():
    from bct_onnx.calibration import HessianStore

    store = HessianStore()
    try:
        store.add("x", np.eye(4, dtype=np.float32))
        store.add("r", 2 * np.eye(8, dtype=np.float32))
        for key, k in ((("x", "q"), 4), (("x", "k"), 4), (("r", "o"), 8)):
            store.bind(key, k)
        q, k = store[("x", "q")], store[("x", "k")]
        assert q is k and not q.flags.writeable
        np.testing.assert_array_equal(store[("r", "o")], 2 * np.eye(8))
        assert store[("x", "q")] is not q  # read again once another activation was read
    finally:
        store.close()


def test_blas_controller_limits_scipy_blas_loaded_after_numpy():
    """GPTQ's BLAS limit covers scipy's own OpenBLAS even when scipy was not imported before the
    controller was made (a CLI process imports it lazily): an unlimited scipy made every rank-1
    update of the walk wake a second thread. A fresh process, since this one has scipy loaded.
    (pip's numpy and scipy each bring an OpenBLAS: two libraries to limit.)"""
    import subprocess
    import sys

    code = (
        "import sys, numpy\n"
        "assert 'scipy.linalg' not in sys.modules\n"
        "from bct_onnx.gptq import blas_controller\n"
        "controller = blas_controller()\n"
        "import scipy.linalg  # what the walk and the Hessian sums call\n"
        "from threadpoolctl import threadpool_info\n"
        "loaded = {lib['filepath'] for lib in threadpool_info() if lib['user_api'] == 'blas'}\n"
        "limited = {lib.filepath for lib in controller.select(user_api='blas').lib_controllers}\n"
        "assert loaded <= limited, (loaded, limited)\n"
        "with controller.limit(limits=1, user_api='blas'):\n"
        "    assert all(lib['num_threads'] == 1 for lib in threadpool_info() if lib['user_api'] == 'blas')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "fmt",
    [
        BlockFormat(4, 32, True, ScaleKind.FLOAT8E5M2),
        BlockFormat(6, 32, True, ScaleKind.FLOAT16),
        BlockFormat(5, 32, False, ScaleKind.FLOAT8E5M2, "packed"),
        BlockFormat(3, 16, False, ScaleKind.POW2),
        BlockFormat(4, 32, True, ScaleKind.FLOAT8E4M3),
    ],
    ids=lambda fmt: f"{fmt.bits}b{fmt.block_size}-{'sym' if fmt.symmetric else 'asym'}-{fmt.scale_kind.value}",
)
def test_scale_search_over_several_ratios_at_once_equals_one_at_a_time(fmt, monkeypatch):
    """search_scales tries its clip ratios in groups along a new axis (GPTQ's block columns are small):
    the same stored scales and zero points as one ratio at a time, ties to the earlier ratio included."""
    from bct_onnx import weight_quantizer
    from bct_onnx.block_format import float8e4m3_scale_factor

    rng = np.random.default_rng(9)
    x = (rng.standard_normal((300, 64)) * rng.uniform(1e-3, 3, (300, 1))).astype(np.float32)
    x[0] = 0.0  # an all-zero block: every ratio ties
    x[1, :32] = np.linspace(-1, 1, 32)  # an evenly spread block: near ties between ratios
    blocks = pad_to_blocks(x, fmt)
    factor = float8e4m3_scale_factor(x, fmt) if fmt.scale_kind is ScaleKind.FLOAT8E4M3 else None
    for importance in (None, rng.uniform(0, 2, fmt.block_size).astype(np.float32)):
        grouped = search_scales(blocks, fmt, importance=importance, scale_factor=factor)
        monkeypatch.setattr(weight_quantizer, "_SEARCH_GROUP_ELEMENTS", 1)
        single = search_scales(blocks, fmt, importance=importance, scale_factor=factor)
        monkeypatch.undo()
        np.testing.assert_array_equal(grouped[0].view(np.uint8), single[0].view(np.uint8))
        assert (grouped[1] is None) == fmt.symmetric
        if grouped[1] is not None:
            np.testing.assert_array_equal(grouped[1], single[1])



@pytest.mark.parametrize(
    "fmt",
    [
        BlockFormat(4, 32, True, ScaleKind.FLOAT8E4M3),
        BlockFormat(5, 32, False, ScaleKind.FLOAT8E4M3, "packed"),
        BlockFormat(4, 32, False, ScaleKind.FLOAT16, "float"),
        BlockFormat(3, 16, False, ScaleKind.POW2),
    ],
    ids=lambda fmt: f"{fmt.bits}b{fmt.block_size}-{'sym' if fmt.symmetric else 'asym'}-{fmt.scale_kind.value}"
    + ("-offsets" if fmt.float_offsets else ""),
)
def test_block_errors_a_few_rows_at_a_time_equal_all_rows_at_once(fmt, monkeypatch):
    """_block_squared_error takes the rows of blocks a few at a time (its temporaries in cache): the
    same errors, bit for bit, as all rows at once and as the arithmetic with a new array per step, for
    candidates along a leading axis and for a column-major block column (GPTQ's) with and without
    importance; and search_scales' shortcut for
    asymmetric candidates (asymmetric_scales of min * ratio, max * ratio) equals choose_scales of the
    blocks' [min, max] * ratio."""
    from bct_onnx import weight_quantizer
    from bct_onnx.block_format import asymmetric_scales, float8e4m3_scale_factor

    rng = np.random.default_rng(21)
    x = (rng.standard_normal((700, 96)) * rng.uniform(1e-3, 3, (700, 1))).astype(np.float32)
    factor = float8e4m3_scale_factor(x, fmt) if fmt.scale_kind is ScaleKind.FLOAT8E4M3 else None
    ratio = np.array(weight_quantizer.CLIP_RATIOS, np.float32).reshape(-1, 1, 1)
    for blocks in (pad_to_blocks(x, fmt), pad_to_blocks(np.asfortranarray(x[:, : fmt.block_size]), fmt)):
        lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
        scales, zp = choose_scales(np.stack([lo, hi], axis=-1) * ratio[..., None], fmt, factor)
        if not fmt.symmetric and not fmt.float_offsets:
            shortcut = asymmetric_scales(lo * ratio, hi * ratio, fmt, None if factor is None else np.float32(factor))
            np.testing.assert_array_equal(shortcut[0].view(np.uint8), scales.view(np.uint8))
            np.testing.assert_array_equal(shortcut[1], zp)
        for importance in (None, rng.uniform(0, 2, fmt.block_size).astype(np.float32)):
            monkeypatch.setattr(weight_quantizer, "_ERROR_CHUNK_ELEMENTS", 1 << 40)
            whole = weight_quantizer._block_squared_error(blocks, scales, zp, fmt, importance, factor)
            monkeypatch.setattr(weight_quantizer, "_ERROR_CHUNK_ELEMENTS", 1000)  # rows one or two at a time
            parts = weight_quantizer._block_squared_error(blocks, scales, zp, fmt, importance, factor)
            assert parts.shape == whole.shape == ratio.shape[:1] + blocks.shape[:-1]
            np.testing.assert_array_equal(parts, whole)
            # the arithmetic as first written (a new array per step), bit for bit
            from bct_onnx.block_format import _inverse, round_half_to_even, scales_to_float32

            scale = scales_to_float32(scales, fmt.scale_kind, factor)[..., None]
            offset = None if zp is None else zp.astype(np.float32)[..., None]
            if fmt.float_offsets:
                q = round_half_to_even(np.clip((blocks - offset) * _inverse(scale), 0, fmt.qmax))
                diff = (q * scale + offset) - blocks
            else:
                q = round_half_to_even(blocks * _inverse(scale))
                q = np.clip(q, fmt.qmin, fmt.qmax) if fmt.symmetric else np.clip(q + offset, 0, fmt.qmax) - offset
                diff = q * scale - blocks
            expected = (np.einsum("...i,...i->...", diff, diff) if importance is None else
                        np.einsum("...i,...i,...i->...", diff, diff, np.broadcast_to(importance, diff.shape)))
            np.testing.assert_array_equal(whole, expected)


@pytest.mark.parametrize("k", [1, 5, 64, 65, 130, 200])
def test_symmetric_from_upper_mirrors_the_upper_triangle_tile_by_tile(k):
    """calibration._symmetric_from_upper (tiles of 64) gives np.triu(u) + np.triu(u, 1).T of a Fortran-
    ordered syrk sum whose lower triangle is garbage, in C order, for sizes around the tile's."""
    from bct_onnx import calibration

    rng = np.random.default_rng(k)
    upper = np.asfortranarray(rng.standard_normal((k, k)).astype(np.float32))
    got = calibration._symmetric_from_upper(upper)
    expected = np.triu(upper) + np.triu(upper, 1).T
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, got.T)

@pytest.mark.parametrize("shape", [(5, 7), (64, 64), (130, 70), (576, 200)])
def test_tiled_copy_equals_one_copy(shape):
    """gptq._tiled_copy copies tile by tile: the values, dtype and order of np.array for the copies GPTQ
    makes (a reversed matrix into Fortran order, a transpose into C order with a cast)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    for source, dtype, order in ((x[::-1, ::-1], np.float32, "F"), (x.T, np.float64, "C"), (x[::-1, ::-1], np.float64, "C")):
        got = gptq._tiled_copy(source, dtype, order)
        expected = np.array(source, dtype=dtype, order=order)
        assert got.dtype == expected.dtype and got.flags.f_contiguous == expected.flags.f_contiguous
        assert got.flags.c_contiguous == expected.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)


def test_first_least_error_is_what_one_at_a_time_replacement_keeps():
    """The grouped search picks, per block, the candidate a strict one-at-a-time replacement ends with:
    the first least error on ties, never a NaN error, and the first candidate while its own is NaN."""
    from bct_onnx.weight_quantizer import _first_least

    nan, inf = np.float32(np.nan), np.float32(np.inf)
    errors = np.array([[2, 1, nan, nan, inf, 1],
                       [1, 1, 1, 0, inf, nan],
                       [1, 0, 0, nan, inf, 1]], np.float32)
    expected = []
    for column in errors.T:
        best = 0
        for i in range(1, len(column)):
            if column[i] < column[best]:
                best = i
        expected.append(best)
    assert expected == [1, 2, 0, 0, 0, 0]
    np.testing.assert_array_equal(_first_least(errors)[0], expected)


def _recorded_sessions(monkeypatch) -> list[list[str]]:
    """The op types of every calibration session opened from now on, one list per session."""
    import onnx

    from bct_onnx import calibration

    sessions: list[list[str]] = []
    session = calibration.runtime.session

    def recording_session(data, *args, **kwargs):
        sessions.append([node.op_type for node in onnx.ModelProto.FromString(data).graph.node])
        return session(data, *args, **kwargs)

    monkeypatch.setattr(calibration.runtime, "session", recording_session)
    return sessions


ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
attention (float[B, 4, 8] x, float[B, 4, 4] bias) => (float[B, 4, 8] y) {
    k = MatMul(x, wk)
    v = MatMul(x, wv)
    scores = Add(k, bias)
    p = Softmax<axis = -1>(scores)
    nan = IsNaN(p)
    guarded = Where(nan, zero, p)
    a = MatMul(guarded, v)
    y = MatMul(a, wo)
}
"""


def test_calibration_leaves_out_softmax_nan_guards_and_keeps_the_model_hessians(monkeypatch):
    """Where(IsNaN(p), 0, p) after a Softmax costs two passes over every score matrix: the calibration
    session leaves it out, and a batch with a fully masked row (NaN without the guard) is run again
    on the model's own graph, so the Hessians are the model's on every batch."""


    rng = np.random.default_rng(5)
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
               (("wk", (8, 4)), ("wv", (8, 8)), ("wo", (8, 8)))}
    model = model_from_text(ATTENTION, {**weights, "zero": np.zeros((), np.float32)})
    sessions = _recorded_sessions(monkeypatch)
    x = [rng.standard_normal((3, 4, 8)).astype(np.float32) for _ in range(2)]
    bias = [np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4), np.float32)]
    bias[1][1, 2, :] = -np.inf  # one fully masked row: softmax gives NaN, the guard zeroes it
    hessians = collect_hessians(model, Calibration(tuple({"x": xi, "bias": bi} for xi, bi in zip(x, bias))))
    # the guarded session first, then (for the masked batch) the model's own segment
    assert sessions == [["MatMul", "MatMul", "Add", "Softmax", "MatMul"],
                        ["MatMul", "MatMul", "Add", "Softmax", "IsNaN", "Where", "MatMul"]]
    expected = np.zeros((8, 8))
    for xi, bi in zip(x, bias):
        scores = xi @ weights["wk"] + bi
        with np.errstate(invalid="ignore"):
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
        a = (np.nan_to_num(p, nan=0.0) @ (xi @ weights["wv"])).reshape(-1, 8).astype(np.float64)
        expected += a.T @ a
    got = hessians[("a", "wo")]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    hessians.close()


def _factor_from_float64_copy(hessian: np.ndarray, damping: float) -> np.ndarray:
    """inverse_hessian_factor's float32 attempt as first written: J H J built in float64, dampened, cast."""
    import scipy.linalg

    h = np.array(hessian[::-1, ::-1], dtype=np.float64, order="F")
    diagonal = np.diag_indices_from(h)
    h[diagonal] = np.where(h[diagonal] == 0, 1.0, h[diagonal])
    h[diagonal] += damping * float(np.mean(h[diagonal]))
    lower, info = scipy.linalg.lapack.spotrf(h.astype(np.float32, order="F"), lower=1, clean=1)
    assert info == 0
    inverse_lower, info = scipy.linalg.lapack.strtri(lower, lower=1)
    assert info == 0
    return np.ascontiguousarray(inverse_lower[::-1, ::-1], dtype=np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inverse_hessian_factor_builds_float32_input_exactly_as_the_float64_copy(dtype):
    """The float32 attempt starts from J H J in float32 with the dampened diagonal summed in float64 and
    rounded once: bit for bit the float64 matrix cast to float32 (a dead input included)."""
    rng = np.random.default_rng(16)
    x = _correlated_inputs(rng, 256, 80)
    x[:, 5] = 0.0
    hessian = (x.T.astype(np.float64) @ x).astype(dtype)
    with gptq.blas_controller().limit(limits=1, user_api="blas"):
        expected = _factor_from_float64_copy(hessian, 0.1)
    factor, dead = inverse_hessian_factor(hessian, 0.1)
    np.testing.assert_array_equal(factor, expected)
    assert np.flatnonzero(dead).tolist() == [5]


CAUSAL_ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
attention (float[B, T, 8] x, bool[B, T, T] mask) => (float[B, T, 8] y) {
    q = MatMul(x, wq)
    k = MatMul(x, wk)
    kt = Transpose<perm = [0, 2, 1]>(k)
    v = MatMul(x, wv)
    scores = MatMul(q, kt)
    bias = Where(mask, zero, ninf)
    masked = Add(scores, bias)
    p = Softmax<axis = -1>(masked)
    nan = IsNaN(p)
    guarded = Where(nan, zero, p)
    a = MatMul(guarded, v)
    y = MatMul(a, wo)
}
"""


def test_calibration_computes_causal_attention_in_blocks_and_keeps_the_model_hessians(monkeypatch):
    """A causal attention (Softmax(q kt + Where(mask, 0, -inf)) v) runs in blocks of CAUSAL_BLOCK query
    rows against the keys up to each block's end; a batch whose mask is not causal (a query row sees a
    later key) is run again on the model's own segment, and so is every batch after it. The Hessians
    are the model's either way (up to float rounding)."""

    from bct_onnx import calibration

    monkeypatch.setattr(calibration, "CAUSAL_BLOCK", 16)
    rng = np.random.default_rng(12)
    weights = {name: rng.standard_normal((8, 8)).astype(np.float32) for name in ("wq", "wk", "wv", "wo")}
    model = model_from_text(
        CAUSAL_ATTENTION,
        {**weights, "zero": np.zeros((), np.float32), "ninf": np.array(-np.inf, np.float32)},
    )
    sessions = _recorded_sessions(monkeypatch)
    lengths = (40, 37, 9)  # 3, 3 and 1 blocks of 16 rows (the last block takes the rest)
    x = [rng.standard_normal((2, t, 8)).astype(np.float32) for t in lengths]
    causal = [np.broadcast_to(np.tril(np.ones((t, t), bool)), (2, t, t)).copy() for t in lengths]
    causal[1][1, 5:, 3] = False  # a masked key inside the causal part: still causal

    def expected_hessian(xs, masks):
        expected = np.zeros((8, 8))
        for xi, mi in zip(xs, masks):
            scores = (xi @ weights["wq"]) @ (xi @ weights["wk"]).transpose(0, 2, 1) + np.where(mi, 0, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            a = (p @ (xi @ weights["wv"])).reshape(-1, 8).astype(np.float64)
            expected += a.T @ a
        return expected

    hessians = collect_hessians(model, Calibration(tuple({"x": xi, "mask": mi} for xi, mi in zip(x, causal))))
    got = hessians[("a", "wo")]
    expected = expected_hessian(x, causal)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    hessians.close()
    (blocked,) = sessions
    assert blocked.count("Softmax") == 3 and "IsNaN" not in blocked and blocked.count("Concat") == 1
    # two blocks slice kt and v (the last sees every key), every block slices q and the mask
    assert blocked.count("Slice") == 2 * 2 + 3 * 2

    sessions.clear()
    full = [np.ones_like(m) for m in causal]  # not causal: every row sees every key
    mixed = [causal[0], full[1], causal[2]]
    hessians = collect_hessians(model, Calibration(tuple({"x": xi, "mask": mi} for xi, mi in zip(x, mixed))))
    got = hessians[("a", "wo")]
    expected = expected_hessian(x, mixed)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    hessians.close()
    # the blocked session, then the model's own segment from the second batch on
    assert [s.count("Softmax") for s in sessions] == [3, 1] and "IsNaN" in sessions[1]


@pytest.mark.parametrize("library", [True, False])
def test_search_block_column_picks_what_search_scales_picks(library, monkeypatch):
    """GPTQ's K-major search (weight_quantizer.search_block_column: BlockScaleErrors in the library, or its
    numpy spec block_scale_errors without it; without importance, the library's differences summed by
    einsum, or search_scales itself) stores the scales and zero points of search_scales on the rows'
    padded blocks, for every scale kind, both zero-point modes, partial blocks and zero rows."""
    from bct_onnx import weight_quantizer
    from bct_onnx.block_format import float8e4m3_scale_factor

    if not library:
        monkeypatch.setattr(weight_quantizer._SCALE_ERROR_SESSIONS, "get", lambda bits, symmetric, reduce=True: None)
    rng = np.random.default_rng(11)
    formats = [
        BlockFormat(4, 32, True, ScaleKind.FLOAT8E4M3),
        BlockFormat(5, 32, False, ScaleKind.FLOAT8E4M3, "packed"),
        BlockFormat(6, 32, True, ScaleKind.FLOAT16),
        BlockFormat(4, 32, True, ScaleKind.POW2),
        BlockFormat(3, 16, False, ScaleKind.FLOAT8E5M2),
        BlockFormat(8, 32, True, ScaleKind.FLOAT32),
    ]
    for fmt in formats:
        for rows, length in ((700, fmt.block_size), (33, fmt.block_size - 3), (1, fmt.block_size)):
            columns = rng.standard_normal((length, rows)) * 0.02 * np.exp(rng.uniform(-2, 2, rows))
            columns[:, : min(rows, 2)] = 0.0
            weighted = np.zeros(fmt.block_size, np.float32)
            weighted[:length] = rng.random(length)
            factor = float8e4m3_scale_factor(columns.T, fmt) if fmt.scale_kind is ScaleKind.FLOAT8E4M3 else None
            for importance in (weighted, None):
                want_s, want_zp = search_scales(
                    pad_to_blocks(columns.T.astype(np.float32), fmt), fmt, importance=importance, scale_factor=factor
                )
                got_s, got_zp = weight_quantizer.search_block_column(columns, fmt, importance, factor)
                view = f"u{got_s.itemsize}"
                np.testing.assert_array_equal(got_s.view(view), want_s[:, 0].view(view))
                if want_zp is None:
                    assert got_zp is None
                else:
                    np.testing.assert_array_equal(got_zp, want_zp[:, 0])


def test_block_scale_errors_are_the_einsum_errors():
    """block_scale_errors (the BlockScaleErrors spec) sums along the leading axis: bit for bit the errors of
    _block_squared_error, whose einsum adds the three-operand products one at a time."""
    from bct_onnx.block_format import scales_to_float32
    from bct_onnx.weight_quantizer import _block_squared_error, block_scale_errors

    rng = np.random.default_rng(5)
    for fmt in (BlockFormat(4, 32, True, ScaleKind.FLOAT32), BlockFormat(5, 32, False, ScaleKind.FLOAT16)):
        x = (rng.standard_normal((32, 300)) * np.exp(rng.uniform(-3, 3, 300))).astype(np.float32)
        stored = (np.abs(x).max(axis=0) / fmt.qmax * rng.uniform(0.7, 1.2, (5, 300))).astype(fmt.scale_dtype)
        zp = None if fmt.symmetric else rng.integers(0, fmt.qmax + 1, (5, 300)).astype(np.uint8)
        importance = rng.random(32).astype(np.float32)
        got = block_scale_errors(
            x, scales_to_float32(stored, fmt.scale_kind), None if zp is None else zp.astype(np.float32), importance, fmt
        )
        for c in range(5):
            want = _block_squared_error(
                x.T[:, None, :], stored[c][:, None], None if zp is None else zp[c][:, None], fmt, importance
            )[:, 0]
            np.testing.assert_array_equal(got[c].view(np.uint32), want.view(np.uint32))


def test_symmetric_rounder_clip_is_maximum_then_minimum():
    """The walk's one-call clip of symmetric levels (gptq._clip) gives np.minimum(np.maximum(level, qmin),
    qmax) bit for bit: NaN, infinities, -0.0 and values just past either bound."""
    rng = np.random.default_rng(2)
    for bits in (2, 4, 8):
        fmt = BlockFormat(bits, 32, True, ScaleKind.FLOAT32)
        low, high = np.float32(fmt.qmin), np.float32(fmt.qmax)
        level = np.concatenate([
            np.rint(rng.standard_normal(5000) * 2 ** bits).astype(np.float32),
            np.float32([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, low - 0.5, high + 0.5, low, high]),
        ])
        got = level.copy()
        gptq._clip(got, low, high, out=got)
        np.testing.assert_array_equal(got.view(np.uint32), np.minimum(np.maximum(level, low), high).view(np.uint32))


@pytest.mark.parametrize("m, k", [(1, 1), (3, 7), (40, 64), (341, 200), (700, 576)])
def test_ssyrk_without_the_gil_equals_scipys_wrapper(m, k):
    """calibration.ssyrk_upper (scipy's BLAS ssyrk through ctypes, which releases the GIL) updates the
    upper triangle of a Fortran-ordered float32 sum to the bits of scipy.linalg.blas.ssyrk with the same
    arguments, twice in a row (the second update on top of the first), on one BLAS thread as in
    calibration; arrays it cannot take are left to the caller (False, unchanged)."""
    import scipy.linalg

    from bct_onnx import calibration
    from bct_onnx.gptq import blas_controller

    rng = np.random.default_rng(m * 1000 + k)
    parts = [(rng.standard_normal((m, k)) * 10 ** rng.uniform(-3, 3, size=k)).astype(np.float32) for _ in range(2)]
    got = np.zeros((k, k), np.float32, order="F")
    want = np.zeros((k, k), np.float32, order="F")
    with blas_controller().limit(limits=1, user_api="blas"):
        for rows in parts:
            assert calibration.ssyrk_upper(rows, got)
            scipy.linalg.blas.ssyrk(1.0, rows.T, beta=1.0, c=want, trans=0, overwrite_c=1)
    upper = np.triu(np.ones((k, k), bool))
    np.testing.assert_array_equal(got[upper], want[upper])
    assert np.all(got[~upper] == 0)  # the lower triangle is not touched
    before = got.copy(order="F")
    assert not calibration.ssyrk_upper(np.asfortranarray(parts[0]) if m > 1 and k > 1 else parts[0][:, :0], got)
    assert not calibration.ssyrk_upper(parts[0].astype(np.float64), got)
    assert not calibration.ssyrk_upper(parts[0], np.ascontiguousarray(got) if k > 1 else got.astype(np.float64))
    np.testing.assert_array_equal(got, before)


@pytest.mark.parametrize("n", [1, 5, 64, 200, 576])
def test_inverse_cholesky_without_the_gil_equals_scipys_wrappers(n):
    """gptq._inverse_cholesky_without_gil (spotrf and strtri through ctypes, which release the GIL) gives
    the bits of scipy.linalg.lapack's spotrf(lower=1, clean=1) then strtri(lower=1), the upper triangle
    zero, h unchanged; a matrix that is not positive definite gives an empty array (the caller damps more)."""
    import scipy.linalg

    from bct_onnx import gptq

    rng = np.random.default_rng(n)
    x = rng.standard_normal((3 * n + 2, n)).astype(np.float32)
    h = np.asfortranarray((x.T @ x + np.eye(n, dtype=np.float32)).astype(np.float32))
    before = h.copy(order="F")
    with gptq.blas_controller().limit(limits=1, user_api="blas"):
        got = gptq._inverse_cholesky_without_gil(h)
        lower, info = scipy.linalg.lapack.spotrf(h, lower=1, clean=1, overwrite_a=0)
        assert info == 0
        want, info = scipy.linalg.lapack.strtri(lower, lower=1, overwrite_c=1)
        assert info == 0
    assert got is not None and got.dtype == np.float32 and got.flags.f_contiguous
    np.testing.assert_array_equal(got, want)
    assert not np.triu(got, 1).any()
    np.testing.assert_array_equal(h, before)
    indefinite = h.copy(order="F")
    indefinite[n // 2, n // 2] = -1.0
    assert gptq._inverse_cholesky_without_gil(indefinite).size == 0
    assert gptq._inverse_cholesky_without_gil(np.ascontiguousarray(h) if n > 1 else h.astype(np.float64)) is None


def test_next_segment_session_is_opened_beside_the_forward(monkeypatch):
    """The session of every segment after the first is opened on the opener's thread once the segment before it
    has run its last batch (while that segment's Hessians are finished), not on the forward's thread; the
    Hessians are those of x and of Relu's output, each segment run on every batch."""
    import threading

    from bct_onnx import calibration

    rng = np.random.default_rng(8)
    model = _mlp(rng)
    batches = [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(3)]
    opened = []
    real = calibration._segment_session

    def recorded(proto, index, *args, **kwargs):
        opened.append((index, threading.current_thread().name))
        return real(proto, index, *args, **kwargs)

    monkeypatch.setattr(calibration, "_segment_session", recorded)
    forward = []
    run_segments = calibration._run_segments
    monkeypatch.setattr(calibration, "_run_segments",
                        lambda *a, **k: forward.append(threading.current_thread().name) or run_segments(*a, **k))
    hessians = collect_hessians(model, Calibration(tuple({"x": b} for b in batches)), segment_bytes=1)
    try:
        assert [index for index, _ in opened] == [0, 1]
        assert opened[0][1] == forward[0] and opened[1][1] != forward[0]
        stacked = np.concatenate(batches).astype(np.float64)
        np.testing.assert_allclose(hessians[("x", "w1")], stacked.T @ stacked, rtol=1e-5, atol=1e-4)
        relu = np.maximum(stacked @ model.graph.initializers["w1"].const_value.numpy().astype(np.float64), 0)
        np.testing.assert_allclose(hessians[("r", "w2")], relu.T @ relu, rtol=1e-4, atol=1e-3)
    finally:
        hessians.close()
