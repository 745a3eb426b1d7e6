"""BlockAddLayerNorm / BlockAddRMSNorm on every CPU path against the spec (bct_onnx.reference_fused):
bit-exact, each output on its own (normalized result as float or codes, and the float32 sum), with
the operand float or quantized; and bit-exact to the unfused Add -> BlockLayerNorm / BlockRMSNorm."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from support import assert_bits_equal, run

import bct_onnx
from bct_onnx.block_format import BlockFormat, QuantizedTensor, ScaleKind, quantize
from bct_onnx.ops import BLOCK_ADD_LAYER_NORM, BLOCK_ADD_RMS_NORM, BLOCK_LAYER_NORM, BLOCK_RMS_NORM, DOMAIN
from bct_onnx.reference_fused import block_add_layer_norm, block_add_rms_norm

ISAS = ("scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx")
FORMATS = {
    "float": None,
    "own8": BlockFormat(8, 32, True, ScaleKind.FLOAT32),
    "asym4": BlockFormat(4, 16, False, ScaleKind.FLOAT16),
    "pow2": BlockFormat(6, 32, True, ScaleKind.POW2),
}
NORMS = {"layer": BLOCK_ADD_LAYER_NORM, "rms": BLOCK_ADD_RMS_NORM}


def _model(
    op_type: str, names: list[str], feeds: dict[str, np.ndarray], outputs: list[str], **attrs: Any
) -> bytes:
    node = helper.make_node(op_type, names, outputs, domain=DOMAIN, name="n", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(
                k, helper.np_dtype_to_tensor_dtype(v.dtype), [f"{k}{j}" for j in range(v.ndim)]
            )
            for k, v in feeds.items()
        ],  # ranks known: the output dtypes follow out_bits through the op's type inference
        [helper.make_value_info(o, onnx.TypeProto()) for o in outputs if o],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return model.SerializeToString()


def run_add_norm(
    norm: str,
    x: np.ndarray | QuantizedTensor,
    skip: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray | None,
    out_fmt: BlockFormat | None,
    with_sum: bool = True,
    epsilon: float = 1e-5,
) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    attrs: dict[str, Any] = {"epsilon": epsilon}
    if isinstance(x, QuantizedTensor):
        names = ["X", "X_scales", "X_zero_points" if x.zero_points is not None else ""]
        feeds.update(X=x.codes, X_scales=x.scales)
        if x.zero_points is not None:
            feeds["X_zero_points"] = x.zero_points
        attrs.update(in_bits=x.fmt.bits, in_block_size=x.fmt.block_size, in_symmetric=int(x.fmt.symmetric),
                     in_axis_size=x.axis_size)  # fmt: skip
    else:
        names = ["X", "", ""]
        feeds["X"] = x
    names += ["skip", "scale"]
    feeds.update(skip=skip, scale=scale)
    if norm == "layer" and bias is not None:
        names.append("bias")
        feeds["bias"] = bias
    outputs = ["Y"]
    if out_fmt is not None:
        outputs += ["Y_scales", "Y_zero_points" if not out_fmt.symmetric else ""]
        attrs.update(out_bits=out_fmt.bits, out_block_size=out_fmt.block_size, out_symmetric=int(out_fmt.symmetric),
                     out_scale_kind=out_fmt.scale_kind.value)  # fmt: skip
    if with_sum:
        outputs += [""] * (3 - len(outputs)) + ["sum"]
    results = run(_model(NORMS[norm], names, feeds, outputs, **attrs), feeds)
    return dict(zip([o for o in outputs if o], results, strict=True))


def check(
    norm: str, x, skip, scale, bias, out_fmt, got: dict[str, np.ndarray], epsilon: float = 1e-5
) -> None:
    if norm == "layer":
        want, total = block_add_layer_norm(x, skip, scale, bias, epsilon, out_fmt)
    else:
        want, total = block_add_rms_norm(x, skip, scale, epsilon, out_fmt)
    if "sum" in got:
        assert_bits_equal(got["sum"], total, "sum")
    if out_fmt is None:
        assert_bits_equal(got["Y"], want, "Y")
        return
    assert_bits_equal(got["Y"], want.codes, "codes")
    assert_bits_equal(got["Y_scales"], want.scales, "scales")
    if not out_fmt.symmetric:
        assert_bits_equal(got["Y_zero_points"], want.zero_points, "zero points")


def _data(shape: tuple[int, ...], seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    x.reshape(-1)[::13] *= 8  # outliers, as in a residual stream
    skip = (rng.standard_normal(shape) * 3).astype(np.float32)
    d = shape[-1]
    return x, skip, rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("out", sorted(FORMATS))
def test_float_operand_every_path(isa: str, norm: str, out: str, force_isa: Any) -> None:
    force_isa(isa)
    x, skip, scale, bias = _data((3, 70, 96), seed=len(out))  # 210 rows: several parallel groups
    got = run_add_norm(norm, x, skip, scale, bias, FORMATS[out])
    check(norm, x, skip, scale, bias, FORMATS[out], got)


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize(
    "in_fmt", [FORMATS["own8"], FORMATS["asym4"], BlockFormat(3, 8, True, ScaleKind.FLOAT16)]
)
def test_quantized_operand(norm: str, in_fmt: BlockFormat) -> None:
    x, skip, scale, bias = _data((5, 40), seed=in_fmt.bits)
    qx = quantize(x, in_fmt)
    got = run_add_norm(norm, qx, skip, scale, bias, FORMATS["own8"])
    check(norm, qx, skip, scale, bias, FORMATS["own8"], got)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_without_sum_output_and_without_bias(norm: str) -> None:
    x, skip, scale, _ = _data((4, 33), seed=2)
    got = run_add_norm(norm, x, skip, scale, None, None, with_sum=False, epsilon=1e-6)
    assert set(got) == {"Y"}
    check(norm, x, skip, scale, None, None, got, epsilon=1e-6)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_equals_the_unfused_add_then_norm(norm: str) -> None:
    """The graph FuseAddNormPass rewrites: Add -> BlockLayerNorm / BlockRMSNorm, run by the kernels."""
    x, skip, scale, bias = _data((6, 64), seed=9)
    op = BLOCK_LAYER_NORM if norm == "layer" else BLOCK_RMS_NORM
    extra = ["scale", "bias"] if norm == "layer" else ["scale"]
    nodes = [
        helper.make_node("Add", ["X", "skip"], ["v"]),
        helper.make_node(op, ["v", "", "", *extra], ["Y"], domain=DOMAIN, name="norm", epsilon=1e-5),
    ]
    feeds = {"X": x, "skip": skip, "scale": scale, "bias": bias}
    feeds = {k: feeds[k] for k in ["X", "skip", *extra]}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in feeds],
        [helper.make_value_info(o, onnx.TypeProto()) for o in ("Y", "v")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    y, v = run(model.SerializeToString(), feeds)
    got = run_add_norm(norm, x, skip, scale, bias, None)
    assert_bits_equal(got["Y"], y, "Y")
    assert_bits_equal(got["sum"], v, "sum")


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("skip_shape", [(1, 7, 24), (7, 24), (24,)])
def test_skip_broadcast_over_leading_dims(norm: str, skip_shape: tuple[int, ...]) -> None:
    """SkipLayerNormalization's broadcast: skip [1, S, D] / [S, D] / [D] for an operand [B, S, D]."""
    x, skip, scale, bias = _data((3, 7, 24), seed=4)
    skip = np.ascontiguousarray(skip[0].reshape(-1)[: int(np.prod(skip_shape))].reshape(skip_shape))
    got = run_add_norm(norm, x, skip, scale, bias, FORMATS["asym4"])
    check(norm, x, skip, scale, bias, FORMATS["asym4"], got)
    np.testing.assert_array_equal(got["sum"], (x + skip).astype(np.float32))


def test_skip_that_does_not_broadcast_over_leading_dims_is_an_error() -> None:
    x, skip, scale, _ = _data((4, 3, 32), seed=1)
    message = (
        "bct_onnx BlockAddRMSNorm node 'n': input 'skip' must have the operand's shape [4, 3, 32] or broadcast "
        "to it over leading dims (e.g. [1, S, D]), got [4, 1, 32]"
    )
    with pytest.raises(Exception, match=re.escape(message)):
        run_add_norm("rms", x, skip[:, :1], scale, None, None)


SCRATCH_SHAPES = [(1, 1, 576), (3, 70, 96), (1, 1, 40), (2, 5, 576), (1, 300, 24), (1, 1, 576)]


def _session_feeds(norm: str, shape: tuple[int, ...], seed: int, out_fmt: BlockFormat | None):
    x, skip, scale, bias = _data(shape, seed)
    feeds = {"X": x, "skip": skip, "scale": scale}
    if norm == "layer":
        feeds["bias"] = bias
    return feeds, (x, skip, scale, bias if norm == "layer" else None, out_fmt)


def _one_session(norm: str, out_fmt: BlockFormat | None):
    """One session of the op (ranks known, dims symbolic) that calls may feed any shape."""
    x, skip, scale, bias = _data((1, 1, 8), 0)
    feeds = {"X": x, "skip": skip, "scale": scale, "bias": bias} if norm == "layer" else {
        "X": x, "skip": skip, "scale": scale}  # fmt: skip
    attrs: dict[str, Any] = {"epsilon": 1e-5}
    outputs = ["Y"]
    if out_fmt is not None:
        outputs += ["Y_scales", "Y_zero_points" if not out_fmt.symmetric else ""]
        attrs.update(out_bits=out_fmt.bits, out_block_size=out_fmt.block_size, out_symmetric=int(out_fmt.symmetric),
                     out_scale_kind=out_fmt.scale_kind.value)  # fmt: skip
    outputs += [""] * (3 - len(outputs)) + ["sum"]
    names = ["X", "", "", "skip", "scale"] + (["bias"] if norm == "layer" else [])
    model = _model(NORMS[norm], names, feeds, outputs, **attrs)
    session = bct_onnx.session(model)
    return lambda f: dict(zip([o for o in outputs if o], session.run(None, f), strict=True))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("out", ["float", "own8", "asym4"])
def test_one_session_many_shapes(isa: str, norm: str, out: str, force_isa: Any) -> None:
    """The per-thread scratch of the row loops is reused across calls: one session fed one row (a
    decoder step), many rows (several parallel groups) and other widths in turn, bit-exact each time."""
    force_isa(isa)
    call = _one_session(norm, FORMATS[out])
    for i, shape in enumerate(SCRATCH_SHAPES):
        feeds, spec = _session_feeds(norm, shape, seed=i, out_fmt=FORMATS[out])
        check(norm, *spec, call(feeds))


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_concurrent_calls_with_different_shapes(norm: str) -> None:
    """Calls of one kernel in flight at once on several threads (ONNX Runtime allows concurrent Run):
    each thread's scratch is its own, so every result is still bit-exact."""
    call = _one_session(norm, FORMATS["own8"])
    jobs = [(shape, 100 * round_ + i) for round_ in range(6) for i, shape in enumerate(SCRATCH_SHAPES)]

    def work(job: tuple[tuple[int, ...], int]) -> None:
        shape, seed = job
        feeds, spec = _session_feeds(norm, shape, seed=seed, out_fmt=FORMATS["own8"])
        check(norm, *spec, call(feeds))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, jobs))
