"""BlockGelu, BlockSilu, BlockSoftmax, BlockLayerNorm, BlockRMSNorm against bct_onnx.reference_nonlinear.

Tolerances, per output:
- Kernel vs the numpy spec: 0. Float outputs, codes, scales and zero points are compared as raw bits:
  the kernels evaluate exp/erf/tanh from the same float32 polynomials as the spec, in the same order.
- The spec's float path vs exact math (float64): exp within 1 ulp, erf 4e-7 and tanh 1.8e-7 absolute,
  GELU 2.5e-7 * max(|x|, 1), SiLU 2e-7 relative (3 ulp); softmax and the norms (D = 384) within 1e-5 relative to the magnitude of the
  terms summed.
- Codes of the compressed ops vs codes of exact math quantized the same way: at most 1 step apart,
  on at most 1% of the elements (only where the exact value sits next to a rounding boundary).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.special
from onnx import TensorProto, helper
from support import assert_bits_equal, run

import bct_onnx
from bct_onnx import block_format as bf
from bct_onnx import reference_nonlinear as ref
from bct_onnx.block_format import BlockFormat, QuantizedTensor, ScaleKind
from bct_onnx.ops import DOMAIN

ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
}

# (op type, spec function of (float x, rng-made extras) -> float y, extra input makers, attributes)
OPS = {
    "gelu": ("BlockGelu", {"approximate": "none"}),
    "gelu_tanh": ("BlockGelu", {"approximate": "tanh"}),
    "silu": ("BlockSilu", {}),
    "softmax": ("BlockSoftmax", {}),
    "layer_norm": ("BlockLayerNorm", {"epsilon": 1e-5}),
    "layer_norm_nobias": ("BlockLayerNorm", {"epsilon": 1e-3}),
    "rms_norm": ("BlockRMSNorm", {"epsilon": 1e-6}),
}


def extras_for(name: str, d: int, rng: np.random.Generator) -> list[np.ndarray | None]:
    """Op-specific inputs after the operand's three slots."""
    if name == "layer_norm":
        return [rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)]
    if name == "layer_norm_nobias":
        return [rng.standard_normal(d).astype(np.float32)]
    if name == "rms_norm":
        return [rng.standard_normal(d).astype(np.float32)]
    return []


def spec_float(name: str, x: np.ndarray, extras: list[np.ndarray | None]) -> np.ndarray:
    """The float32 compute step of the op, from the spec."""
    attrs = OPS[name][1]
    if name.startswith("gelu"):
        return ref.gelu(x, attrs["approximate"])
    if name == "silu":
        return ref.silu(x)
    if name == "softmax":
        return ref.softmax(x)
    if name.startswith("layer_norm"):
        return ref.layer_norm(x, extras[0], extras[1] if len(extras) > 1 else None, attrs["epsilon"])
    return ref.rms_norm(x, extras[0], attrs["epsilon"])


def exact_float(name: str, x: np.ndarray, extras: list[np.ndarray | None]) -> np.ndarray:
    """The same op in float64 with library functions (exact math for the tolerance checks)."""
    xd = x.astype(np.float64)
    eps = OPS[name][1].get("epsilon", 0.0)
    if name == "gelu":
        return 0.5 * xd * (1 + scipy.special.erf(xd / np.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * xd * (1 + np.tanh(np.sqrt(2 / np.pi) * (xd + 0.044715 * xd**3)))
    if name == "silu":
        return xd * scipy.special.expit(xd)
    if name == "softmax":
        e = np.exp(xd - xd.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    if name.startswith("layer_norm"):
        mu = xd.mean(-1, keepdims=True)
        y = (xd - mu) / np.sqrt(((xd - mu) ** 2).mean(-1, keepdims=True) + eps) * extras[0]
        return y + extras[1] if len(extras) > 1 else y
    return xd / np.sqrt((xd**2).mean(-1, keepdims=True) + eps) * extras[0]


# ---------------------------------------------------------------------------------------------
# Model building and running


def node_model(
    op_type: str,
    inputs: list[np.ndarray | None],
    n_outputs: int,
    node_name: str = "node",
    output_types: list[int] | None = None,
    **attrs: Any,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """One-node model; None inputs become empty names. Feeds keyed by input name."""
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    outs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, domain=DOMAIN, name=node_name, **attrs)
    in_info = [
        helper.make_tensor_value_info(n, ONNX_TYPES[v.dtype], [f"d{i}_{j}" for j in range(v.ndim)])
        for i, (n, v) in enumerate(zip(names, inputs, strict=True))
        if v is not None
    ]
    if output_types is None:
        out_info = [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
    else:
        out_info = [
            helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, output_types, strict=True)
        ]
    graph = helper.make_graph([node], "g", in_info, out_info)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    feeds = {n: v for n, v in zip(names, inputs, strict=True) if v is not None}
    return model.SerializeToString(), feeds


def operand_inputs(x: np.ndarray | QuantizedTensor) -> tuple[list[np.ndarray | None], dict[str, Any]]:
    """Inputs 0..2 and in_* attributes of an operand."""
    if isinstance(x, QuantizedTensor):
        f = x.fmt
        attrs = {
            "in_bits": f.bits,
            "in_block_size": f.block_size,
            "in_symmetric": int(f.symmetric),
            "in_axis_size": x.axis_size,
        }
        return [x.codes, x.scales, x.zero_points], attrs
    return [x, None, None], {}


def result_attrs(fmt: BlockFormat | None) -> tuple[int, dict[str, Any]]:
    """Number of outputs and out_* attributes of a result format."""
    if fmt is None:
        return 1, {}
    attrs = {
        "out_bits": fmt.bits,
        "out_block_size": fmt.block_size,
        "out_symmetric": int(fmt.symmetric),
        "out_scale_kind": fmt.scale_kind.value,
    }
    return (2 if fmt.symmetric else 3), attrs


def run_op(
    name: str,
    x: np.ndarray | QuantizedTensor,
    extras: list[np.ndarray | None],
    out_fmt: BlockFormat | None,
    providers: list[str] | None = None,
    **more: Any,
) -> list[np.ndarray]:
    op_type, attrs = OPS[name]
    inputs, in_attrs = operand_inputs(x)
    n_out, out_attrs = result_attrs(out_fmt)
    model, feeds = node_model(op_type, inputs + extras, n_out, **attrs, **in_attrs, **out_attrs, **more)
    return run(model, feeds, providers)


def check_against_spec(name: str, x, extras, out_fmt, outputs: list[np.ndarray]) -> None:
    y = spec_float(name, ref.load_operand(x), extras)
    expected = ref.store_result(y, out_fmt)
    if out_fmt is None:
        assert len(outputs) == 1
        assert_bits_equal(outputs[0], y, f"{name} Y")
        return
    assert_bits_equal(outputs[0], expected.codes, f"{name} codes")
    assert_bits_equal(outputs[1], expected.scales, f"{name} scales")
    if out_fmt.symmetric:
        assert len(outputs) == 2
    else:
        assert_bits_equal(outputs[2], expected.zero_points, f"{name} zero points")


def sample(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(2.5)
    x.reshape(-1)[::17] *= np.float32(6.0)  # some outliers
    return x


SHAPES = [(3, 77), (2, 3, 64), (1, 1), (5, 8)]
IN_FORMATS = [
    BlockFormat(4, 32, True, ScaleKind.FLOAT16),
    BlockFormat(3, 8, False, ScaleKind.POW2),
    BlockFormat(8, 16, True, ScaleKind.FLOAT32),
    BlockFormat(6, 5, False, ScaleKind.FLOAT16),
]
OUT_FORMATS = [
    BlockFormat(8, 32, False, ScaleKind.FLOAT16),
    BlockFormat(8, 32, True, ScaleKind.FLOAT16),
    BlockFormat(4, 16, True, ScaleKind.POW2),
    BlockFormat(2, 7, False, ScaleKind.FLOAT32),
    BlockFormat(5, 64, False, ScaleKind.POW2),
]


def fmt_id(f: BlockFormat | None) -> str:
    if f is None:
        return "float"
    return f"b{f.bits}-bs{f.block_size}-{'sym' if f.symmetric else 'asym'}-{f.scale_kind.value}"


# ---------------------------------------------------------------------------------------------
# The spec's own accuracy against exact math


def test_spec_transcendentals_accuracy() -> None:
    x = np.linspace(-87, 88, 400_001, dtype=np.float32)
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(ref.exp_f32(x) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.0
    x = np.linspace(-8, 8, 400_001, dtype=np.float32)
    xd = x.astype(np.float64)
    assert np.abs(ref.erf_f32(x) - scipy.special.erf(xd)).max() <= 4e-7
    assert np.abs(ref.tanh_f32(x) - np.tanh(xd)).max() <= 1.8e-7
    gelu_err = np.abs(ref.gelu(x) - exact_float("gelu", x, []))
    assert np.all(gelu_err <= 2.5e-7 * np.maximum(np.abs(xd), 1.0))
    assert ref.exp_f32(np.array([-90.0, -np.inf], np.float32)).tolist() == [0.0, 0.0]
    assert np.isnan(ref.exp_f32(np.array([np.nan], np.float32)))[0]


def test_spec_silu_accuracy_and_special_values() -> None:
    """x / (1 + exp_f32(-x)) is within 3 ulp (2e-7 relative) of x * sigmoid(x) over [-88, 100];
    below -88 (|exact| < 5.4e-37) it is -0, which also gives the limit 0 at -inf."""
    x = np.linspace(-88, 100, 2_000_001, dtype=np.float32)
    exact = exact_float("silu", x, [])
    got = ref.silu(x).astype(np.float64)
    assert np.all(np.abs(got - exact) <= 2e-7 * np.abs(exact))
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 3.0
    special = np.array([-np.inf, -1e30, -88.5, np.inf, 1e30, 0.0, -0.0, np.nan], np.float32)
    y = ref.silu(special)
    assert y[:7].tolist() == [0.0, 0.0, 0.0, np.inf, float(np.float32(1e30)), 0.0, 0.0]
    assert np.signbit(y[:3]).all() and np.signbit(y[6]) and not np.signbit(y[5])
    assert np.isnan(y[7])


@pytest.mark.parametrize("name", list(OPS))
def test_spec_float_path_vs_exact_math(name: str) -> None:
    rng = np.random.default_rng(1)
    x = sample((16, 384), seed=1)
    extras = extras_for(name, 384, rng)
    got = spec_float(name, x, extras).astype(np.float64)
    exact = exact_float(name, x, extras)
    if name.startswith("gelu"):
        tol = 2.5e-7 * np.maximum(np.abs(x), 1.0)
    elif name == "silu":
        tol = 2e-7 * np.abs(exact) + 1e-37
    else:  # row sums of n/8 terms per lane: about (n/8) * u relative (u = 6e-8) to the terms' magnitude
        xd = x.astype(np.float64)
        if name == "softmax":
            magnitude = np.abs(exact)
        else:
            eps = OPS[name][1]["epsilon"]
            mean = xd.mean(-1, keepdims=True) if name.startswith("layer_norm") else 0.0
            inv = 1 / np.sqrt(((xd - mean) ** 2).mean(-1, keepdims=True) + eps)
            magnitude = (np.abs(xd) + np.abs(mean)) * inv * np.abs(extras[0])
            if name == "layer_norm":
                magnitude = magnitude + np.abs(extras[1])
        tol = 1e-5 * magnitude + 1e-30
    assert np.all(np.abs(got - exact) <= tol), f"{name}: max err {np.abs(got - exact).max()}"


# ---------------------------------------------------------------------------------------------
# Kernels vs the spec, bit-exact


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(OPS))
def test_float_in_float_out(name: str, shape: tuple[int, ...]) -> None:
    x = sample(shape)
    extras = extras_for(name, shape[-1], np.random.default_rng(2))
    check_against_spec(name, x, extras, None, run_op(name, x, extras, None))


@pytest.mark.parametrize("in_fmt", IN_FORMATS, ids=fmt_id)
@pytest.mark.parametrize("name", list(OPS))
def test_quantized_in_float_out(name: str, in_fmt: BlockFormat) -> None:
    x = bf.quantize(sample((4, 96), seed=3), in_fmt)
    extras = extras_for(name, 96, np.random.default_rng(4))
    check_against_spec(name, x, extras, None, run_op(name, x, extras, None))


@pytest.mark.parametrize("out_fmt", OUT_FORMATS, ids=fmt_id)
@pytest.mark.parametrize("name", list(OPS))
def test_float_in_quantized_out(name: str, out_fmt: BlockFormat) -> None:
    x = sample((2, 3, 100), seed=5)
    extras = extras_for(name, 100, np.random.default_rng(6))
    check_against_spec(name, x, extras, out_fmt, run_op(name, x, extras, out_fmt))


@pytest.mark.parametrize("name", list(OPS))
def test_quantized_in_quantized_out(name: str) -> None:
    in_fmt = BlockFormat(5, 16, False, ScaleKind.FLOAT16)
    out_fmt = BlockFormat(8, 32, name in ("softmax", "silu") or name.startswith("gelu"), ScaleKind.FLOAT16)
    x = bf.quantize(sample((7, 72), seed=7), in_fmt)
    extras = extras_for(name, 72, np.random.default_rng(8))
    check_against_spec(name, x, extras, out_fmt, run_op(name, x, extras, out_fmt))


@pytest.mark.parametrize("name", list(OPS))
def test_baseline_cpu_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels created with BCT_ONNX_BASELINE_SIMD set run the loops compiled for baseline x86-64
    (what CPUs without AVX2 get from the ISA clones): same bits."""
    monkeypatch.setenv("BCT_ONNX_BASELINE_SIMD", "1")
    x = sample((5, 200), seed=18)
    extras = extras_for(name, 200, np.random.default_rng(19))
    check_against_spec(name, x, extras, None, run_op(name, x, extras, None))
    out_fmt = BlockFormat(8, 32, False, ScaleKind.FLOAT16)
    check_against_spec(name, x, extras, out_fmt, run_op(name, x, extras, out_fmt))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avxvnni", "avx512", "avx512vnni"])
@pytest.mark.parametrize("name", list(OPS))
def test_isa_paths(name: str, isa: str, force_isa: Any) -> None:
    """BCT_ONNX_ISA (read when a kernel is created) forces the dequantize / quantize row loops' path
    (scalar/SSE2, AVX2, AVX-512; a path the CPU lacks is skipped): same bits on partial blocks, 1-element and odd
    rows, one row and many rows, 4-, 8- and 3-bit operands."""
    force_isa(isa)
    for shape, in_fmt, out_fmt in (
        ((1, 71), BlockFormat(8, 32, True, ScaleKind.FLOAT16), BlockFormat(8, 32, False, ScaleKind.FLOAT16)),
        (
            (300, 71),
            BlockFormat(8, 32, False, ScaleKind.FLOAT16),
            BlockFormat(8, 32, True, ScaleKind.FLOAT32),
        ),
        ((9, 384), BlockFormat(4, 32, True, ScaleKind.POW2), BlockFormat(4, 32, True, ScaleKind.FLOAT16)),
        ((7, 45), BlockFormat(3, 16, False, ScaleKind.FLOAT32), BlockFormat(5, 17, False, ScaleKind.POW2)),
        ((4, 1), BlockFormat(8, 32, True, ScaleKind.FLOAT32), BlockFormat(4, 32, False, ScaleKind.FLOAT16)),
        ((70, 40), BlockFormat(8, 16, False, ScaleKind.POW2), BlockFormat(8, 16, False, ScaleKind.POW2)),
    ):
        x = sample(shape, seed=shape[0] + shape[1])
        extras = extras_for(name, shape[-1], np.random.default_rng(shape[1]))
        check_against_spec(name, x, extras, out_fmt, run_op(name, x, extras, out_fmt))
        q = bf.quantize(x, in_fmt)
        check_against_spec(name, q, extras, out_fmt, run_op(name, q, extras, out_fmt))
        check_against_spec(name, q, extras, None, run_op(name, q, extras, None))


def test_derived_axis_size() -> None:
    """in_axis_size=0: D = row_bytes * 8 / bits when that divides exactly."""
    fmt = BlockFormat(4, 8, True, ScaleKind.FLOAT16)
    q = bf.quantize(sample((3, 40)), fmt)
    model, feeds = node_model("BlockSoftmax", [q.codes, q.scales, None], 1, in_bits=4, in_block_size=8)
    assert_bits_equal(run(model, feeds)[0], ref.block_softmax(q), "softmax Y")


@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(OPS))
def test_empty_rows(name: str, shape: tuple[int, ...]) -> None:
    x = np.zeros(shape, np.float32)
    extras = extras_for(name, shape[-1], np.random.default_rng(0))
    (y,) = run_op(name, x, extras, None)
    assert y.shape == shape and y.dtype == np.float32
    codes, scales, zero_points = run_op(name, x, extras, BlockFormat(4, 8, False, ScaleKind.FLOAT16))
    assert codes.shape == shape[:-1] + (8,) and scales.shape == shape[:-1] + (2,)
    assert zero_points.shape == scales.shape


def test_special_values() -> None:
    x = np.array([[0.0, -0.0, 1e-30, -1e30, 1e30, 3.0, -np.inf, 0.5]], np.float32)
    for name in ("gelu", "gelu_tanh", "silu", "softmax"):
        check_against_spec(name, x, [], None, run_op(name, x, [], None))
    zeros = np.array([[-0.0] * 11, [0.0] * 11], np.float32)  # signs of zero survive the lane sums
    extras = [np.full(11, -2.0, np.float32)]
    check_against_spec(
        "layer_norm_nobias", zeros, extras, None, run_op("layer_norm_nobias", zeros, extras, None)
    )
    check_against_spec("rms_norm", zeros, extras, None, run_op("rms_norm", zeros, extras, None))
    masked = np.array([[1.0, -np.inf, 2.0, -np.inf]], np.float32)  # attention mask
    y = run_op("softmax", masked, [], None)[0]
    assert y[0, 1] == 0.0 and y[0, 3] == 0.0


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avxvnni", "avx512", "avx512vnni"])
def test_gelu_special_values_in_whole_vectors(isa: str, force_isa: Any) -> None:
    """GELU's row functions, in whole vectors of 16 and 64 and in tails: signed zeros, infinities, huge
    and subnormal values and the values around erf's clamps (|x / sqrt 2| = 4 at |x| = 5.66; the
    rational part reaches 1 from |x| = 5.2), in rows of 64 with and without a NaN, give the spec's
    bits on every path (a NaN where the spec has a NaN: NaN payloads differ from numpy's on every
    path)."""
    force_isa(isa)
    rng = np.random.default_rng(23)
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, 1e30, -1e30, 1e-40, -1e-40, 1.4e-45, -1.4e-45, 3.0, -3.0], np.float32
    )
    near_clamp = np.linspace(5.0, 5.9, 26, dtype=np.float32)
    row = np.concatenate([special, near_clamp, -near_clamp]).astype(np.float32)
    x = np.stack([row, row, rng.standard_normal(64).astype(np.float32) * 8])
    x[1, 37] = np.float32("nan")
    x[2, 5] = -np.float32("nan")
    out_fmt = BlockFormat(8, 32, True, ScaleKind.FLOAT32)
    for name in ("gelu", "gelu_tanh"):
        y = spec_float(name, x, [])
        expected = ref.store_result(y, out_fmt)
        outputs = run_op(name, x, [], None) + run_op(name, x, [], out_fmt)
        for got, want, what in zip(outputs, (y, expected.codes, expected.scales), ("Y", "codes", "scales")):
            nan = np.isnan(want)
            assert np.array_equal(np.isnan(got), nan), f"{name} {what}: NaN positions"
            assert_bits_equal(np.where(nan, 0, got), np.where(nan, 0, want), f"{name} {what}")


@pytest.mark.parametrize("name", ["gelu", "silu", "softmax", "layer_norm", "rms_norm"])
def test_codes_vs_exact_math_within_one_step(name: str) -> None:
    """The polynomial math moves codes of exact math by at most one step, rarely."""
    out_fmt = BlockFormat(8, 32, name != "layer_norm" and name != "rms_norm", ScaleKind.FLOAT32)
    x = sample((64, 256), seed=9)
    extras = extras_for(name, 256, np.random.default_rng(10))
    codes = run_op(name, x, extras, out_fmt)[0]
    exact = bf.quantize(exact_float(name, x, extras).astype(np.float32), out_fmt)
    diff = np.abs(
        bf.unpack_codes(codes, 8, 256).astype(int) - bf.unpack_codes(exact.codes, 8, 256).astype(int)
    )
    assert diff.max() <= 1
    assert np.mean(diff > 0) <= 0.01


def test_large_rows_parallel() -> None:
    """Enough rows to split over threads; every row still matches."""
    x = sample((513, 384), seed=11)
    extras = extras_for("layer_norm", 384, np.random.default_rng(12))
    fmt = BlockFormat(8, 32, True, ScaleKind.FLOAT16)
    check_against_spec("layer_norm", x, extras, fmt, run_op("layer_norm", x, extras, fmt))


# ---------------------------------------------------------------------------------------------
# Chains: intermediates stay compressed


def test_chain_layer_norm_q8_then_dequantize() -> None:
    d = 128
    x = sample((6, d), seed=13)
    rng = np.random.default_rng(14)
    scale, bias = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    nodes = [
        helper.make_node(
            "BlockLayerNorm",
            ["x", "", "", "scale", "bias"],
            ["c", "s"],
            domain=DOMAIN,
            name="ln",
            epsilon=1e-5,
            out_bits=8,
            out_block_size=32,
            out_symmetric=1,
            out_scale_kind="float16",
        ),
        helper.make_node(
            "BlockDequantize",
            ["c", "s"],
            ["y"],
            domain=DOMAIN,
            name="dq",
            bits=8,
            block_size=32,
            symmetric=1,
            axis_size=d,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            onnx.numpy_helper.from_array(scale, "scale"),
            onnx.numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    (y,) = run(model.SerializeToString(), {"x": x})
    fmt = BlockFormat(8, 32, True, ScaleKind.FLOAT16)
    expected = bf.dequantize(ref.block_layer_norm(x, scale, bias, 1e-5, fmt))
    assert_bits_equal(y, expected, "LayerNorm(q8) -> BlockDequantize")
    # Accuracy of the compressed intermediate against the float op: within half a step per block.
    float_y = ref.layer_norm(x, scale, bias, 1e-5)
    step = np.abs(bf.scales_to_float32(bf.quantize(float_y, fmt).scales, fmt.scale_kind))
    assert np.all(np.abs(y - float_y) <= np.repeat(step, 32, axis=-1)[..., :d] * 0.5 + 1e-6)


def test_chain_gelu_softmax_all_compressed() -> None:
    """Gelu(in q4, out q8 asym) -> Softmax(in q8 asym, out q8 asym): codes flow between the ops."""
    d = 64
    x_fmt = BlockFormat(4, 32, True, ScaleKind.FLOAT16)
    mid = BlockFormat(8, 32, False, ScaleKind.FLOAT16)
    out = BlockFormat(8, 16, False, ScaleKind.POW2)
    xq = bf.quantize(sample((5, d), seed=15), x_fmt)
    nodes = [
        helper.make_node(
            "BlockGelu",
            ["c", "s", ""],
            ["gc", "gs", "gz"],
            domain=DOMAIN,
            name="gelu",
            in_bits=4,
            in_block_size=32,
            in_axis_size=d,
            out_bits=8,
            out_block_size=32,
            out_symmetric=0,
            out_scale_kind="float16",
        ),
        helper.make_node(
            "BlockSoftmax",
            ["gc", "gs", "gz"],
            ["yc", "ys", "yz"],
            domain=DOMAIN,
            name="softmax",
            in_bits=8,
            in_block_size=32,
            in_symmetric=0,
            in_axis_size=d,
            out_bits=8,
            out_block_size=16,
            out_symmetric=0,
            out_scale_kind="pow2",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [
            helper.make_tensor_value_info("c", TensorProto.UINT8, ["n", d // 2]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT16, ["n", 2]),
        ],
        [helper.make_value_info(n, onnx.TypeProto()) for n in ("yc", "ys", "yz")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    yc, ys, yz = run(model.SerializeToString(), {"c": xq.codes, "s": xq.scales})
    expected = ref.block_softmax(ref.block_gelu(xq, "none", mid), out)
    assert_bits_equal(yc, expected.codes, "codes")
    assert_bits_equal(ys, expected.scales, "scales")
    assert_bits_equal(yz, expected.zero_points, "zero points")


def test_inferred_output_types() -> None:
    """Output dtypes follow out_bits / out_scale_kind (ONNX Runtime learns them from our inference)."""
    x = sample((2, 64))
    for fmt, types in [
        (None, ["tensor(float)"]),
        (BlockFormat(4, 32, True, ScaleKind.POW2), ["tensor(uint8)", "tensor(uint8)"]),
        (BlockFormat(8, 32, False, ScaleKind.FLOAT16), ["tensor(uint8)", "tensor(float16)", "tensor(uint8)"]),
        (BlockFormat(8, 32, True, ScaleKind.FLOAT32), ["tensor(uint8)", "tensor(float)"]),
    ]:
        n_out, attrs = result_attrs(fmt)
        model, _ = node_model("BlockSoftmax", [x, None, None], n_out, **attrs)
        sess = bct_onnx.session(model)
        assert [o.type for o in sess.get_outputs()] == types


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the node and the culprit


def expect_error(
    model: bytes, feeds: dict[str, np.ndarray], op_type: str, node_name: str, *fragments: str
) -> None:
    with pytest.raises(Exception) as info:
        run(model, feeds)
    message = str(info.value)
    prefix = f"bct_onnx {op_type} node '{node_name}': "
    assert prefix in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_attributes() -> None:
    x = sample((2, 16))
    cases = [
        ({"in_bits": 9, "in_block_size": 8}, "'in_bits'"),
        ({"out_bits": 1, "out_block_size": 8}, "'out_bits'"),
        ({"in_bits": 4}, "'in_block_size'"),
        ({"out_bits": 4, "out_block_size": 0}, "'out_block_size'"),
        ({"out_bits": 4, "out_block_size": 8, "out_scale_kind": "bfloat16"}, "'out_scale_kind'"),
        ({"out_symmetric": 2}, "'out_symmetric'"),
        ({"axis": 0}, "'axis'"),
    ]
    for attrs, fragment in cases:
        model, feeds = node_model("BlockSoftmax", [x, None, None], 1, node_name="sm", **attrs)
        expect_error(model, feeds, "BlockSoftmax", "sm", fragment)
    model, feeds = node_model("BlockGelu", [x], 1, node_name="g", approximate="fast")
    expect_error(model, feeds, "BlockGelu", "g", "'approximate'")
    for attrs, fragment in cases[:6]:
        model, feeds = node_model("BlockSilu", [x, None, None], 1, node_name="silu", **attrs)
        expect_error(model, feeds, "BlockSilu", "silu", fragment)
    model, feeds = node_model(
        "BlockLayerNorm", [x, None, None, np.ones(16, np.float32)], 1, node_name="ln", epsilon=-1.0
    )
    expect_error(model, feeds, "BlockLayerNorm", "ln", "'epsilon'")


def test_bad_inputs() -> None:
    x = sample((2, 16))
    q = bf.quantize(x, BlockFormat(4, 8, False, ScaleKind.FLOAT16))
    qs = bf.quantize(x, BlockFormat(3, 8, True, ScaleKind.FLOAT16))
    ln = "BlockLayerNorm"
    cases: list[tuple[str, list[Any], dict[str, Any], tuple[str, ...]]] = [
        (ln, [x, None, None, np.ones(15, np.float32)], {}, ("input 'scale'", "[16]")),
        (ln, [x, None, None, np.ones(16, np.float32), np.ones(8, np.float32)], {}, ("input 'bias'",)),
        (ln, [x, None, None, np.ones(16, np.float16)], {}, ("input 'scale'", "float32")),
        (ln, [x.astype(np.float16), None, None, np.ones(16, np.float32)], {}, ("input 'X'", "float32")),
        ("BlockRMSNorm", [x, None, None, np.ones((1, 16), np.float32)], {}, ("input 'scale'",)),
        ("BlockSilu", [x.astype(np.float16), None, None], {}, ("input 'X'", "float32")),
        (
            "BlockSilu",
            [q.codes, q.scales, None],
            {"in_bits": 4, "in_block_size": 8, "in_symmetric": 0, "in_axis_size": 16},
            ("'X_zero_points'", "required"),
        ),
        ("BlockSilu", [x, np.ones((2, 2), np.float16), None], {}, ("'X_scales'", "in_bits=0")),
        # zero points missing although in_symmetric=0
        (
            "BlockSoftmax",
            [q.codes, q.scales, None],
            {"in_bits": 4, "in_block_size": 8, "in_symmetric": 0, "in_axis_size": 16},
            ("'X_zero_points'", "required"),
        ),
        # zero points given although symmetric
        (
            "BlockSoftmax",
            [q.codes, q.scales, q.zero_points],
            {"in_bits": 4, "in_block_size": 8, "in_axis_size": 16},
            ("'X_zero_points'", "absent"),
        ),
        # scales with the wrong number of blocks
        (
            "BlockSoftmax",
            [q.codes, q.scales[:, :1], q.zero_points],
            {"in_bits": 4, "in_block_size": 8, "in_symmetric": 0, "in_axis_size": 16},
            ("'X_scales'", "shape"),
        ),
        # codes that do not match in_axis_size
        (
            "BlockSoftmax",
            [q.codes, q.scales, q.zero_points],
            {"in_bits": 4, "in_block_size": 8, "in_symmetric": 0, "in_axis_size": 20},
            ("input 'X'", "row_bytes"),
        ),
        # D cannot be derived: 6 bytes = 48 bits is a multiple of 3, 16 codes of 3 bits take 6 bytes -> ok;
        # use 7 bytes (56 bits) instead
        (
            "BlockSoftmax",
            [np.zeros((2, 7), np.uint8), np.ones((2, 3), np.float16), None],
            {"in_bits": 3, "in_block_size": 8},
            ("'in_axis_size'",),
        ),
        # float scales of a quantized input of the wrong dtype
        (
            "BlockSoftmax",
            [qs.codes, qs.scales.astype(np.int64), None],
            {"in_bits": 3, "in_block_size": 8, "in_axis_size": 16},
            ("'X_scales'",),
        ),
        # float input with scales given
        ("BlockSoftmax", [x, np.ones((2, 2), np.float16), None], {}, ("'X_scales'", "in_bits=0")),
        # quantized input that is not uint8
        (
            "BlockSoftmax",
            [x, np.ones((2, 2), np.float16), None],
            {"in_bits": 4, "in_block_size": 8},
            ("input 'X'", "uint8"),
        ),
    ]
    for i, (op_type, inputs, attrs, fragments) in enumerate(cases):
        name = f"bad{i}"
        model, feeds = node_model(op_type, inputs, 1, node_name=name, **attrs)
        expect_error(model, feeds, op_type, name, *fragments)


def test_bad_outputs() -> None:
    x = sample((2, 16))
    # out_symmetric=0 without the zero points output
    model, feeds = node_model(
        "BlockSoftmax", [x, None, None], 2, node_name="o1", out_bits=8, out_block_size=8, out_symmetric=0
    )
    expect_error(model, feeds, "BlockSoftmax", "o1", "'Y_zero_points'")
    # out_bits > 0 without the scales output
    model, feeds = node_model(
        "BlockSoftmax", [x, None, None], 1, node_name="o2", out_bits=8, out_block_size=8
    )
    expect_error(model, feeds, "BlockSoftmax", "o2", "'Y_scales'")
    # out_bits = 0 with a scales output
    model, feeds = node_model("BlockSoftmax", [x, None, None], 2, node_name="o3")
    expect_error(model, feeds, "BlockSoftmax", "o3", "'Y_scales'", "absent")


# ---------------------------------------------------------------------------------------------
# CUDA


def _cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers() and _has_gpu()


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU / onnxruntime-gpu here: CUDA kernels not run")
@pytest.mark.parametrize("name", list(OPS))
def test_cuda_matches_spec(name: str) -> None:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    x = sample((9, 200), seed=16)
    extras = extras_for(name, 200, np.random.default_rng(17))
    check_against_spec(name, x, extras, None, run_op(name, x, extras, None, providers))
    q = bf.quantize(x, BlockFormat(5, 16, False, ScaleKind.FLOAT16))
    out_fmt = BlockFormat(8, 32, False, ScaleKind.POW2)
    check_against_spec(name, q, extras, out_fmt, run_op(name, q, extras, out_fmt, providers))
