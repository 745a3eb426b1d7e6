"""BlockActMatMul (activation x activation, both quantized along K at run time) against the spec.

Tolerances, per output:
- Kernel vs bct_onnx.reference_nonlinear.act_matmul (and its quantized-output form): 0, compared as
  raw bits. Integer block dot products are exact and the float32 accumulation runs in block order in
  both, so there is nothing to tolerate.
- The spec vs the float64 product of the fake-quantized operands A' x B': within 1e-6 relative to
  sum_k |a'_k| |b'_k| (float32 roundings of the per-block scaling and accumulation).
- The spec vs the float product A x B: within sum_k (|a_k - a'_k| |b'_k| + |a_k| |b_k - b'_k|), the
  quantization error itself (computed from the data, plus the float slack above).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
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
    np.dtype(np.int32): TensorProto.INT32,
}


def node_model(
    inputs: list[np.ndarray | None],
    n_outputs: int,
    node_name: str = "amm",
    static_shapes: bool = False,
    **attrs: Any,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """One BlockActMatMul node; None inputs become empty names."""
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    outs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node("BlockActMatMul", names, outs, domain=DOMAIN, name=node_name, **attrs)
    in_info = [
        helper.make_tensor_value_info(
            n, ONNX_TYPES[v.dtype], list(v.shape) if static_shapes else [f"d{i}_{j}" for j in range(v.ndim)]
        )
        for i, (n, v) in enumerate(zip(names, inputs, strict=True))
        if v is not None
    ]
    out_info = [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
    graph = helper.make_graph([node], "g", in_info, out_info)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return model.SerializeToString(), {n: v for n, v in zip(names, inputs, strict=True) if v is not None}


def run_amm(
    a: np.ndarray | QuantizedTensor,
    b: np.ndarray,
    act_bits: int,
    block_size: int,
    transpose_b: bool = False,
    out_fmt: BlockFormat | None = None,
    providers: list[str] | None = None,
) -> list[np.ndarray]:
    attrs: dict[str, Any] = {"act_bits": act_bits, "block_size": block_size, "transpose_b": int(transpose_b)}
    if isinstance(a, QuantizedTensor):
        f = a.fmt
        inputs = [a.codes, a.scales, a.zero_points, b]
        attrs.update(
            in_bits=f.bits,
            in_block_size=f.block_size,
            in_symmetric=int(f.symmetric),
            in_axis_size=a.axis_size,
        )
    else:
        inputs = [a, None, None, b]
    n_out = 1
    if out_fmt is not None:
        attrs.update(
            out_bits=out_fmt.bits,
            out_block_size=out_fmt.block_size,
            out_symmetric=int(out_fmt.symmetric),
            out_scale_kind=out_fmt.scale_kind.value,
        )
        n_out = 2 if out_fmt.symmetric else 3
    model, feeds = node_model(inputs, n_out, **attrs)
    return run(model, feeds, providers)


def sample(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::13] *= np.float32(8.0)
    return x


CASES = [
    # A shape, B shape, act_bits, block_size
    ((5, 64), (64, 7), 8, 32),
    ((2, 3, 9, 40), (3, 40, 6), 8, 16),  # batch broadcast against a lower-rank B, partial block
    ((1, 4, 33), (2, 33, 5), 4, 32),  # A batch 1 broadcast
    ((2, 1, 3, 20), (1, 5, 20, 4), 3, 7),  # both broadcast, odd block
    ((4, 128), (128, 4), 2, 128),
    ((3, 17), (17, 1), 6, 5),
    ((2, 12, 16, 64), (2, 12, 64, 16), 8, 32),  # attention-like Q x K^T (B given as K^T)
    ((2, 37, 40), (2, 40, 19), 8, 16),  # M = 37: groups of 16 rows, then 4 + 1; N = 19 (partial tile)
]


def case_id(case: tuple[Any, ...]) -> str:
    a, b, bits, bs = case
    return f"{'x'.join(map(str, a))}@{'x'.join(map(str, b))}-b{bits}-bs{bs}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float_operands(case: tuple[Any, ...]) -> None:
    a_shape, b_shape, bits, bs = case
    a, b = sample(a_shape, 1), sample(b_shape, 2)
    (y,) = run_amm(a, b, bits, bs)
    assert_bits_equal(y, ref.act_matmul(a, b, bits, bs), "Y")
    assert y.shape == np.matmul(a, b).shape


@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_generic_cpu_path(case: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """BCT_ONNX_BASELINE_SIMD (read when a kernel is created) turns the AVX-512 VNNI dots off."""
    monkeypatch.setenv("BCT_ONNX_BASELINE_SIMD", "1")
    a_shape, b_shape, bits, bs = case
    a, b = sample(a_shape, 1), sample(b_shape, 2)
    (y,) = run_amm(a, b, bits, bs)
    assert_bits_equal(y, ref.act_matmul(a, b, bits, bs), "Y")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avxvnni", "avx512", "avx512vnni"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_isa_paths(case: tuple[Any, ...], isa: str, force_isa: Any) -> None:
    """BCT_ONNX_ISA forces the row-quantization path (scalar/SSE2, AVX2, AVX-512), with and without
    transpose_b, float and quantized A and Y: same bits."""
    force_isa(isa)
    a_shape, b_shape, bits, bs = case
    a, b = sample(a_shape, 5), sample(b_shape, 6)
    (y,) = run_amm(a, b, bits, bs)
    assert_bits_equal(y, ref.act_matmul(a, b, bits, bs), "Y")
    bt = np.ascontiguousarray(np.swapaxes(b, -1, -2))
    (y,) = run_amm(a, bt, bits, bs, transpose_b=True)
    assert_bits_equal(y, ref.act_matmul(a, b, bits, bs), "Y (transpose_b)")
    qa = bf.quantize(a, BlockFormat(8, 16, False, ScaleKind.FLOAT16))
    out_fmt = BlockFormat(8, 32, False, ScaleKind.FLOAT16)
    outputs = run_amm(qa, b, bits, bs, out_fmt=out_fmt)
    expected = ref.block_act_matmul(qa, b, bits, bs, out_fmt=out_fmt)
    assert_bits_equal(outputs[0], expected.codes, "codes (quantized A and Y)")
    assert_bits_equal(outputs[1], expected.scales, "scales (quantized A and Y)")
    assert_bits_equal(outputs[2], expected.zero_points, "zero points (quantized A and Y)")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
def test_whole_blocks_of_32_hard_rows(isa: str, force_isa: Any) -> None:
    """8-bit operands in whole blocks of 32 (the AVX-512 quantizer's saturating-pack path and its code
    sums): ties between +m and -m, blocks whose float32 scale is subnormal (infinite inverse) or 0,
    huge and one-signed blocks, on every forced path: the spec's bits."""
    force_isa(isa)
    rng = np.random.default_rng(31)
    a = rng.standard_normal((12, 128)).astype(np.float32)
    a[1] *= np.float32(1e-44)  # subnormal values: scale m * -2**-7 rounds (inverse infinite or 0)
    a[2] *= np.float32(1e-39)
    a[3] = 0.0
    a[4] *= np.float32(1e30)
    a[5] = np.abs(a[5])
    for b in range(4):  # rows 6..11: +m and -m both the largest magnitude, either first
        for r in range(6, 12):
            first, second = np.sort(rng.choice(32, 2, replace=False))
            sign = np.float32(1.0 if (r + b) % 2 else -1.0)
            a[r, b * 32 + first], a[r, b * 32 + second] = 4 * sign, -4 * sign
    w = sample((128, 24), 3)
    (y,) = run_amm(a, w, 8, 32)
    assert_bits_equal(y, ref.act_matmul(a, w, 8, 32), "Y")
    (y,) = run_amm(w.T.copy(), a.T.copy(), 8, 32)  # the hard rows as B's columns
    assert_bits_equal(y, ref.act_matmul(w.T.copy(), a.T.copy(), 8, 32), "Y (hard columns of B)")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_transpose_b(case: tuple[Any, ...]) -> None:
    a_shape, b_shape, bits, bs = case
    a = sample(a_shape, 3)
    bt = np.ascontiguousarray(np.swapaxes(sample(b_shape, 4), -1, -2))
    (y,) = run_amm(a, bt, bits, bs, transpose_b=True)
    assert_bits_equal(y, ref.act_matmul(a, bt, bits, bs, transpose_b=True), "Y")
    # Same quantized operands as without transpose_b: same result bits.
    assert_bits_equal(y, ref.act_matmul(a, np.swapaxes(bt, -1, -2), bits, bs), "Y vs untransposed")


@pytest.mark.parametrize(
    "shapes", [((0, 8), (8, 3)), ((2, 0, 8), (8, 3)), ((3, 8), (8, 0))], ids=["m0", "batch-m0", "n0"]
)
def test_empty_operands(shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    a, b = np.ones(shapes[0], np.float32), np.ones(shapes[1], np.float32)
    (y,) = run_amm(a, b, 8, 4)
    assert y.shape == np.matmul(a, b).shape and y.dtype == np.float32


@pytest.mark.parametrize("transpose_b", [False, True])
def test_nan_poisons_only_its_outputs(transpose_b: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN makes the outputs its block feeds NaN (NaN bits may differ); every other output is exact."""
    a, b = sample((2, 5, 40), 20), sample((2, 40, 7), 21)
    a[0, 1, 3] = np.nan
    b[1, 30, 2] = np.nan
    b_in = np.ascontiguousarray(np.swapaxes(b, -1, -2)) if transpose_b else b
    with np.errstate(invalid="ignore"):  # the spec casts NaN codes
        expected = ref.act_matmul(a, b, 8, 16)
    for baseline in ("0", "1"):
        monkeypatch.setenv("BCT_ONNX_BASELINE_SIMD", baseline)
        (y,) = run_amm(a, b_in, 8, 16, transpose_b=transpose_b)
        assert np.array_equal(np.isnan(y), np.isnan(expected))
        finite = ~np.isnan(expected)
        assert_bits_equal(y[finite], expected[finite], f"finite outputs (baseline={baseline})")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_block_at_the_size_limit(transpose_b: bool, isa: str, force_isa: Any) -> None:
    """block_size = 65536 (the maximum), all-ones operands: every code is -128, the block dot product is
    65536 * 2**14 = 2**30, exact in int32; Y = 65536 (2**31 at twice this size wrapped to -131072)."""
    force_isa(isa)
    k = 65536
    a = np.ones((1, 2, k), np.float32)
    b = np.ones((1, 3, k) if transpose_b else (1, k, 3), np.float32)
    (y,) = run_amm(a, b, 8, k, transpose_b=transpose_b)
    assert_bits_equal(y, np.full((1, 2, 3), k, np.float32), f"Y (isa={isa})")
    assert_bits_equal(y, ref.act_matmul(a, b, 8, k, transpose_b), "the spec")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_infinity_poisons_its_outputs_with_nan(transpose_b: bool, isa: str, force_isa: Any) -> None:
    """An infinity in A or B makes every output its block feeds NaN (docs/ops.md), like a NaN."""
    force_isa(isa)
    a, b = sample((2, 5, 40), 22), sample((2, 40, 7), 23)
    a[0, 1, 3] = np.inf
    a[1, 4, 39] = -np.inf
    b[1, 30, 2] = -np.inf
    b_in = np.ascontiguousarray(np.swapaxes(b, -1, -2)) if transpose_b else b
    expected = ref.act_matmul(a, b, 8, 16)
    assert (
        np.isnan(expected[0, 1]).all()
        and np.isnan(expected[1, :, 2]).all()
        and np.isnan(expected[1, 4]).all()
    )
    (y,) = run_amm(a, b_in, 8, 16, transpose_b=transpose_b)
    assert np.array_equal(np.isnan(y), np.isnan(expected)), f"isa={isa}"
    finite = ~np.isnan(expected)
    assert_bits_equal(y[finite], expected[finite], f"finite outputs (isa={isa})")


@pytest.mark.parametrize(
    "in_fmt",
    [BlockFormat(4, 16, False, ScaleKind.POW2), BlockFormat(8, 32, True, ScaleKind.FLOAT16)],
    ids=lambda f: f"in-b{f.bits}-{'sym' if f.symmetric else 'asym'}-{f.scale_kind.value}",
)
def test_quantized_a(in_fmt: BlockFormat) -> None:
    a = bf.quantize(sample((2, 6, 48), 5), in_fmt)
    b = sample((48, 10), 6)
    (y,) = run_amm(a, b, 8, 16)
    assert_bits_equal(y, ref.block_act_matmul(a, b, 8, 16), "Y")


@pytest.mark.parametrize(
    "out_fmt",
    [
        BlockFormat(8, 16, True, ScaleKind.FLOAT16),
        BlockFormat(8, 32, False, ScaleKind.POW2),
        BlockFormat(4, 5, False, ScaleKind.FLOAT32),
    ],
    ids=lambda f: f"out-b{f.bits}-bs{f.block_size}-{'sym' if f.symmetric else 'asym'}",
)
def test_quantized_output(out_fmt: BlockFormat) -> None:
    a, b = sample((3, 7, 32), 7), sample((32, 40), 8)
    outputs = run_amm(a, b, 8, 32, out_fmt=out_fmt)
    expected = ref.block_act_matmul(a, b, 8, 32, out_fmt=out_fmt)
    assert_bits_equal(outputs[0], expected.codes, "codes")
    assert_bits_equal(outputs[1], expected.scales, "scales")
    if out_fmt.symmetric:
        assert len(outputs) == 2
    else:
        assert_bits_equal(outputs[2], expected.zero_points, "zero points")


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_spec_accuracy(bits: int) -> None:
    """The integer-dot formulation equals the fake-quantized product; its error vs float is bounded."""
    a, b = sample((4, 16, 96), 9), sample((4, 96, 24), 10)
    bs = 32
    y = ref.act_matmul(a, b, bits, bs).astype(np.float64)
    fmt = BlockFormat(bits, bs, True, ScaleKind.FLOAT32)
    af = bf.fake_quantize(a, fmt).astype(np.float64)
    bf_t = bf.fake_quantize(np.swapaxes(b, -1, -2), fmt).astype(np.float64)
    bq = np.swapaxes(bf_t, -1, -2)
    exact_q = af @ bq
    mag_q = np.abs(af) @ np.abs(bq)
    assert np.all(np.abs(y - exact_q) <= 1e-6 * mag_q + 1e-30)
    ad, bd = a.astype(np.float64), b.astype(np.float64)
    quant_err = np.abs(ad - af) @ np.abs(bq) + np.abs(ad) @ np.abs(bd - bq)
    assert np.all(np.abs(y - ad @ bd) <= quant_err + 1e-6 * mag_q + 1e-30)


def test_attention_chain_all_compressed() -> None:
    """Q K^T (out 8-bit) -> Softmax (in and out 8-bit asym) -> P V: scores and probabilities stay codes."""
    s, dh = 24, 32
    q = sample((2, 4, s, dh), 11) * np.float32(dh**-0.5)  # the 1/sqrt(dh) of attention, folded into Q
    k, v = sample((2, 4, s, dh), 12), sample((2, 4, s, dh), 13)
    scores_fmt = BlockFormat(8, 32, True, ScaleKind.FLOAT16)
    probs_fmt = BlockFormat(8, 32, False, ScaleKind.FLOAT16)
    nodes = [
        helper.make_node(
            "BlockActMatMul",
            ["q", "", "", "k"],
            ["sc", "ss"],
            domain=DOMAIN,
            name="qk",
            act_bits=8,
            block_size=32,
            transpose_b=1,
            out_bits=8,
            out_block_size=32,
        ),
        helper.make_node(
            "BlockSoftmax",
            ["sc", "ss", ""],
            ["pc", "ps", "pz"],
            domain=DOMAIN,
            name="softmax",
            in_bits=8,
            in_block_size=32,
            in_axis_size=s,
            out_bits=8,
            out_block_size=32,
            out_symmetric=0,
        ),
        helper.make_node(
            "BlockActMatMul",
            ["pc", "ps", "pz", "v"],
            ["y"],
            domain=DOMAIN,
            name="pv",
            act_bits=8,
            block_size=32,
            in_bits=8,
            in_block_size=32,
            in_symmetric=0,
            in_axis_size=s,
        ),
    ]
    dims = ["b", "h", "s", dh]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("q", "k", "v")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    (y,) = run(model.SerializeToString(), {"q": q, "k": k, "v": v})
    scores = ref.block_act_matmul(q, k, 8, 32, transpose_b=True, out_fmt=scores_fmt)
    probs = ref.block_softmax(scores, out_fmt=probs_fmt)
    expected = ref.block_act_matmul(probs, v, 8, 32)
    assert_bits_equal(y, expected, "attention output")
    # Against float attention: with 8-bit scores, probabilities and operands the output is within 2.6%
    # (relative L2); 2.55% of that comes from the 8-bit operands of the two matmuls alone (the data has
    # x8 outliers every 13th element).
    logits = q.astype(np.float64) @ np.swapaxes(k, -1, -2)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    float_y = p @ v
    rel = np.linalg.norm(y - float_y) / np.linalg.norm(float_y)
    assert rel < 0.03, rel


def test_inferred_output_shape_and_types() -> None:
    a, b = sample((2, 1, 3, 20), 1), sample((5, 20, 4), 2)
    model, _ = node_model(
        [a, None, None, b],
        3,
        static_shapes=True,
        act_bits=8,
        block_size=8,
        out_bits=4,
        out_block_size=4,
        out_symmetric=0,
        out_scale_kind="pow2",
    )
    outs = bct_onnx.session(model).get_outputs()
    assert [o.type for o in outs] == ["tensor(uint8)", "tensor(uint8)", "tensor(uint8)"]
    assert [o.shape for o in outs] == [[2, 5, 3, 2], [2, 5, 3, 1], [2, 5, 3, 1]]
    model, _ = node_model([a, None, None, b], 1, static_shapes=True, act_bits=8, block_size=8)
    (out,) = bct_onnx.session(model).get_outputs()
    assert (out.type, out.shape) == ("tensor(float)", [2, 5, 3, 4])


def expect_error(model: bytes, feeds: dict[str, np.ndarray], node_name: str, *fragments: str) -> None:
    with pytest.raises(Exception) as info:
        run(model, feeds)
    message = str(info.value)
    assert f"bct_onnx BlockActMatMul node '{node_name}': " in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_inputs_and_attributes() -> None:
    a, b = sample((3, 16), 1), sample((16, 4), 2)
    cases: list[tuple[list[Any], dict[str, Any], tuple[str, ...]]] = [
        ([a, None, None, sample((15, 4), 3)], {"act_bits": 8, "block_size": 8}, ("input 'B'", "K = 16")),
        (
            [sample((2, 3, 16), 4), None, None, sample((3, 16, 4), 5)],
            {"act_bits": 8, "block_size": 8},
            ("do not broadcast",),
        ),
        ([a, None, None, b], {"block_size": 8}, ("'act_bits'",)),
        ([a, None, None, b], {"act_bits": 9, "block_size": 8}, ("'act_bits'",)),
        ([a, None, None, b], {"act_bits": 8, "block_size": 0}, ("'block_size'",)),
        ([a, None, None, b], {"act_bits": 8, "block_size": 1 << 20}, ("'block_size'", "65536")),
        ([a, None, None, b], {"act_bits": 8, "block_size": 131072}, ("'block_size'", "1..65536", "131072")),
        ([a, None, None, b], {"act_bits": 8, "block_size": 8, "transpose_b": 2}, ("'transpose_b'",)),
        ([a, None, None, b.astype(np.float16)], {"act_bits": 8, "block_size": 8}, ("input 'B'", "float32")),
        ([sample((16,), 6), None, None, b], {"act_bits": 8, "block_size": 8}, ("input 'A'", "rank >= 2")),
        ([a, None, None, sample((4,), 7)], {"act_bits": 8, "block_size": 8}, ("input 'B'", "rank >= 2")),
        ([a, None, None, b], {"act_bits": 8, "block_size": 8, "in_bits": 4}, ("'in_block_size'",)),
    ]
    for i, (inputs, attrs, fragments) in enumerate(cases):
        model, feeds = node_model(inputs, 1, node_name=f"amm{i}", **attrs)
        expect_error(model, feeds, f"amm{i}", *fragments)


def _cuda_available() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU / onnxruntime-gpu here: CUDA kernels not run")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_matches_spec(case: tuple[Any, ...]) -> None:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    a_shape, b_shape, bits, bs = case
    a, b = sample(a_shape, 1), sample(b_shape, 2)
    (y,) = run_amm(a, b, bits, bs, providers=providers)
    assert_bits_equal(y, ref.act_matmul(a, b, bits, bs), "Y")
    out_fmt = BlockFormat(8, 16, False, ScaleKind.FLOAT16)
    outputs = run_amm(a, b, bits, bs, out_fmt=out_fmt, providers=providers)
    expected = ref.block_act_matmul(a, b, bits, bs, out_fmt=out_fmt)
    assert_bits_equal(outputs[0], expected.codes, "codes")
    assert_bits_equal(outputs[1], expected.scales, "scales")
    assert_bits_equal(outputs[2], expected.zero_points, "zero points")
