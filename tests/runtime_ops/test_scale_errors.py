"""BlockScaleErrors (GPTQ's scale search in the library): every CPU path gives the errors of its numpy
specification, weight_quantizer.block_scale_errors (with reduce=0 the differences of block_scale_diffs),
bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from bct_onnx import weight_quantizer
from bct_onnx.block_format import BlockFormat, ScaleKind

ISAS = ["scalar", "avx2", "avx512", "avx512vnni"]


def hard_case(length: int, n: int, candidates: int, fmt: BlockFormat, seed: int):
    """K-major blocks and candidate scales with the edges: zero, negative, subnormal and tiny scales (x / scale
    far beyond 2**22), NaN and infinite elements and scales, ties at .5, a chunk boundary (256 rows)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((length, n)) * np.exp(rng.uniform(-4, 2, n))).astype(np.float32)
    x[:, :3] = 0.0
    if n > 8:
        x[0, 5], x[-1, 6], x[length // 2, 7] = np.nan, np.inf, -np.inf
    top = np.abs(x).max(axis=0)
    scale = (top / fmt.qmax * rng.uniform(0.5, 1.3, (candidates, n))).astype(np.float32)
    scale[:, 1::4] *= -1  # symmetric spec scales of a negative extreme
    if n > 12:
        scale[0, 3] = 0.0
        scale[1 % candidates, 8] = 1e-42
        scale[-1, 9] = 1e-30
        scale[0, 10] = np.nan
        scale[-1, 11] = np.inf
        x[:, 12] = scale[0, 12] * (np.arange(length) % 9 - 4 + 0.5)  # exact ties of x / scale
    zero = None
    if not fmt.symmetric:
        zero = rng.integers(0, fmt.qmax + 1, (candidates, n)).astype(np.float32)
    importance = rng.random(length).astype(np.float32)
    importance[length // 3] = 0.0
    return x, scale, zero, importance


def assert_same_errors(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
def test_scale_errors_isa_paths_match_the_numpy_spec(isa: str, force_isa) -> None:
    force_isa(isa)
    for bits, symmetric in ((4, True), (2, True), (8, True), (5, False), (4, False), (8, False)):
        fmt = BlockFormat(bits, 32, symmetric, ScaleKind.FLOAT32)
        session = weight_quantizer._scale_errors_session(bits, symmetric)  # created now: the forced path
        for length, n, candidates in ((32, 600, 11), (32, 256, 2), (16, 257, 3), (3, 13, 1), (1, 1, 4)):
            x, scale, zero, importance = hard_case(length, n, candidates, fmt, seed=bits * 100 + n)
            feeds = {"x": x, "scales": scale, "importance": importance}
            if zero is not None:
                feeds["zero_points"] = zero
            (got,) = session.run(None, feeds)
            with np.errstate(all="ignore"):  # 1 / a subnormal scale, inf - inf: the edges on purpose
                want = weight_quantizer.block_scale_errors(x, scale, zero, importance, fmt)
            assert_same_errors(got, want)


@pytest.mark.parametrize("isa", ISAS)
def test_scale_diffs_isa_paths_match_the_numpy_spec(isa: str, force_isa) -> None:
    """reduce=0: blocks row by row in, the rounding differences [C, N, L] out (the caller sums them)."""
    force_isa(isa)
    for bits, symmetric in ((4, True), (8, True), (5, False), (2, False)):
        fmt = BlockFormat(bits, 32, symmetric, ScaleKind.FLOAT32)
        session = weight_quantizer._scale_errors_session(bits, symmetric, reduce=False)
        for length, n, candidates in ((32, 600, 11), (16, 257, 3), (3, 13, 1), (1, 1, 2)):
            x, scale, zero, _ = hard_case(length, n, candidates, fmt, seed=bits * 10 + n)
            rows = np.ascontiguousarray(x.T)
            feeds = {"x": rows, "scales": scale}
            if zero is not None:
                feeds["zero_points"] = zero
            (got,) = session.run(None, feeds)
            with np.errstate(all="ignore"):
                want = weight_quantizer.block_scale_diffs(rows, scale, zero, fmt)
            assert_same_errors(got, want)


def test_scale_errors_refuses_inputs_that_do_not_fit() -> None:
    session = weight_quantizer._scale_errors_session(4, True)
    x = np.zeros((32, 8), np.float32)
    with pytest.raises(Exception, match="'importance' must be \\[L\\] = \\[32\\], got \\[31\\]"):
        session.run(None, {"x": x, "scales": np.ones((2, 8), np.float32), "importance": np.ones(31, np.float32)})
    with pytest.raises(Exception, match="one N"):
        session.run(None, {"x": x, "scales": np.ones((2, 9), np.float32), "importance": np.ones(32, np.float32)})
    import onnx

    import bct_onnx
    from bct_onnx import ops

    helper = onnx.helper
    node = helper.make_node("BlockScaleErrors", ["x", "scales", "importance"], ["errors"], domain=ops.DOMAIN, bits=4, symmetric=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in ("x", "scales", "importance")],
        [helper.make_tensor_value_info("errors", onnx.TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    asymmetric = bct_onnx.session(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="'zero_points' is required when symmetric=0"):
        asymmetric.run(None, {"x": x, "scales": np.ones((2, 8), np.float32), "importance": np.ones(32, np.float32)})


@pytest.mark.parametrize(
    "bits,symmetric,reduce,message",
    [
        (9, 1, 1, "attribute 'bits' must be in 2..8, got 9"),
        (1, 1, 1, "attribute 'bits' must be in 2..8, got 1"),
        (4, 2, 1, "attribute 'symmetric' must be 0 or 1, got 2"),
        (4, 1, 3, "attribute 'reduce' must be 0 or 1, got 3"),
    ],
)
def test_scale_errors_rejects_bad_attributes(bits: int, symmetric: int, reduce: int, message: str) -> None:
    """The kernel names the attribute and its allowed range when the session is made (op_common.h's
    AttrIntIn / AttrFlag)."""
    with pytest.raises(Exception, match=message):
        weight_quantizer._scale_errors_session(bits, symmetric, reduce)  # type: ignore[arg-type]
