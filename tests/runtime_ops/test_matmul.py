"""BlockMatMul on CPU against bct_onnx.reference_ops.matmul_reference (built on the block format spec).

Two kinds of checks, on every instruction-set path the kernel has (BCT_ONNX_ISA=scalar|avx2|avxvnni|avx512vnni,
read when the session creates the kernel):
- exact: data on which every product and partial sum is exactly representable in float32 (small
  integers, power-of-two scales, activation blocks whose largest element makes the activation scale a
  power of two), so the kernel must equal the float64 reference exactly, in any summation order;
- random: ordinary data, compared with the explicit tolerance |Y - Y_ref| <= (K + 4) * 2**-24 * (|A'| @ |W'|^T)
  per element (the float32 rounding bound of a K-term dot product plus the two roundings per block of the
  integer mode), where A' and W' are the exact operands (quantized activation values, dequantized weights).
  One activation code off by one would exceed this bound.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import assert_bits_equal, covering_pairs

import bct_onnx
from bct_onnx.block_format import (
    KERNEL_SCALE_KINDS,
    BlockFormat,
    QuantizedTensor,
    ScaleKind,
    dequantize,
    pack_codes,
    quantize,
    scales_to_float32,
)
from bct_onnx.ops import BLOCK_MATMUL, DOMAIN
from bct_onnx.reference_ops import (
    activation_format,
    block_matmul,
    matmul_in_range,
    matmul_operands,
    matmul_reference,
)

ISAS = ("scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx", "amx-emulated")
SCALE_DTYPES = {
    ScaleKind.FLOAT16: np.float16,
    ScaleKind.FLOAT32: np.float32,
    ScaleKind.POW2: np.uint8,
    ScaleKind.FLOAT8E5M2: ml_dtypes.float8_e5m2,
}
U = 2.0**-24  # float32 unit roundoff


def row_id(value: Any) -> str:
    """Test id of one value of a covering_pairs row: scale kinds by name, zero-point modes as sym / asym,
    (bits, symmetric) weight formats as 5asym."""
    if isinstance(value, ScaleKind):
        return value.value
    if isinstance(value, bool):
        return "sym" if value else "asym"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bool):
        return f"{value[0]}{row_id(value[1])}"
    return str(value)


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest, force_isa: Any) -> str:
    """Each kernel path in turn; a path this CPU cannot run is skipped with the reason."""
    force_isa(request.param)
    return request.param


# ---------------------------------------------------------------------------------------------
# Model building


def matmul_model(
    *,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    symmetric: bool,
    act_bits: int,
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bias: np.ndarray | None,
    constant_weights: bool = True,
    node_name: str = "mm",
    a_type: int = TensorProto.FLOAT,
    **attr_overrides: Any,
) -> bytes:
    """One BlockMatMul node; weights as initializers (constant) or as graph inputs."""
    weights = {"W_codes": codes, "W_scales": scales}
    if zero_points is not None:
        weights["W_zero_points"] = zero_points
    if bias is not None:
        weights["bias"] = bias
    inputs = [
        "A",
        "W_codes",
        "W_scales",
        "W_zero_points" if zero_points is not None else "",
        "bias" if bias is not None else "",
    ]
    while inputs[-1] == "":
        inputs.pop()
    attrs: dict[str, Any] = {
        "K": k,
        "N": n,
        "bits": bits,
        "block_size": block_size,
        "symmetric": int(symmetric),
        "act_bits": act_bits,
    }
    attrs.update(attr_overrides)
    attrs = {key: value for key, value in attrs.items() if value is not None}
    node = helper.make_node(BLOCK_MATMUL, inputs, ["Y"], domain=DOMAIN, name=node_name, **attrs)
    graph_inputs = [helper.make_tensor_value_info("A", a_type, None)]
    initializers = []
    for name, value in weights.items():
        if constant_weights:
            initializers.append(numpy_helper.from_array(value, name))
        else:
            graph_inputs.append(
                helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), None)
            )
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return model.SerializeToString()


def run_matmul(model: bytes, a: np.ndarray, extra_feeds: dict[str, np.ndarray] | None = None) -> np.ndarray:
    feeds = {"A": a}
    feeds.update(extra_feeds or {})
    return bct_onnx.session(model).run(None, feeds)[0]


# ---------------------------------------------------------------------------------------------
# Data


def pow2_scales(
    rng: np.random.Generator, shape: tuple[int, ...], kind: ScaleKind, exponents: range
) -> np.ndarray:
    e = rng.integers(exponents.start, exponents.stop, shape)
    if kind is ScaleKind.POW2:
        return (e + 127).astype(np.uint8)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return (sign * np.ldexp(1.0, e)).astype(SCALE_DTYPES[kind])


def random_weight(
    rng: np.random.Generator,
    n: int,
    k: int,
    bits: int,
    block_size: int,
    symmetric: bool,
    kind: ScaleKind,
    exact: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Packed codes, stored scales, zero points of a weight [N, K] with random codes."""
    nb = -(-k // block_size)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    if exact or kind is ScaleKind.POW2:
        scales = pow2_scales(rng, (n, nb), kind, range(-1, 2) if exact else range(-8, 3))
    else:
        scales = (rng.standard_normal((n, nb)) * 0.05).astype(SCALE_DTYPES[kind])
    zero_points = None if symmetric else rng.integers(0, 1 << bits, (n, nb)).astype(np.uint8)
    return pack_codes(codes, bits), scales, zero_points


def exact_activations(
    rng: np.random.Generator, shape: tuple[int, ...], block_size: int, act_bits: int
) -> np.ndarray:
    """float32 activations whose products and sums are exact in float32.

    act_bits == 0: integers in [-8, 8]. act_bits > 0: per block, integers j * 2**e with |j| < 2**(act_bits-1)
    and one element +-2**(act_bits-1) * 2**e, the block's unique largest magnitude, so the activation scale
    is +-2**e and every code is exact.
    """
    if act_bits == 0:
        return rng.integers(-8, 9, shape).astype(np.float32)
    k = shape[-1]
    half = 1 << (act_bits - 1)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    a = rng.integers(-(half - 1), half, (rows, k)).astype(np.float64)
    for b0 in range(0, k, block_size):
        width = min(block_size, k - b0)
        where = b0 + rng.integers(0, width, rows)
        e = rng.integers(-1, 1, rows)
        sign = np.where(rng.random(rows) < 0.5, -1.0, 1.0)
        a[:, b0 : b0 + width] *= np.ldexp(1.0, e)[:, None]
        a[np.arange(rows), where] = sign * half * np.ldexp(1.0, e)
    return a.reshape(shape).astype(np.float32)


def tolerance(
    a: np.ndarray, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, **fmt: Any
) -> np.ndarray:
    """(K + 4) * 2**-24 * (|A'| @ |W'|^T): the stated float32 error bound per output element."""
    a_used, weight = matmul_operands(a, codes, scales, zero_points, **fmt)
    return (fmt["k"] + 4) * U * (np.abs(a_used) @ np.abs(weight).T) + 1e-30


# ---------------------------------------------------------------------------------------------
# Exact agreement on every path, bits 2..8, both zero-point modes, every scale kind, act_bits 0/4/8


# Every pair of (bits, zero-point mode, scale kind, act_bits) values, on every path (was the full product: 168).
@pytest.mark.parametrize(
    "bits,symmetric,kind,act_bits",
    covering_pairs(range(2, 9), [True, False], KERNEL_SCALE_KINDS, [0, 4, 8]),
    ids=row_id,
)
def test_exact_matches_reference(
    isa: str, bits: int, symmetric: bool, kind: ScaleKind, act_bits: int
) -> None:
    """K=29 with block_size 8 ends in a partial block; N=37 in a partial 16-column tile; bias on odd bits."""
    rng = np.random.default_rng(bits * 1000 + symmetric * 100 + act_bits * 10 + list(ScaleKind).index(kind))
    k, n, block_size = 29, 37, 8
    codes, scales, zero_points = random_weight(rng, n, k, bits, block_size, symmetric, kind, exact=True)
    bias = (rng.integers(-8, 9, n) / 2).astype(np.float32) if bits % 2 else None
    a = exact_activations(rng, (2, 3, k), block_size, act_bits)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": act_bits}
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=bias, **fmt)
    got = run_matmul(model, a)
    want = matmul_reference(a, codes, scales, zero_points, bias=bias, **fmt)
    assert got.dtype == np.float32 and got.shape == (2, 3, n)
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"isa={isa}")
    assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"


@pytest.mark.parametrize("act_bits", [0, 8])
@pytest.mark.parametrize("block_size", [32, 16, 64, 5, 128])
def test_exact_block_sizes(isa: str, block_size: int, act_bits: int) -> None:
    """Block sizes that are and are not multiples of the kernels' 8-element groups, 4-bit symmetric float16."""
    rng = np.random.default_rng(block_size + act_bits)
    k, n = 3 * block_size + 3, 40
    codes, scales, _zero_points = random_weight(rng, n, k, 4, block_size, True, ScaleKind.FLOAT16, exact=True)
    a = exact_activations(rng, (5, k), block_size, act_bits)
    # keep sums exact for long blocks: small activations (act_bits 0) and few blocks
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": True, "act_bits": act_bits}
    got = run_matmul(matmul_model(n=n, codes=codes, scales=scales, zero_points=None, bias=None, **fmt), a)
    want = matmul_reference(a, codes, scales, None, **fmt)
    assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"isa={isa}")


def _check_exact_integer_rows(
    rng: np.random.Generator, isa: str, *, k: int, n: int, bits: int, block_size: int, symmetric: bool, rows: int
) -> None:
    """BlockMatMul on exact weights (float16 scales) and exact 8-bit activations equals the spec bit for bit."""
    codes, scales, zero_points = random_weight(
        rng, n, k, bits, block_size, symmetric, ScaleKind.FLOAT16, exact=True
    )
    a = exact_activations(rng, (rows, k), block_size, 8)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": 8}
    got = run_matmul(
        matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt), a
    )
    want = matmul_reference(a, codes, scales, zero_points, **fmt)
    assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"isa={isa}")


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("bits,symmetric", [(5, False), (6, True), (8, True)], ids=["5asym", "6sym", "8sym"])
def test_exact_decode_byte_codes_many_blocks(isa: str, bits: int, symmetric: bool, rows: int) -> None:
    """Decode rows on byte codes (5..8 bits) with more blocks than the kernels prefetch ahead: K=330
    (10 full blocks of 32 and one of 10), N=70 (a partial panel of tiles), integer activations."""
    rng = np.random.default_rng(bits * 10 + rows)
    _check_exact_integer_rows(rng, isa, k=330, n=70, bits=bits, block_size=32, symmetric=symmetric, rows=rows)


@pytest.mark.parametrize("block_size", [32, 16, 64, 128, 12, 40])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_exact_one_row_nibble_codes(isa: str, symmetric: bool, block_size: int) -> None:
    """The one-row decode GEMV on 4-bit codes (read tile by tile on AVX-512): blocks of 2..16 groups
    (12 and 40 pad to group counts the kernel knows only at run time), K ending in a partial block,
    N=70 (a full panel of 4 tiles and a partial one), integer activations."""
    rng = np.random.default_rng(block_size + 1000 * symmetric)
    _check_exact_integer_rows(
        rng, isa, k=3 * block_size + 7, n=70, bits=4, block_size=block_size, symmetric=symmetric, rows=1
    )


# Every pair of (weight format, block size, row count), on every path (was the full product: 96).
@pytest.mark.parametrize(
    "bits_symmetric,block_size,rows",
    covering_pairs([(5, False), (5, True), (6, True), (7, False)], [32, 16, 64, 12], [1, 3, 8, 12, 40, 520]),
    ids=row_id,
)
def test_exact_high_bit_planes(isa: str, bits_symmetric: tuple[int, bool], block_size: int, rows: int) -> None:
    """5..7-bit weights with integer activations (5 bits on AVX-512: nibbles plus a high bit plane):
    every code value in every nibble position, decode (1..8 rows) and prefill row counts (40: tasks of
    16 rows; 520: of 32, the last one 8 rows; prefill reads the codes expanded to bytes once), blocks of 2, 4 and 8 groups and one padded to 16, K
    ending in a partial block, N=70 (a partial panel)."""
    bits, symmetric = bits_symmetric
    rng = np.random.default_rng(bits * 100 + block_size + rows)
    _check_exact_integer_rows(
        rng, isa, k=3 * block_size + 7, n=70, bits=bits, block_size=block_size, symmetric=symmetric, rows=rows
    )


@pytest.mark.parametrize("bits", [5, 4])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_exact_high_bit_planes_first_calls_concurrent(isa: str, symmetric: bool, bits: int) -> None:
    """5-bit weights (nibbles and a bit plane) are expanded to bytes on a kernel's first prefill call
    (4-bit ones, read as packed, for comparison): eight Run calls on one new session (prefill of
    13..520 rows and decode rows, on two intra-op threads each), started together, all equal the spec
    bit for bit (a call that read a half-expanded weight would not)."""
    rng = np.random.default_rng(51 + symmetric + 2 * bits)
    k, n, block_size = 3 * 32 + 7, 16 * 9 + 3, 32
    codes, scales, zero_points = random_weight(rng, n, k, bits, block_size, symmetric, ScaleKind.FLOAT16, exact=True)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": 8}
    session = bct_onnx.session(
        matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt), threads=2
    )
    feeds = [exact_activations(rng, (rows, k), block_size, 8) for rows in (520, 13, 64, 2, 200, 33, 520, 7)]
    results: list[np.ndarray | None] = [None] * len(feeds)
    start = threading.Barrier(len(feeds))

    def run(i: int) -> None:
        start.wait()
        results[i] = session.run(None, {"A": feeds[i]})[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(feeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, got in zip(feeds, results):
        want = matmul_reference(a, codes, scales, zero_points, **fmt)
        assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"
        assert got is not None
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"isa={isa} rows={len(a)}")


# Every pair of (weight format, rows, act_bits), on every path (was the full product: 18).
@pytest.mark.parametrize(
    "bits_symmetric,rows,act_bits",
    covering_pairs([(4, True), (5, False), (8, True)], [1, 3, 8], [8, 0]),
    ids=row_id,
)
def test_exact_decode_split_over_two_threads(
    isa: str, bits_symmetric: tuple[int, bool], rows: int, act_bits: int
) -> None:
    """Decode products large enough to be split over N on two intra-op threads: K=1024, N=16*37+5 (38
    tiles, 10 register blocks of 4 with a partial last one), split into 2..10 tasks of unequal block
    counts depending on bits and rows; every column equals the spec bit for bit."""
    bits, symmetric = bits_symmetric
    rng = np.random.default_rng(bits * 7 + rows + act_bits)
    k, n, block_size = 1024, 16 * 37 + 5, 32
    codes, scales, zero_points = random_weight(
        rng, n, k, bits, block_size, symmetric, ScaleKind.FLOAT16, exact=True
    )
    a = exact_activations(rng, (rows, k), block_size, act_bits)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": act_bits}
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt)
    got = bct_onnx.session(model, threads=2).run(None, {"A": a})[0]
    want = matmul_reference(a, codes, scales, zero_points, **fmt)
    assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"isa={isa} rows={rows}")


# ---------------------------------------------------------------------------------------------
# Random data with the stated tolerance


# Every pair of (bits, zero-point mode, scale kind, act_bits) values, on every path (was the full product: 120).
@pytest.mark.parametrize(
    "bits,symmetric,kind,act_bits",
    covering_pairs([2, 3, 4, 5, 8], [True, False], KERNEL_SCALE_KINDS, [0, 4, 8]),
    ids=row_id,
)
def test_random_within_tolerance(
    isa: str, bits: int, symmetric: bool, kind: ScaleKind, act_bits: int
) -> None:
    rng = np.random.default_rng(7 * bits + 3 * symmetric + act_bits)
    k, n, block_size = 200, 50, 32  # 6 full blocks and one of 8
    codes, scales, zero_points = random_weight(rng, n, k, bits, block_size, symmetric, kind, exact=False)
    bias = rng.standard_normal(n).astype(np.float32)
    a = rng.standard_normal((9, k)).astype(np.float32)
    a[:, ::13] *= 20  # outliers, as in real activations
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": act_bits}
    got = run_matmul(
        matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=bias, **fmt), a
    )
    want = matmul_reference(a, codes, scales, zero_points, bias=bias, **fmt)
    tol = tolerance(a, codes, scales, zero_points, **fmt) + np.abs(bias) * U
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= tol), f"isa={isa}: max error / tolerance = {np.max(err / tol):.3g}"


@pytest.mark.parametrize(
    "a_shape",
    [(96,), (1, 96), (3, 96), (2, 3, 96), (2, 1, 3, 96), (67, 96), (130, 96)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("act_bits", [0, 8])
def test_ranks_and_rows(isa: str, a_shape: tuple[int, ...], act_bits: int) -> None:
    """A of rank 1..4; M = 1, small, and more than one 64-row work chunk; N = 100 (7 tiles, last partial)."""
    rng = np.random.default_rng(len(a_shape) + a_shape[0] + act_bits)
    k, n, block_size = 96, 100, 32
    codes, scales, _zero_points = random_weight(
        rng, n, k, 4, block_size, True, ScaleKind.FLOAT16, exact=False
    )
    a = rng.standard_normal(a_shape).astype(np.float32)
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": True, "act_bits": act_bits}
    got = run_matmul(matmul_model(n=n, codes=codes, scales=scales, zero_points=None, bias=None, **fmt), a)
    assert got.shape == a_shape[:-1] + (n,)
    want = matmul_reference(a, codes, scales, None, **fmt)
    tol = tolerance(a, codes, scales, None, **fmt)
    assert np.all(np.abs(got - want) <= tol), (
        f"isa={isa}: max error / tolerance = {np.max(np.abs(got - want) / tol):.3g}"
    )


def test_many_tiles_gemv_and_prefill(isa: str) -> None:
    """Shapes that use every register block: N = 16 * 11 (odd tile count), M = 1 and M = 37."""
    rng = np.random.default_rng(11)
    k, n = 256, 176
    for symmetric in (True, False):
        codes, scales, zero_points = random_weight(
            rng, n, k, 4, 32, symmetric, ScaleKind.FLOAT16, exact=False
        )
        for act_bits in (0, 8):
            fmt = {"k": k, "bits": 4, "block_size": 32, "symmetric": symmetric, "act_bits": act_bits}
            model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt)
            for m in (1, 37):
                a = rng.standard_normal((m, k)).astype(np.float32)
                got = run_matmul(model, a)
                want = matmul_reference(a, codes, scales, zero_points, **fmt)
                tol = tolerance(a, codes, scales, zero_points, **fmt)
                assert np.all(np.abs(got - want) <= tol), f"isa={isa} sym={symmetric} act={act_bits} M={m}"


# Every pair of (bits, zero-point mode, scale kind, act_bits) values, on every path (was the full product: 48).
@pytest.mark.parametrize(
    "bits,zero_points,kind,act_bits",
    covering_pairs([4, 8], ["sym", "asym", "offsets"], KERNEL_SCALE_KINDS, [0, 8]),
    ids=row_id,
)
def test_exact_across_weight_panels(
    isa: str, bits: int, zero_points: str, kind: ScaleKind, act_bits: int
) -> None:
    """N = 16 * 9 + 7: two full panels of 4 tiles and a partial one of 2 (the AVX-512 layout interleaves
    the codes and block parameters of 4 tiles), for every scale kind and zero-point mode; M = 1, 5 (decode
    kernels) and 12 (prefill)."""
    rng = np.random.default_rng(bits * 31 + act_bits + 7 * list(ScaleKind).index(kind) + len(zero_points))
    k, n, block_size = 40, 16 * 9 + 7, 16
    if zero_points == "offsets":
        codes, scales, zps = offset_weight(rng, n, k, bits, block_size, kind, exact=True)
    else:
        codes, scales, zps = random_weight(
            rng, n, k, bits, block_size, zero_points == "sym", kind, exact=True
        )
    fmt = {
        "k": k,
        "bits": bits,
        "block_size": block_size,
        "symmetric": zero_points == "sym",
        "act_bits": act_bits,
    }
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zps, bias=None, **fmt)
    for m in (1, 5, 12):
        a = exact_activations(rng, (m, k), block_size, act_bits)
        want = matmul_reference(a, codes, scales, zps, **fmt)
        assert np.array_equal(want.astype(np.float32).astype(np.float64), want), (
            "test data not exact in float32"
        )
        np.testing.assert_array_equal(
            run_matmul(model, a), want.astype(np.float32), err_msg=f"isa={isa} M={m}"
        )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_mode_same_bits_as_scalar_for_every_row_count(
    isa: str, bits: int, symmetric: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Integer mode on random (inexact) data: every row count of the decode kernels (M = 1..8: register
    blocks of up to 4 rows x 4 tiles, reading packed codes) and of the prefill kernel (8 rows x 2
    tiles on nibbles; M = 9, 16, 37) gives exactly the scalar path's bits; N = 16 * 9 + 5 leaves tile remainders."""
    rng = np.random.default_rng(bits + 2 * symmetric)
    k, n = 256, 16 * 9 + 5
    codes, scales, zero_points = random_weight(rng, n, k, bits, 32, symmetric, ScaleKind.FLOAT16, exact=False)
    fmt = {"k": k, "bits": bits, "block_size": 32, "symmetric": symmetric, "act_bits": 8}
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt)
    a = rng.standard_normal((37, k)).astype(np.float32)
    session = bct_onnx.session(model)
    monkeypatch.setenv("BCT_ONNX_ISA", "scalar")
    reference = bct_onnx.session(model)
    for m in (*range(1, 10), 16, 37):
        got = session.run(None, {"A": a[:m]})[0]
        want = reference.run(None, {"A": a[:m]})[0]
        assert_bits_equal(got, want, f"isa={isa} bits={bits} symmetric={symmetric} M={m}")


def random_integer_model(
    rng: np.random.Generator, k: int, n: int, bits: int, block_size: int, symmetric: bool, rows: int
) -> tuple[bytes, np.ndarray]:
    """An integer-mode BlockMatMul (random inexact weights, float16 scales, 8-bit activations) and
    `rows` random rows of A."""
    codes, scales, zero_points = random_weight(rng, n, k, bits, block_size, symmetric, ScaleKind.FLOAT16, exact=False)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": 8}
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt)
    return model, rng.standard_normal((rows, k)).astype(np.float32)


# Every pair of (zero-point mode, bits, block size, GFNI on/off), on every path (was the full product: 80).
@pytest.mark.parametrize(
    "symmetric,bits,block_size,gfni",
    covering_pairs([True, False], [2, 3, 4, 6, 8], [32, 16, 64, 12], ["gfni", "no-gfni"]),
    ids=row_id,
)
def test_integer_prefill_same_bits_as_scalar(
    isa: str, bits: int, symmetric: bool, block_size: int, gfni: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The integer prefill kernels (AVX-512: register blocks of up to 8 rows x 2 tiles on packed nibble
    codes, high nibbles unpacked by GFNI where the CPU has it or, with BCT_ONNX_NO_GFNI, by a shift and
    an and, activations interleaved per row block; 4 rows x 4 tiles on byte codes) on random (inexact)
    data gives exactly the scalar path's bits: every register-block height (M = 9..17 split into
    nearly equal blocks of at most 8 or 4 rows), tasks of 16 and 32 rows with a short last one (M = 40, 100),
    N = 16 * 9 + 5 (two 4-tile panels, a pair and a single tile of the last), K ending in a partial
    block, blocks of 2..16 groups (12: a group count known only at run time)."""
    rng = np.random.default_rng(bits * 1000 + block_size * 2 + symmetric)
    model, a = random_integer_model(rng, 4 * block_size + 5, 16 * 9 + 5, bits, block_size, symmetric, rows=100)
    if gfni == "no-gfni":
        monkeypatch.setenv("BCT_ONNX_NO_GFNI", "1")
    session = bct_onnx.session(model)
    monkeypatch.setenv("BCT_ONNX_ISA", "scalar")
    reference = bct_onnx.session(model)
    for m in (*range(9, 18), 40, 100):
        got = session.run(None, {"A": a[:m]})[0]
        want = reference.run(None, {"A": a[:m]})[0]
        assert_bits_equal(got, want, f"isa={isa} bits={bits} symmetric={symmetric} M={m}")


@pytest.mark.parametrize("isa_name", ["amx", "amx-emulated"])
@pytest.mark.parametrize(
    "bits,symmetric,block_size",
    [(4, True, 32), (4, False, 128), (3, True, 64), (8, True, 256), (8, False, 32), (5, True, 64), (6, False, 16)],
)
def test_amx_prefill_same_bits_as_scalar(
    isa_name: str, bits: int, symmetric: bool, block_size: int, force_isa: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AMX-INT8 prefill kernel (cpu/matmul_kernel_amx.cc: rows in blocks of 32 and 16 on tiles, the
    rest on the AVX-512 kernels; emulated tiles where the CPU has none) on random (inexact) data gives
    exactly the scalar path's bits: nibble, 5-bit (high bit plane) and byte codes, signed (symmetric)
    and unsigned weight codes, blocks of 16..256 K (tiles of at most 64 K: several chunks a block),
    more than 8 blocks (the epilogue's groups of blocks), M = 16..100 (row blocks of 32, 16, and the
    rows left for the AVX-512 kernels), N = 16 * 5 + 3 (pairs of tiles and a single one), 1 and 2 threads."""
    force_isa(isa_name)
    rng = np.random.default_rng(bits * 100 + block_size + symmetric)
    model, a = random_integer_model(rng, 9 * block_size + 5, 16 * 5 + 3, bits, block_size, symmetric, rows=100)
    sessions = [bct_onnx.session(model, threads=t) for t in (1, 2)]
    monkeypatch.setenv("BCT_ONNX_ISA", "scalar")
    reference = bct_onnx.session(model)
    for m in (16, 31, 32, 48, 100):
        want = reference.run(None, {"A": a[:m]})[0]
        for threads, session in zip((1, 2), sessions):
            got = session.run(None, {"A": a[:m]})[0]
            assert_bits_equal(got, want, f"{isa_name} bits={bits} symmetric={symmetric} M={m} threads={threads}")


@pytest.mark.parametrize("isa_name", ["avx512vnni", "avx2", "scalar"])
def test_activation_buffers_reused_across_calls(isa_name: str, force_isa: Any) -> None:
    """The calling thread keeps its quantized activations for its next call: a padded K (99 in blocks
    of 32) after larger unpadded calls whose codes filled those bytes, and fewer rows after more, give
    the spec's bits on one thread, and after a call of another model."""
    force_isa(isa_name)
    rng = np.random.default_rng(77)
    outputs = []
    for k, rows in ((128, 300), (99, 40), (128, 7), (99, 300)):
        codes, scales, _ = random_weight(rng, 24, k, 4, 32, True, ScaleKind.FLOAT16, exact=True)
        a = exact_activations(rng, (rows, k), 32, 8)
        fmt = {"k": k, "bits": 4, "block_size": 32, "symmetric": True, "act_bits": 8}
        model = matmul_model(n=24, codes=codes, scales=scales, zero_points=None, bias=None, **fmt)
        got = bct_onnx.session(model, threads=1).run(None, {"A": a})[0]
        want = matmul_reference(a, codes, scales, None, **fmt)
        assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"
        outputs.append((got, want.astype(np.float32)))
    for i, (got, want) in enumerate(outputs):
        np.testing.assert_array_equal(got, want, err_msg=f"call {i}, isa={isa_name}")


def test_weights_as_graph_inputs(isa: str) -> None:
    """Non-constant weights are repacked on every call and give the same result."""
    rng = np.random.default_rng(5)
    k, n, block_size = 40, 24, 16
    codes, scales, zero_points = random_weight(rng, n, k, 3, block_size, False, ScaleKind.FLOAT32, exact=True)
    bias = (rng.integers(-4, 5, n) / 4).astype(np.float32)
    a = exact_activations(rng, (4, k), block_size, 8)
    fmt = {"k": k, "bits": 3, "block_size": block_size, "symmetric": False, "act_bits": 8}
    model = matmul_model(
        n=n, codes=codes, scales=scales, zero_points=zero_points, bias=bias, constant_weights=False, **fmt
    )
    feeds = {"W_codes": codes, "W_scales": scales, "W_zero_points": zero_points, "bias": bias}
    got = run_matmul(model, a, feeds)
    want = matmul_reference(a, codes, scales, zero_points, bias=bias, **fmt)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_bias_without_zero_points() -> None:
    """An omitted optional input in the middle (empty name) followed by bias."""
    rng = np.random.default_rng(9)
    k, n = 64, 20
    codes, scales, _ = random_weight(rng, n, k, 4, 32, True, ScaleKind.FLOAT16, exact=True)
    bias = np.arange(n, dtype=np.float32)
    a = exact_activations(rng, (2, k), 32, 0)
    fmt = {"k": k, "bits": 4, "block_size": 32, "symmetric": True, "act_bits": 0}
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=None, bias=bias, **fmt)
    assert [i for i in onnx.load_from_string(model).graph.node[0].input] == [
        "A",
        "W_codes",
        "W_scales",
        "",
        "bias",
    ]
    np.testing.assert_array_equal(
        run_matmul(model, a), matmul_reference(a, codes, scales, None, bias=bias, **fmt)
    )


def test_empty_rows() -> None:
    rng = np.random.default_rng(1)
    codes, scales, _ = random_weight(rng, 8, 32, 4, 32, True, ScaleKind.FLOAT16, exact=True)
    model = matmul_model(
        k=32,
        n=8,
        bits=4,
        block_size=32,
        symmetric=True,
        act_bits=8,
        codes=codes,
        scales=scales,
        zero_points=None,
        bias=None,
    )
    assert run_matmul(model, np.zeros((0, 3, 32), np.float32)).shape == (0, 3, 8)


# ---------------------------------------------------------------------------------------------
# Non-finite activations (docs/ops.md): with act_bits, a block holding a NaN or an infinity makes every
# output of its row NaN; without, the float matmul's NaN / +-inf.


def non_finite_activations(rng: np.random.Generator, k: int) -> np.ndarray:
    """Rows: finite, a NaN, +inf, -inf, +inf and -inf in different blocks, a NaN in the last (partial) block."""
    a = rng.standard_normal((6, k)).astype(np.float32)
    a[1, 5] = np.nan
    a[2, 40] = np.inf
    a[3, 3] = -np.inf
    a[4, 1], a[4, 33] = np.inf, -np.inf
    a[5, k - 1] = np.nan
    return a


@pytest.mark.parametrize("act_bits", [0, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_non_finite_activations(isa: str, symmetric: bool, act_bits: int) -> None:
    rng = np.random.default_rng(act_bits + 3 * symmetric)
    k, n, block_size = 70, 37, 32
    codes, scales, zero_points = random_weight(
        rng, n, k, 4, block_size, symmetric, ScaleKind.FLOAT16, exact=False
    )
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": symmetric, "act_bits": act_bits}
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt)
    a = non_finite_activations(rng, k)
    with np.errstate(invalid="ignore", over="ignore"):
        want = matmul_reference(a, codes, scales, zero_points, **fmt)
    y = run_matmul(model, a)
    if act_bits:
        assert np.isnan(want[1:]).all() and not np.isnan(want[0]).any()
        assert np.isnan(y[1:]).all(), f"rows with a non-finite activation must be NaN, got {y[1:]}"
    else:  # float matmul: NaN where the spec has NaN, the spec's signed infinities elsewhere
        assert np.array_equal(np.isnan(y), np.isnan(want))
        inf = np.isinf(want)
        assert inf.any() and np.array_equal(y[inf], want[inf].astype(np.float32))
    tol = tolerance(a[:1], codes, scales, zero_points, **fmt)[0]
    assert np.all(np.abs(y[0] - want[0]) <= tol), "the finite row"


@pytest.mark.parametrize("act_bits", [4, 8])
def test_non_finite_own_format_activations(isa: str, act_bits: int) -> None:
    """A given as codes in the run-time activation format whose blocks have +-inf or NaN scales (BlockQuantize
    of non-finite data): the same NaN rows as the float A."""
    rng = np.random.default_rng(act_bits)
    k, n, block_size = 70, 37, 32
    codes, scales, _ = random_weight(rng, n, k, 4, block_size, True, ScaleKind.FLOAT16, exact=False)
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": True, "act_bits": act_bits}
    common = {"n": n, "codes": codes, "scales": scales, "zero_points": None, "bias": None, **fmt}
    a = non_finite_activations(rng, k)
    with np.errstate(invalid="ignore", over="ignore"):
        q = quantize(a, activation_format(act_bits, block_size))
    assert np.isinf(q.scales).any()
    y = bct_onnx.session(io_model(in_fmt=q.fmt, **common)).run(None, quantized_feeds(q))[0]
    assert np.isnan(y[1:]).all(), f"rows with a non-finite activation must be NaN, got {y[1:]}"
    np.testing.assert_array_equal(y[0], run_matmul(io_model(**common), a)[0])


# ---------------------------------------------------------------------------------------------
# Magnitudes near the float32 maximum: the range guarantee of docs/ops.md (reference_ops.matmul_in_range)


@pytest.mark.parametrize("act_bits", [0, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_large_magnitudes_within_the_range_guarantee(isa: str, symmetric: bool, act_bits: int) -> None:
    """Rows up to 64 times past the point where activations times unscaled codes overflow float32 (Y
    near 1e37, the case of issue 11 finding 7, which gave inf or an infinity of the wrong sign): every
    output finite and within tolerance. A row whose exact Y is beyond the float32 range is +-inf with
    the reference's sign."""
    rng = np.random.default_rng(act_bits + symmetric)
    k, n, block_size, bits = 96, 37, 32, 4
    codes, scales, zero_points = random_weight(
        rng, n, k, bits, block_size, symmetric, ScaleKind.FLOAT32, exact=False
    )
    scales = (scales * 1e-3).astype(np.float32)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": act_bits}
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt)
    unit = rng.standard_normal((6, k)).astype(np.float32)
    unit /= np.abs(unit).max(axis=-1, keepdims=True)  # max |a| = 1 per row
    edge = 2.0**127 / (block_size * ((1 << bits) - 1))  # beyond it, a * code sums can overflow
    rows = np.array([[edge * 0.99], [edge / 2], [-edge / 8], [edge * 64], [-edge * 256], [3.0e38 / 4]])
    a = (unit * rows).astype(np.float32)
    assert matmul_in_range(a, codes, scales, zero_points, **fmt).all()
    with np.errstate(over="ignore"):
        want = matmul_reference(a, codes, scales, zero_points, **fmt)
        want32 = want.astype(np.float32)
    assert np.isfinite(want32).all() and np.abs(want[3:]).max() > 2.0**110
    y = run_matmul(model, a)
    tol = tolerance(a, codes, scales, zero_points, **fmt)
    assert np.isfinite(y).all(), f"isa={isa}: outputs whose reference is finite must be finite"
    assert np.all(np.abs(y - want) <= tol), f"isa={isa}"


@pytest.mark.parametrize("act_bits", [0, 8])
def test_beyond_the_float32_range_gives_the_right_infinity(isa: str, act_bits: int) -> None:
    """A row whose partial sums overflow to +inf before its larger negative half comes in (exact Y
    about -6e40): -inf, not NaN; the other output's exact Y is 0 and comes out within tolerance
    (+inf + -inf = NaN before the fix)."""
    k, block_size, bits = 64, 16, 4
    codes = np.full((2, k), 15, np.uint8)  # symmetric: code 15 is +7
    codes[0, :32] = 9  # +1: output 0 is 3e38 * (32 * 1 - 32 * 7)
    packed = pack_codes(codes, bits)
    scales = np.ones((2, k // block_size), np.float32)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": True, "act_bits": act_bits}
    model = matmul_model(n=2, codes=packed, scales=scales, zero_points=None, bias=None, **fmt)
    a = np.full((1, k), 3.0e38, np.float32)
    a[0, 32:] = -3.0e38
    want = matmul_reference(a, packed, scales, None, **fmt)
    y = run_matmul(model, a)
    assert want[0, 0] < -3.5e38 and y[0, 0] == -np.inf, f"isa={isa}: got {y[0, 0]}"
    tol = tolerance(a, packed, scales, None, **fmt)[0, 1]  # 5e33: float32(3e38) sums are not exact
    assert want[0, 1] == 0 and abs(y[0, 1]) <= tol, f"isa={isa}: got {y[0, 1]}"


# ---------------------------------------------------------------------------------------------
# CUDA: only where a GPU and onnxruntime-gpu are present


def test_cuda_matches_cpu() -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(
            "onnxruntime has no CUDAExecutionProvider here (no GPU build / no GPU): CUDA kernel not run"
        )
    rng = np.random.default_rng(3)
    k, n = 70, 33
    for act_bits in (0, 8):
        codes, scales, zero_points = random_weight(rng, n, k, 5, 16, False, ScaleKind.POW2, exact=True)
        a = exact_activations(rng, (3, k), 16, act_bits)
        fmt = {"k": k, "bits": 5, "block_size": 16, "symmetric": False, "act_bits": act_bits}
        model = matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt)
        sess = bct_onnx.session(model, providers=["CUDAExecutionProvider"])
        if "CUDAExecutionProvider" not in sess.get_providers():
            pytest.skip("CUDAExecutionProvider could not be created (no GPU): CUDA kernel not run")
        got = sess.run(None, {"A": a})[0]
        np.testing.assert_array_equal(
            got, matmul_reference(a, codes, scales, zero_points, **fmt).astype(np.float32)
        )


# ---------------------------------------------------------------------------------------------
# Bad inputs: the error names the node and the input or attribute


def _valid(**overrides: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    k, n, bits, block_size = 40, 12, 4, 16
    codes, scales, zero_points = random_weight(
        rng, n, k, bits, block_size, True, ScaleKind.FLOAT16, exact=True
    )
    spec: dict[str, Any] = {
        "k": k,
        "n": n,
        "bits": bits,
        "block_size": block_size,
        "symmetric": True,
        "act_bits": 0,
        "codes": codes,
        "scales": scales,
        "zero_points": zero_points,
        "bias": None,
        "node_name": "bad_mm",
    }
    spec.update(overrides)
    return spec


PREFIX = "bct_onnx BlockMatMul node 'bad_mm': "


def _expect_error(
    model_spec: dict[str, Any], a: np.ndarray, message: str, extra_feeds: dict[str, np.ndarray] | None = None
) -> None:
    with pytest.raises(Exception, match=re.escape(PREFIX + message)):
        run_matmul(matmul_model(**model_spec), a, extra_feeds)


A_OK = np.ones((2, 40), np.float32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"act_bits": 1}, "attribute 'act_bits' must be 0 (float activations) or in 2..8, got 1"),
        ({"act_bits": 9}, "attribute 'act_bits' must be 0 (float activations) or in 2..8, got 9"),
        ({"bits": 9}, "attribute 'bits' must be in 2..8, got 9"),
        ({"block_size": 0}, "attribute 'block_size' must be in 1..2147483648, got 0"),
        ({"N": None, "n": 12}, "required int attribute 'N' is missing"),
        ({"K": None}, "required int attribute 'K' is missing"),
        ({"symmetric": 2}, "attribute 'symmetric' must be 0 or 1, got 2"),
    ],
    ids=["act_bits=1", "act_bits=9", "bits=9", "block_size=0", "no N", "no K", "symmetric=2"],
)
def test_bad_attributes(overrides: dict[str, Any], message: str) -> None:
    spec = _valid()
    for key in ("N", "K"):
        if key in overrides:
            spec[key] = overrides.pop(key)
    spec.update(overrides)
    _expect_error(spec, A_OK, message)


def test_bad_inputs() -> None:
    rng = np.random.default_rng(1)
    good = _valid()
    _expect_error(
        good, np.ones((2, 41), np.float32), "input 'A' must have last dimension K = 40, got shape [2, 41]"
    )
    _expect_error(good, np.ones((), np.float32), "input 'A' must have rank >= 1, got shape []")
    _expect_error(
        dict(good, a_type=TensorProto.DOUBLE), np.ones((2, 40)), "input 'A' must be float32, got float64"
    )
    _expect_error(
        dict(good, codes=good["codes"][:, :-1]),
        A_OK,
        "input 'W_codes' must have shape [N, ceil(K * bits / 8)] = [12, 20], got [12, 19]",
    )
    _expect_error(
        dict(good, codes=good["codes"].view(np.int8)), A_OK, "input 'W_codes' must be uint8, got int8"
    )
    _expect_error(
        dict(good, scales=good["scales"].astype(np.float64)),
        A_OK,
        "input 'W_scales' must be float16, float32, float8e5m2 or uint8 (pow2 exponents), got float64",
    )
    _expect_error(
        dict(good, scales=good["scales"][:, :2]),
        A_OK,
        "input 'W_scales' must have shape [N, ceil(K / block_size)] = [12, 3], got [12, 2]",
    )
    _expect_error(
        dict(good, bias=np.zeros(11, np.float32)), A_OK, "input 'bias' must have shape [N] = [12], got [11]"
    )
    _expect_error(
        dict(good, bias=np.zeros(12, np.float64)), A_OK, "input 'bias' must be float32, got float64"
    )
    zp = rng.integers(0, 16, (12, 3)).astype(np.uint8)
    _expect_error(
        dict(good, zero_points=zp),
        A_OK,
        "input 'W_zero_points' must be absent when attribute 'symmetric' is 1",
    )
    _expect_error(
        dict(good, symmetric=False), A_OK, "input 'W_zero_points' is required when attribute 'symmetric' is 0"
    )
    _expect_error(
        dict(good, symmetric=False, zero_points=zp[:, :2]),
        A_OK,
        "input 'W_zero_points' must have shape [N, ceil(K / block_size)] = [12, 3], got [12, 2]",
    )


def test_bad_inputs_at_run_time() -> None:
    """Weights fed at run time are validated on every call."""
    good = _valid(constant_weights=False)
    feeds = {"W_codes": good["codes"], "W_scales": good["scales"]}
    _expect_error(
        good,
        A_OK,
        "input 'W_codes' must have shape [N, ceil(K * bits / 8)] = [12, 20], got [12, 19]",
        dict(feeds, W_codes=good["codes"][:, :-1]),
    )
    int_scales = np.zeros((12, 3), np.int32)
    _expect_error(
        dict(good, scales=int_scales),
        A_OK,
        "input 'W_scales' must be float16, float32, float8e5m2 or uint8 (pow2 exponents), got int32",
        dict(feeds, W_scales=int_scales),
    )


def test_bad_isa_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCT_ONNX_ISA", "sse9")
    _expect_error(
        _valid(),
        A_OK,
        "BCT_ONNX_ISA='sse9' is not one of auto, scalar, avx2, avxvnni, avx512, avx512vnni, amx",
    )


def test_isa_the_cpu_lacks(kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing a path this CPU cannot run is a clear error of the kernel, not a silent fallback."""
    lacking = [isa for isa, needs in kit.ISA_NEEDS.items() if needs - kit.CPU_FLAGS]
    if not lacking:
        pytest.skip("this CPU runs every path")
    monkeypatch.setenv("BCT_ONNX_ISA", lacking[0])
    _expect_error(_valid(), A_OK, f"BCT_ONNX_ISA={lacking[0]} but this CPU lacks ")


def test_isa_env_is_restored() -> None:
    """The tests above set BCT_ONNX_ISA through monkeypatch only."""
    assert os.environ.get("BCT_ONNX_ISA") in (None, "", "auto") or os.environ.get("BCT_ONNX_ISA") in ISAS


def test_block_too_large_for_int32() -> None:
    spec = _valid(
        k=70000,
        n=1,
        bits=8,
        block_size=70000,
        act_bits=8,
        codes=np.zeros((1, 70000), np.uint8),
        scales=np.ones((1, 1), np.float16),
    )
    _expect_error(
        spec,
        np.ones((1, 70000), np.float32),
        "attribute 'block_size' (70000) is too large for integer accumulation with bits=8 and act_bits=8",
    )


@pytest.mark.parametrize("act_bits", [0, 8])
@pytest.mark.parametrize("k", [1, 5, 31])
def test_exact_k_below_block_size(isa: str, k: int, act_bits: int) -> None:
    """K shorter than one block (a single partial block), 3-bit asymmetric pow2 scales."""
    rng = np.random.default_rng(k * 10 + act_bits)
    n, block_size = 21, 32
    codes, scales, zero_points = random_weight(rng, n, k, 3, block_size, False, ScaleKind.POW2, exact=True)
    a = exact_activations(rng, (3, k), block_size, act_bits)
    fmt = {"k": k, "bits": 3, "block_size": block_size, "symmetric": False, "act_bits": act_bits}
    got = run_matmul(
        matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt), a
    )
    want = matmul_reference(a, codes, scales, zero_points, **fmt)
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"isa={isa}")


@pytest.mark.parametrize("act_bits", [0, 8])
def test_block_size_far_beyond_k(isa: str, act_bits: int) -> None:
    """block_size = 2**30 with K = 40 is one block of 40: nothing may be sized by block_size itself.

    (The numpy reference repeats scales block_size times, so it runs with block_size = K, the same format.)
    """
    rng = np.random.default_rng(act_bits)
    k, n = 40, 18
    codes, scales, _ = random_weight(rng, n, k, 4, k, True, ScaleKind.FLOAT16, exact=True)
    a = exact_activations(rng, (2, k), k, act_bits)
    fmt = {"k": k, "bits": 4, "symmetric": True, "act_bits": act_bits}
    model = matmul_model(
        n=n, codes=codes, scales=scales, zero_points=None, bias=None, block_size=1 << 30, **fmt
    )
    want = matmul_reference(a, codes, scales, None, block_size=k, **fmt)
    np.testing.assert_array_equal(run_matmul(model, a), want.astype(np.float32))


@pytest.mark.parametrize("act_bits", [2, 3, 5, 6, 7])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_exact_other_act_bits(isa: str, bits: int, symmetric: bool, act_bits: int) -> None:
    """The remaining activation widths (the quantizer's clip range changes with act_bits)."""
    rng = np.random.default_rng(bits * 100 + act_bits * 10 + symmetric)
    k, n, block_size = 45, 33, 16
    codes, scales, zero_points = random_weight(
        rng, n, k, bits, block_size, symmetric, ScaleKind.FLOAT16, exact=True
    )
    a = exact_activations(rng, (7, k), block_size, act_bits)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": act_bits}
    got = run_matmul(
        matmul_model(n=n, codes=codes, scales=scales, zero_points=zero_points, bias=None, **fmt), a
    )
    want = matmul_reference(a, codes, scales, zero_points, **fmt)
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"isa={isa}")


# ---------------------------------------------------------------------------------------------
# Operand convention: A given as codes (in_bits, inputs 5/6), Y given as codes (out_bits, outputs 1/2)


def io_model(
    *,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    symmetric: bool,
    act_bits: int,
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bias: np.ndarray | None,
    in_fmt: BlockFormat | None = None,
    out_fmt: BlockFormat | None = None,
    node_name: str = "mm",
    a_scales_dtype: int | None = None,
    extra_attrs: dict[str, Any] | None = None,
    wire_a_zero_points: bool | None = None,
) -> bytes:
    """One BlockMatMul with A float or quantized (graph inputs A, A_scales, A_zero_points) and Y
    float or quantized (graph outputs Y, Y_scales, Y_zero_points)."""
    inits = [numpy_helper.from_array(codes, "W_codes"), numpy_helper.from_array(scales, "W_scales")]
    inputs = ["A", "W_codes", "W_scales", "", "", "", ""]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "W_zero_points"))
        inputs[3] = "W_zero_points"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs[4] = "bias"
    attrs: dict[str, Any] = {
        "K": k,
        "N": n,
        "bits": bits,
        "block_size": block_size,
        "symmetric": int(symmetric),
        "act_bits": act_bits,
    }
    graph_inputs = []
    if in_fmt is None:
        graph_inputs.append(helper.make_tensor_value_info("A", TensorProto.FLOAT, None))
    else:
        attrs.update(in_bits=in_fmt.bits, in_block_size=in_fmt.block_size, in_symmetric=int(in_fmt.symmetric))
        scale_type = a_scales_dtype or helper.np_dtype_to_tensor_dtype(in_fmt.scale_dtype)
        graph_inputs += [
            helper.make_tensor_value_info("A", TensorProto.UINT8, None),
            helper.make_tensor_value_info("A_scales", scale_type, None),
        ]
        inputs[5] = "A_scales"
        if wire_a_zero_points if wire_a_zero_points is not None else not in_fmt.symmetric:
            graph_inputs.append(helper.make_tensor_value_info("A_zero_points", TensorProto.UINT8, None))
            inputs[6] = "A_zero_points"
    while inputs[-1] == "":
        inputs.pop()
    outputs = ["Y"]
    graph_outputs = [
        helper.make_tensor_value_info("Y", TensorProto.FLOAT if out_fmt is None else TensorProto.UINT8, None)
    ]
    if out_fmt is not None:
        attrs.update(
            out_bits=out_fmt.bits,
            out_block_size=out_fmt.block_size,
            out_symmetric=int(out_fmt.symmetric),
            out_scale_kind=out_fmt.scale_kind.value,
        )
        outputs.append("Y_scales")
        graph_outputs.append(
            helper.make_tensor_value_info(
                "Y_scales", helper.np_dtype_to_tensor_dtype(out_fmt.scale_dtype), None
            )
        )
        if not out_fmt.symmetric:
            outputs.append("Y_zero_points")
            graph_outputs.append(helper.make_tensor_value_info("Y_zero_points", TensorProto.UINT8, None))
    attrs.update(extra_attrs or {})
    node = helper.make_node(BLOCK_MATMUL, inputs, outputs, domain=DOMAIN, name=node_name, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return model.SerializeToString()


def quantized_feeds(q: QuantizedTensor) -> dict[str, np.ndarray]:
    feeds = {"A": q.codes, "A_scales": q.scales}
    if q.zero_points is not None:
        feeds["A_zero_points"] = q.zero_points
    return feeds


def as_quantized(outputs: list[np.ndarray], fmt: BlockFormat, axis_size: int) -> QuantizedTensor:
    return QuantizedTensor(outputs[0], outputs[1], outputs[2] if len(outputs) > 2 else None, axis_size, fmt)


def assert_same_quantized(got: QuantizedTensor, want: QuantizedTensor, context: str) -> None:
    """Codes, scales and zero points compared one by one (a swap of two outputs must fail)."""
    np.testing.assert_array_equal(got.codes, want.codes, err_msg=f"codes, {context}")
    assert got.scales.dtype == want.scales.dtype, context
    np.testing.assert_array_equal(got.scales, want.scales, err_msg=f"scales, {context}")
    if want.zero_points is None:
        assert got.zero_points is None, context
    else:
        np.testing.assert_array_equal(got.zero_points, want.zero_points, err_msg=f"zero points, {context}")


# Every pair of (act_bits, zero-point mode, bits, shape), on every path (was the full product: 72).
@pytest.mark.parametrize(
    "act_bits,symmetric,bits,shape",
    covering_pairs([2, 4, 5, 8], [True, False], [3, 4, 8], [(75, 16, (2, 5)), (96, 32, (3, 13)), (64, 16, (1, 7))]),
    ids=lambda v: {75: "partial-block", 96: "whole-blocks-39-rows", 64: "whole-blocks-7-rows"}[v[0]]
    if isinstance(v, tuple) else row_id(v),
)
def test_own_format_codes_give_the_float_result_bit_for_bit(
    isa: str, bits: int, symmetric: bool, act_bits: int, shape: tuple[int, int, tuple[int, int]]
) -> None:
    """A quantized by BlockQuantize's spec in the kernel's own activation format (act_bits, block_size,
    symmetric, float32 scales) gives exactly the Y of the float A: the kernel skips its quantization,
    which is deterministic. Random data (not exact), N with a partial tile; K with a partial block, or
    whole blocks (8-bit codes then take the kernels' unpadded fast path) with 7 rows (decode kernels)
    or 39 (the row-chunked prefill)."""
    k, block_size, rows = shape
    rng = np.random.default_rng(bits * 100 + act_bits * 10 + symmetric + k)
    n = 37
    codes, scales, zero_points = random_weight(
        rng, n, k, bits, block_size, symmetric, ScaleKind.FLOAT16, exact=False
    )
    bias = rng.standard_normal(n).astype(np.float32)
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    a[..., ::7] *= 9
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": act_bits}
    common = {"n": n, "codes": codes, "scales": scales, "zero_points": zero_points, "bias": bias, **fmt}
    from_float = run_matmul(io_model(**common), a)
    own = activation_format(act_bits, block_size)
    q = quantize(a, own)
    from_codes = bct_onnx.session(io_model(in_fmt=own, **common)).run(None, quantized_feeds(q))[0]
    assert from_codes.shape == (*rows, n)
    np.testing.assert_array_equal(from_codes, from_float, err_msg=f"isa={isa}")


@pytest.mark.parametrize(
    "in_fmt",
    [
        BlockFormat(8, 16, True, ScaleKind.FLOAT16),  # other scale kind
        BlockFormat(8, 16, False, ScaleKind.FLOAT16),  # asymmetric (post-GELU)
        BlockFormat(6, 8, True, ScaleKind.POW2),  # other width and block size
        BlockFormat(4, 32, False, ScaleKind.FLOAT32),
        BlockFormat(8, 16, True, ScaleKind.FLOAT32),  # own format when act_bits = 8
    ],
    ids=["8-16-sym-f16", "8-16-asym-f16", "6-8-sym-pow2", "4-32-asym-f32", "8-16-sym-f32"],
)
@pytest.mark.parametrize("act_bits", [0, 8])
def test_quantized_a_is_dequantized_then_used_as_float(isa: str, in_fmt: BlockFormat, act_bits: int) -> None:
    """Any quantized A other than the own format: Y equals the Y of dequantize(A) given as float A,
    bit for bit (same kernel path), and the spec's block_matmul within the stated tolerance."""
    rng = np.random.default_rng(in_fmt.bits * 7 + in_fmt.block_size + act_bits)
    k, n, block_size = 70, 20, 16
    codes, scales, zero_points = random_weight(
        rng, n, k, 4, block_size, False, ScaleKind.FLOAT16, exact=False
    )
    a = rng.standard_normal((3, k)).astype(np.float32)
    if not in_fmt.symmetric:
        a = np.maximum(a, -0.17).astype(np.float32)  # one-signed, as after GELU
    q = quantize(a, in_fmt)
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": False, "act_bits": act_bits}
    common = {"n": n, "codes": codes, "scales": scales, "zero_points": zero_points, "bias": None, **fmt}
    got = bct_onnx.session(io_model(in_fmt=in_fmt, **common)).run(None, quantized_feeds(q))[0]
    np.testing.assert_array_equal(got, run_matmul(io_model(**common), dequantize(q)), err_msg=f"isa={isa}")
    want = matmul_reference(q, codes, scales, zero_points, **fmt)
    tol = tolerance(q, codes, scales, zero_points, **fmt)
    assert np.all(np.abs(got - want) <= tol)


@pytest.mark.parametrize(
    "out_fmt",
    [
        BlockFormat(8, 32, True, ScaleKind.FLOAT16),
        BlockFormat(8, 16, False, ScaleKind.FLOAT16),
        BlockFormat(5, 7, True, ScaleKind.POW2),
        BlockFormat(3, 32, False, ScaleKind.FLOAT32),
    ],
    ids=["8-32-sym-f16", "8-16-asym-f16", "5-7-sym-pow2", "3-32-asym-f32"],
)
@pytest.mark.parametrize("act_bits", [0, 8])
def test_quantized_output_is_block_format_quantize_of_y(
    isa: str, out_fmt: BlockFormat, act_bits: int
) -> None:
    """Exactly representable data: Y is exact, so its requantization along N must equal
    block_format.quantize(Y) bit for bit (codes, scales, zero points each on its own)."""
    rng = np.random.default_rng(out_fmt.bits + out_fmt.block_size + act_bits)
    k, n, block_size = 29, 37, 8
    codes, scales, _zero_points = random_weight(rng, n, k, 4, block_size, True, ScaleKind.FLOAT32, exact=True)
    bias = (rng.integers(-8, 9, n) / 2).astype(np.float32)
    a = exact_activations(rng, (2, 3, k), block_size, act_bits)
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": True, "act_bits": act_bits}
    common = {"n": n, "codes": codes, "scales": scales, "zero_points": None, "bias": bias, **fmt}
    y = matmul_reference(a, codes, scales, None, bias=bias, **fmt)
    assert np.array_equal(y.astype(np.float32).astype(np.float64), y), "test data not exact in float32"
    outputs = bct_onnx.session(io_model(out_fmt=out_fmt, **common)).run(None, {"A": a})
    assert len(outputs) == (2 if out_fmt.symmetric else 3)
    assert outputs[0].shape == (2, 3, out_fmt.row_bytes(n)) and outputs[0].dtype == np.uint8
    want = block_matmul(a, codes, scales, None, bias=bias, out_fmt=out_fmt, **fmt)
    assert isinstance(want, QuantizedTensor)
    assert_same_quantized(as_quantized(outputs, out_fmt, n), want, f"isa={isa}")


def test_quantized_in_and_out_random_data(isa: str) -> None:
    """The MiniLM FFN shape in small: codes in (own format) and codes out. The kernel's float Y may
    differ from the float64 spec by accumulation order, so the comparison is on dequantized values,
    each within one output step of the spec's plus the stated matmul tolerance."""
    rng = np.random.default_rng(5)
    k, n, block_size = 96, 160, 32
    codes, scales, _ = random_weight(rng, n, k, 4, block_size, True, ScaleKind.FLOAT16, exact=False)
    bias = rng.standard_normal(n).astype(np.float32)
    a = rng.standard_normal((4, 3, k)).astype(np.float32)
    own = activation_format(8, block_size)
    out_fmt = BlockFormat(8, 32, True, ScaleKind.FLOAT16)
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": True, "act_bits": 8}
    model = io_model(
        n=n, codes=codes, scales=scales, zero_points=None, bias=bias, in_fmt=own, out_fmt=out_fmt, **fmt
    )
    q = quantize(a, own)
    got = dequantize(as_quantized(bct_onnx.session(model).run(None, quantized_feeds(q)), out_fmt, n))
    y = matmul_reference(q, codes, scales, None, bias=bias, **fmt)
    step = np.repeat(
        np.abs(scales_to_float32(quantize(y.astype(np.float32), out_fmt).scales, ScaleKind.FLOAT16)), 32, -1
    )[..., :n]
    tol = tolerance(q, codes, scales, None, **fmt) + step
    assert np.all(np.abs(got - y) <= tol), (
        f"isa={isa}: max error / tolerance = {np.max(np.abs(got - y) / tol):.3g}"
    )


def _io_spec(**overrides: Any) -> dict[str, Any]:
    spec = _valid(act_bits=8)
    spec.pop("node_name")
    spec.update(node_name="bad_mm", in_fmt=activation_format(8, 16))
    spec.update(overrides)
    return spec


def _expect_io_error(spec: dict[str, Any], feeds: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(Exception, match=re.escape(PREFIX + message)):
        bct_onnx.session(io_model(**spec)).run(None, feeds)


def test_bad_quantized_operand() -> None:
    """in_bits range, A dtype and shape vs K, missing A_scales, zero points iff asymmetric, scale dtype."""
    own = activation_format(8, 16)
    q = quantize(np.ones((2, 40), np.float32), own)
    feeds = quantized_feeds(q)
    _expect_io_error(
        _io_spec(extra_attrs={"in_bits": 9}), feeds, "attribute 'in_bits' must be 0 (float) or in 2..8, got 9"
    )
    _expect_io_error(
        _io_spec(extra_attrs={"in_block_size": 0}),
        feeds,
        "attribute 'in_block_size' must be in 1..2147483648 when in_bits > 0, got 0",
    )
    _expect_io_error(
        _io_spec(),
        dict(feeds, A=q.codes[:, :-1]),
        "input 'A' (codes) must have last dimension row_bytes(K 40, in_bits 8) = 40, got shape [2, 39]",
    )
    _expect_io_error(
        _io_spec(),
        dict(feeds, A_scales=q.scales[:, :2]),
        "input 'A_scales' must have shape [2, 3] (A's leading dims and ceil(K 40 / in_block_size 16)), got [2, 2]",
    )
    _expect_io_error(
        _io_spec(a_scales_dtype=TensorProto.DOUBLE),
        dict(feeds, A_scales=q.scales.astype(np.float64)),
        "input 'A_scales' must be float16, float32, float8e5m2 or uint8 (pow2 exponents), got float64",
    )
    spec = _io_spec()
    spec["extra_attrs"] = {}
    model = onnx.load_from_string(io_model(**spec))
    del model.graph.node[0].input[5:]
    del model.graph.input[1]
    with pytest.raises(
        Exception, match=re.escape(PREFIX + "input 'A_scales' (input 5) is required when in_bits > 0")
    ):
        bct_onnx.session(model.SerializeToString()).run(None, {"A": q.codes})
    asym = BlockFormat(8, 16, False, ScaleKind.FLOAT32)
    qa = quantize(np.ones((2, 40), np.float32), asym)
    _expect_io_error(
        _io_spec(in_fmt=asym, wire_a_zero_points=False),
        {"A": qa.codes, "A_scales": qa.scales},
        "input 'A_zero_points' (input 6) is required when in_symmetric=0",
    )
    _expect_io_error(
        _io_spec(wire_a_zero_points=True),
        dict(feeds, A_zero_points=np.zeros((2, 3), np.uint8)),
        "input 'A_zero_points' must be absent when in_symmetric=1",
    )


def test_bad_quantized_result_attributes() -> None:
    feeds = {"A": np.ones((2, 40), np.float32)}
    out = BlockFormat(8, 32, True, ScaleKind.FLOAT16)
    _expect_io_error(
        _io_spec(in_fmt=None, out_fmt=out, extra_attrs={"out_bits": 1}),
        feeds,
        "attribute 'out_bits' must be 0 (float) or in 2..8, got 1",
    )
    _expect_io_error(
        _io_spec(in_fmt=None, out_fmt=out, extra_attrs={"out_scale_kind": "bfloat16"}),
        feeds,
        "attribute 'out_scale_kind' must be 'float16', 'float32' or 'pow2', got 'bfloat16'",
    )


# ---------------------------------------------------------------------------------------------
# Float-offset weights (W_zero_points float16 / float32: value = u * scale + offset), every path

OFFSET_DTYPES = {
    ScaleKind.FLOAT16: np.float16,
    ScaleKind.FLOAT32: np.float32,
    ScaleKind.POW2: np.float16,
    ScaleKind.FLOAT8E5M2: np.float16,
}


def offset_weight(
    rng: np.random.Generator, n: int, k: int, bits: int, block_size: int, kind: ScaleKind, exact: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed codes, stored scales and float offsets (the spec's dtype for kind) of a random weight.

    exact: power-of-two scales and offsets that are multiples of 1/4 in [-8, 8], so every product and
    sum the kernels form is exact in float32. Otherwise offsets near -scale * 2**(bits-1) (a block
    around 0, as real weights), scaled at random.
    """
    codes, scales, _ = random_weight(rng, n, k, bits, block_size, True, kind, exact)
    nb = scales.shape[1]
    if exact:
        offsets = (rng.integers(-32, 33, (n, nb)) / 4).astype(OFFSET_DTYPES[kind])
    else:
        step = np.abs(scales_to_float32(scales, kind))
        offsets = (-step * (1 << (bits - 1)) * rng.uniform(0.5, 1.5, (n, nb))).astype(OFFSET_DTYPES[kind])
    return codes, np.abs(scales) if kind is not ScaleKind.POW2 else scales, offsets


# Every pair of (bits, scale kind, act_bits) values, on every path (was the full product: 84).
@pytest.mark.parametrize(
    "bits,kind,act_bits", covering_pairs(range(2, 9), KERNEL_SCALE_KINDS, [0, 4, 8]), ids=row_id
)
def test_float_offsets_exact(isa: str, bits: int, kind: ScaleKind, act_bits: int) -> None:
    """K=29 with block_size 8 (partial block), N=37 (partial tile), M=6, bias on odd bits."""
    rng = np.random.default_rng(bits * 997 + act_bits * 13 + list(ScaleKind).index(kind))
    k, n, block_size = 29, 37, 8
    codes, scales, offsets = offset_weight(rng, n, k, bits, block_size, kind, exact=True)
    bias = (rng.integers(-8, 9, n) / 2).astype(np.float32) if bits % 2 else None
    a = exact_activations(rng, (2, 3, k), block_size, act_bits)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": False, "act_bits": act_bits}
    got = run_matmul(matmul_model(n=n, codes=codes, scales=scales, zero_points=offsets, bias=bias, **fmt), a)
    want = matmul_reference(a, codes, scales, offsets, bias=bias, **fmt)
    assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=f"isa={isa}")


# Every pair of (bits, scale kind, act_bits) values, on every path (was the full product: 60).
@pytest.mark.parametrize(
    "bits,kind,act_bits", covering_pairs([2, 3, 4, 5, 8], KERNEL_SCALE_KINDS, [0, 4, 8]), ids=row_id
)
def test_float_offsets_random_within_tolerance(isa: str, bits: int, kind: ScaleKind, act_bits: int) -> None:
    """The stated tolerance of docs/ops.md, K=200 (a partial block), odd N, M=1 (GEMV) and M=9 and 70 (prefill)."""
    rng = np.random.default_rng(11 * bits + act_bits + 5 * list(ScaleKind).index(kind))
    k, n, block_size = 200, 51, 32
    codes, scales, offsets = offset_weight(rng, n, k, bits, block_size, kind, exact=False)
    bias = rng.standard_normal(n).astype(np.float32)
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": False, "act_bits": act_bits}
    model = matmul_model(n=n, codes=codes, scales=scales, zero_points=offsets, bias=bias, **fmt)
    for m in (1, 9, 70):
        a = rng.standard_normal((m, k)).astype(np.float32)
        a[:, ::13] *= 20
        got = run_matmul(model, a)
        want = matmul_reference(a, codes, scales, offsets, bias=bias, **fmt)
        tol = tolerance(a, codes, scales, offsets, **fmt) + np.abs(bias) * U
        err = np.abs(got.astype(np.float64) - want)
        assert np.all(err <= tol), f"isa={isa} M={m}: max error / tolerance = {np.max(err / tol):.3g}"


@pytest.mark.parametrize("act_bits", [0, 8])
@pytest.mark.parametrize("block_size", [16, 64, 5])
def test_float_offsets_spec_quantized_weight(isa: str, block_size: int, act_bits: int) -> None:
    """A weight quantized by the spec (float16 offsets), many tiles and rows: N = 16 * 11, M = 1 and 130."""
    rng = np.random.default_rng(block_size + act_bits)
    k, n = 3 * block_size + 3, 176
    fmt_w = BlockFormat(4, block_size, False, ScaleKind.FLOAT16, "float")
    q = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.1 + 0.05, fmt_w)
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": False, "act_bits": act_bits}
    model = matmul_model(n=n, codes=q.codes, scales=q.scales, zero_points=q.zero_points, bias=None, **fmt)
    for m in (1, 130):
        a = rng.standard_normal((m, k)).astype(np.float32)
        got = run_matmul(model, a)
        want = matmul_reference(a, q.codes, q.scales, q.zero_points, **fmt)
        tol = tolerance(a, q.codes, q.scales, q.zero_points, **fmt)
        assert np.all(np.abs(got - want) <= tol), f"isa={isa} M={m}"


def test_float_offsets_weights_as_graph_inputs(isa: str) -> None:
    """Run-time (non-constant) float32 offsets are repacked per call and give the exact result."""
    rng = np.random.default_rng(6)
    k, n, block_size = 40, 24, 16
    codes, scales, offsets = offset_weight(rng, n, k, 3, block_size, ScaleKind.FLOAT32, exact=True)
    a = exact_activations(rng, (4, k), block_size, 8)
    fmt = {"k": k, "bits": 3, "block_size": block_size, "symmetric": False, "act_bits": 8}
    model = matmul_model(
        n=n, codes=codes, scales=scales, zero_points=offsets, bias=None, constant_weights=False, **fmt
    )
    got = run_matmul(model, a, {"W_codes": codes, "W_scales": scales, "W_zero_points": offsets})
    np.testing.assert_array_equal(got, matmul_reference(a, codes, scales, offsets, **fmt).astype(np.float32))


def test_bad_float_offsets() -> None:
    good = dict(_valid(), symmetric=False)
    _expect_error(
        dict(good, zero_points=np.zeros((12, 3), np.int8)),
        A_OK,
        "input 'W_zero_points' must be uint8 (integer zero points) or float16 / float32 (float offsets: "
        "value = code * scale + offset), got int8",
    )
    _expect_error(
        dict(good, zero_points=np.zeros((12, 3), np.float64)),
        A_OK,
        "input 'W_zero_points' must be uint8 (integer zero points) or float16 / float32",
    )
    _expect_error(
        dict(good, zero_points=np.zeros((12, 2), np.float16)),
        A_OK,
        "input 'W_zero_points' must have shape [N, ceil(K / block_size)] = [12, 3], got [12, 2]",
    )
    _expect_error(
        dict(good, symmetric=True, zero_points=np.zeros((12, 3), np.float16)),
        A_OK,
        "input 'W_zero_points' must be absent when attribute 'symmetric' is 1",
    )


def _anon_huge_pages_kb() -> int | None:
    """AnonHugePages of this process (kB), or None where /proc does not say."""
    try:
        with open("/proc/self/smaps_rollup") as smaps:
            text = smaps.read()
    except OSError:
        return None
    found = re.search(r"AnonHugePages:\s+(\d+) kB", text)
    return int(found.group(1)) if found else None


def test_small_weights_share_pooled_memory_across_sessions() -> None:
    """Weights under 2 MiB are pieces of shared huge-page chunks (cpu/weight_memory.cc): sessions created
    on four threads at once and dropped in another order than created (pieces freed out of order, chunks
    given back and reused) still give the reference bits, and while they live the process holds them in
    huge pages where transparent huge pages are enabled (one session's 40 weights of 0.2 MB: > 2 MiB)."""
    from concurrent.futures import ThreadPoolExecutor

    k, n, block_size = 576, 576, 32
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": True, "act_bits": 8}
    rng = np.random.default_rng(5)
    weights = [random_weight(rng, n, k, 4, block_size, True, ScaleKind.FLOAT16, exact=True) for _ in range(6)]
    a = exact_activations(rng, (1, k), block_size, 8)
    wants = [matmul_reference(a, c, s, z, bias=None, **fmt).astype(np.float32) for c, s, z in weights]
    models = [matmul_model(n=n, codes=c, scales=s, zero_points=z, bias=None, **fmt) for c, s, z in weights]

    def open_and_run(i: int) -> tuple[int, Any]:
        session = bct_onnx.session(models[i])
        np.testing.assert_array_equal(session.run(None, {"A": a})[0], wants[i], err_msg=f"weight {i}")
        return i, session

    for _ in range(3):
        with ThreadPoolExecutor(max_workers=4) as pool:
            sessions = dict(pool.map(open_and_run, range(6)))
        for i in (3, 0, 5):  # dropped out of creation order; the rest run again
            del sessions[i]
        for i, session in sessions.items():
            got = session.run(None, {"A": a})[0]
            np.testing.assert_array_equal(got, wants[i], err_msg=f"weight {i} again")
        sessions.clear()

    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    enabled = False
    if os.path.exists(thp):
        with open(thp) as mode:
            enabled = "[never]" not in mode.read()
    before = _anon_huge_pages_kb()
    if not enabled or before is None:
        pytest.skip("no transparent huge pages here: pooled weights work (above) without them")
    layers = [open_and_run(i % 6)[1] for i in range(40)]
    grown = _anon_huge_pages_kb() - before
    del layers
    assert grown >= 2048, f"40 weights of {weights[0][0].nbytes} bytes took {grown} kB of huge pages"
