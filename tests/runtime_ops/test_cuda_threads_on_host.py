"""The CUDA kernels' per-thread code (runtime_ops/cuda/*_threads.h), run on the host, vs the spec.

No GPU is needed: the test helper library libbct_cuda_threads_host.so (built next to the custom-op
library by a development CMake build, or here from runtime_ops/tests/cuda_threads_on_host.cc when
the package is installed, as in CI; never shipped in wheels) executes every thread of the kernels
of every op (BlockQuantize, BlockDequantize, BlockGather, BlockMatMul, BlockActMatMul, and the row
ops' compute steps, a warp's lanes in turn) one after the other. What it cannot show is the launch
itself (grid sizes, streams); test_library.py::test_cuda_kernels_match_spec covers that where a GPU
exists.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

import bct_onnx
from bct_onnx import reference_attention
from bct_onnx import reference_nonlinear as nl_ref
from bct_onnx.block_format import (
    KERNEL_SCALE_KINDS,
    RUNTIME_SCALE_KINDS,
    BlockFormat,
    ScaleKind,
    dequantize,
    pack_codes,
    quantize,
)
from bct_onnx.reference_fused import EPILOGUES, add_skip, matmul_epilogue
from bct_onnx.reference_ops import matmul_reference

KIND_CODE = {ScaleKind.FLOAT16: 0, ScaleKind.FLOAT32: 1, ScaleKind.POW2: 2, ScaleKind.FLOAT8E5M2: 3}
FORMATS = [
    BlockFormat(bits, block_size, symmetric, kind)
    for bits in range(2, 9)
    for block_size in (8, 5)
    for symmetric in (True, False)
    for kind in KERNEL_SCALE_KINDS
]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the spec warns on extreme rows


RUNTIME_OPS = Path(__file__).resolve().parents[2] / "runtime_ops"
_BUILD_DIR = tempfile.TemporaryDirectory(prefix="bct_cuda_threads_")  # removed when the process ends


def _build_helper() -> Path:
    """The helper next to the library (development CMake builds), else compiled here from the source
    tree (an installed package, as in CI): the same flags that matter for the bits (-ffp-contract=off)."""
    beside = Path(bct_onnx.library_path()).with_name("libbct_cuda_threads_host.so")
    if beside.is_file():
        return beside
    source = RUNTIME_OPS / "tests" / "cuda_threads_on_host.cc"
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if not source.is_file() or compiler is None:
        pytest.skip(
            f"no {beside.name} next to the library and no source tree / C++ compiler to build it",
            allow_module_level=True,
        )
    out = Path(_BUILD_DIR.name) / beside.name
    cmd = [compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wextra"]
    cmd += ["-I", str(RUNTIME_OPS / "include"), "-I", str(RUNTIME_OPS / "cuda"), str(source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"building {beside.name} failed: {' '.join(cmd)}\n{result.stderr[-3000:]}"
    return out


HELPER = _build_helper()


def _helper() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(HELPER))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.bct_host_quantize.argtypes = [
        ctypes.c_int,
        i64,
        ctypes.c_int,
        ctypes.c_int,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
    ]
    lib.bct_host_dequantize.argtypes = [
        ctypes.c_int,
        i64,
        ctypes.c_int,
        ctypes.c_int,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
    ]
    lib.bct_host_gather.argtypes = [
        ctypes.c_int,
        i64,
        ctypes.c_int,
        ctypes.c_int,
        i64,
        ptr,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
    ]
    lib.bct_host_dequantize_offsets.argtypes = [
        ctypes.c_int,
        i64,
        ctypes.c_int,
        ctypes.c_int,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
    ]
    lib.bct_host_matmul.argtypes = [i64, i64, ctypes.c_int, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.bct_host_matmul.argtypes += [ctypes.c_int, i64] + [ptr] * 8
    lib.bct_host_act_matmul.argtypes = [ctypes.c_int, i64, ctypes.c_int, i64, i64, i64, i64, i64, i64]
    lib.bct_host_act_matmul.argtypes += [ctypes.c_int] + [ptr] * 6
    lib.bct_host_row_op.argtypes = [ctypes.c_int, i64, i64, ptr, ptr, ptr, ctypes.c_float]
    lib.bct_host_row_op.restype = ctypes.c_int
    lib.bct_host_matmul_epilogue.argtypes = [ctypes.c_int, i64, i64, ptr, ptr]
    lib.bct_host_add_norm.argtypes = [ctypes.c_int, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_float]
    lib.bct_host_add_norm.restype = ctypes.c_int
    lib.bct_host_attention.argtypes = [ctypes.c_int, i64, ctypes.c_float, ctypes.c_int] + [i64] * 6 + [ptr]
    # kv_bits, kv_block_size, kv_symmetric, scale_kind; K, K scales, K zero points, V, ...; mask, strides, y
    lib.bct_host_attention.argtypes += [ctypes.c_int, i64, ctypes.c_int, ctypes.c_int] + [ptr] * 6 + [ptr] * 3
    lib.bct_host_attention.argtypes += [ctypes.c_int]  # packed: Q, K, V, Y [B, S, H * Dh]
    # act_bits, block_size, scale, B, Hq, Hkv, Sq, past, Dh, packed, rot, cos batch stride; Q, K_new, V_new,
    # cos, sin; kv_bits, kv_block_size, scale_kind; past K, K scales, V, V scales; mask, strides;
    # present K, K scales, V, V scales; Y
    lib.bct_host_attention_step.argtypes = (
        [ctypes.c_int, i64, ctypes.c_float] + [i64] * 6 + [ctypes.c_int, i64, i64]
    )
    lib.bct_host_attention_step.argtypes += [ptr] * 5 + [ctypes.c_int, i64, ctypes.c_int] + [ptr] * 11
    return lib


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _fmt_args(fmt: BlockFormat, axis_size: int) -> tuple[int, int, int, int, int]:
    return fmt.bits, fmt.block_size, int(fmt.symmetric), KIND_CODE[fmt.scale_kind], axis_size


def _id(fmt: BlockFormat) -> str:
    return f"b{fmt.bits}-bs{fmt.block_size}-{'sym' if fmt.symmetric else 'asym'}-{fmt.scale_kind.value}"


def _rows(axis_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.stack(
        [
            rng.standard_normal(axis_size),
            rng.integers(-16, 17, axis_size) / 2.0,
            np.zeros(axis_size),
            np.abs(rng.standard_normal(axis_size)) * 1e3,
            rng.standard_normal(axis_size) * 1e-6,
        ]
    )
    return x.astype(np.float32)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.scale_kind in RUNTIME_SCALE_KINDS], ids=_id)
def test_quantize_threads(kit, fmt: BlockFormat) -> None:
    lib = _helper()
    axis_size = 37
    x = _rows(axis_size, fmt.bits)
    want = quantize(x, fmt)
    codes = np.full_like(want.codes, 0xAA)  # every byte must be written
    scales = np.zeros_like(want.scales)
    zero_points = None if fmt.symmetric else np.zeros_like(want.zero_points)
    lib.bct_host_quantize(
        *_fmt_args(fmt, axis_size), x.shape[0], _ptr(x), _ptr(codes), _ptr(scales), _ptr(zero_points)
    )
    kit.assert_bits_equal(codes, want.codes, "codes")
    kit.assert_bits_equal(scales, want.scales, "scales")
    if zero_points is not None:
        kit.assert_bits_equal(zero_points, want.zero_points, "zero_points")


@pytest.mark.parametrize("fmt", FORMATS, ids=_id)
def test_dequantize_and_gather_threads(kit, fmt: BlockFormat) -> None:
    lib = _helper()
    axis_size = 29
    q = quantize(np.random.default_rng(fmt.bits).standard_normal((6, axis_size)).astype(np.float32), fmt)
    want = dequantize(q)
    out = np.full(want.shape, np.nan, np.float32)
    lib.bct_host_dequantize(
        *_fmt_args(fmt, axis_size), 6, _ptr(q.codes), _ptr(q.scales), _ptr(q.zero_points), _ptr(out)
    )
    kit.assert_bits_equal(out, want, "dequantized")
    rows = np.array([5, 0, 3, 3], np.int64)  # the CUDA op gets validated, non-negative rows
    gathered = np.full((4, axis_size), np.nan, np.float32)
    lib.bct_host_gather(
        *_fmt_args(fmt, axis_size),
        _ptr(rows),
        4,
        _ptr(q.codes),
        _ptr(q.scales),
        _ptr(q.zero_points),
        _ptr(gathered),
    )
    kit.assert_bits_equal(gathered, want[rows], "gathered")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", KERNEL_SCALE_KINDS, ids=lambda k: k.value)
def test_dequantize_float_offsets_threads(kit, bits: int, kind: ScaleKind) -> None:
    """CUDA's per-thread value of float-offset blocks (u * scale + offset), float16 or float32 offsets."""
    lib = _helper()
    axis_size = 29
    fmt = BlockFormat(bits, 8, False, kind, "float")
    q = quantize(np.random.default_rng(bits).standard_normal((6, axis_size)).astype(np.float32) + 1.0, fmt)
    assert q.zero_points is not None
    want = dequantize(q)
    out = np.full(want.shape, np.nan, np.float32)
    zero_point_kind = 1 if q.zero_points.dtype == np.float16 else 2
    lib.bct_host_dequantize_offsets(
        bits,
        8,
        KIND_CODE[kind],
        zero_point_kind,
        axis_size,
        6,
        _ptr(q.codes),
        _ptr(q.scales),
        _ptr(q.zero_points),
        _ptr(out),
    )
    kit.assert_bits_equal(out, want, "dequantized")


# ---------------------------------------------------------------------------------------------
# BlockMatMul: exact data (power-of-two scales, activations whose blocks have a unique largest
# element +-2**(act_bits-1) * 2**e), so the float64 reference is the float32 result bit for bit.


def _exact_weight(
    rng: np.random.Generator, n: int, k: int, bits: int, block_size: int, symmetric: bool, kind
):
    nb = -(-k // block_size)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    exponents = rng.integers(-1, 2, (n, nb))
    if kind is ScaleKind.POW2:
        scales = (exponents + 127).astype(np.uint8)
    else:
        scales = np.ldexp(1.0, exponents).astype(np.float16 if kind is ScaleKind.FLOAT16 else np.float32)
    zero_points = None if symmetric else rng.integers(0, 1 << bits, (n, nb)).astype(np.uint8)
    return pack_codes(codes, bits), scales, zero_points


def _exact_activations(
    rng: np.random.Generator, rows: int, k: int, block_size: int, act_bits: int
) -> np.ndarray:
    if act_bits == 0:
        return rng.integers(-8, 9, (rows, k)).astype(np.float32)
    half = 1 << (act_bits - 1)
    a = rng.integers(-(half - 1), half, (rows, k)).astype(np.float64)
    for b0 in range(0, k, block_size):
        width = min(block_size, k - b0)
        e = np.ldexp(1.0, rng.integers(-1, 1, rows))
        a[:, b0 : b0 + width] *= e[:, None]
        a[np.arange(rows), b0 + rng.integers(0, width, rows)] = (
            np.where(rng.random(rows) < 0.5, -half, half) * e
        )
    return a.astype(np.float32)


@pytest.mark.parametrize("act_bits", [0, 4, 8])
@pytest.mark.parametrize(
    "kind", [ScaleKind.FLOAT16, ScaleKind.FLOAT32, ScaleKind.POW2], ids=lambda k: k.value
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_matmul_threads(kit, bits: int, symmetric: bool, kind: ScaleKind, act_bits: int) -> None:
    """Every output element's thread (and, with act_bits, every activation block's), K=29 in blocks
    of 8 (a partial last block), with and without bias: the spec's values bit for bit."""
    lib = _helper()
    rng = np.random.default_rng(bits * 100 + symmetric * 10 + act_bits)
    rows, k, n, block_size = 6, 29, 11, 8
    codes, scales, zero_points = _exact_weight(rng, n, k, bits, block_size, symmetric, kind)
    a = _exact_activations(rng, rows, k, block_size, act_bits)
    bias = (rng.integers(-8, 9, n) / 2).astype(np.float32) if bits % 2 else None
    fmt = {"k": k, "bits": bits, "block_size": block_size, "symmetric": symmetric, "act_bits": act_bits}
    want = matmul_reference(a, codes, scales, zero_points, bias=bias, **fmt)
    assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"
    y = np.full((rows, n), np.nan, np.float32)
    lib.bct_host_matmul(
        k, n, bits, block_size, int(symmetric), act_bits, KIND_CODE[kind], 0, rows,
        _ptr(a), None, None, _ptr(codes), _ptr(scales), _ptr(zero_points), _ptr(bias), _ptr(y),
    )  # fmt: skip
    kit.assert_bits_equal(y, want.astype(np.float32), "Y")
    if act_bits:  # A given as codes in the activation format: the unpacking threads, same Y
        qa = quantize(a, BlockFormat(act_bits, block_size, True, ScaleKind.FLOAT32))
        y2 = np.full((rows, n), np.nan, np.float32)
        lib.bct_host_matmul(
            k, n, bits, block_size, int(symmetric), act_bits, KIND_CODE[kind], 0, rows,
            None, _ptr(qa.codes), _ptr(qa.scales), _ptr(codes), _ptr(scales), _ptr(zero_points), _ptr(bias), _ptr(y2),
        )  # fmt: skip
        kit.assert_bits_equal(y2, want.astype(np.float32), "Y from activation codes")


@pytest.mark.parametrize("offset_dtype", [np.float16, np.float32], ids=["f16-offsets", "f32-offsets"])
@pytest.mark.parametrize("act_bits", [0, 8])
def test_matmul_threads_float_offsets(kit, offset_dtype: type, act_bits: int) -> None:
    """Float-offset weights (value u * scale + offset): exact data, the spec's values bit for bit."""
    lib = _helper()
    rng = np.random.default_rng(act_bits + 7)
    rows, k, n, block_size, bits = 5, 21, 9, 8, 4
    codes, scales, _ = _exact_weight(rng, n, k, bits, block_size, True, ScaleKind.FLOAT16)
    offsets = (rng.integers(-4, 5, (n, -(-k // block_size))) / 2).astype(offset_dtype)
    a = _exact_activations(rng, rows, k, block_size, act_bits)
    want = matmul_reference(a, codes, scales, offsets, k=k, bits=bits, block_size=block_size, symmetric=False,
                            act_bits=act_bits)  # fmt: skip
    assert np.array_equal(want.astype(np.float32).astype(np.float64), want), "test data not exact in float32"
    y = np.full((rows, n), np.nan, np.float32)
    zero_point_kind = 1 if offset_dtype is np.float16 else 2
    lib.bct_host_matmul(
        k, n, bits, block_size, 0, act_bits, KIND_CODE[ScaleKind.FLOAT16], zero_point_kind, rows,
        _ptr(a), None, None, _ptr(codes), _ptr(scales), _ptr(offsets), None, _ptr(y),
    )  # fmt: skip
    kit.assert_bits_equal(y, want.astype(np.float32), "Y")


# ---------------------------------------------------------------------------------------------
# BlockActMatMul and the row ops: random data, the spec of bct_onnx.reference_nonlinear bit for bit.


@pytest.mark.parametrize("transpose_b", [False, True], ids=["b", "b-transposed"])
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "bits", "block_size"),
    [
        ((2, 3, 5, 40), (1, 3, 40, 7), 8, 16),
        ((4, 9, 33), (33, 6), 4, 8),
        ((1, 2, 3, 64), (1, 2, 64, 5), 8, 32),
    ],
    ids=["broadcast-batch", "no-b-batch", "heads"],
)
def test_act_matmul_threads(kit, a_shape, b_shape, bits: int, block_size: int, transpose_b: bool) -> None:
    lib = _helper()
    rng = np.random.default_rng(len(a_shape) * 10 + bits)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    want = nl_ref.act_matmul(a, b, bits, block_size)
    m, k = a_shape[-2:]
    n = b_shape[-1]
    out_batch = np.broadcast_shapes(a_shape[:-2], b_shape[:-2])
    rank = len(out_batch)

    def strides(shape: tuple[int, ...]) -> np.ndarray:
        dims = (1,) * (rank - len(shape)) + tuple(shape)
        step = np.cumprod((1,) + dims[::-1])[:-1][::-1]  # row-major strides in batch units
        return np.where(np.array(dims) == 1, 0, step).astype(np.int64)

    b_in = np.ascontiguousarray(np.swapaxes(b, -1, -2)) if transpose_b else b
    out_dims, a_strides, b_strides = (
        np.array(out_batch, np.int64),
        strides(a_shape[:-2]),
        strides(b_shape[:-2]),
    )
    y = np.full(want.shape, np.nan, np.float32)
    lib.bct_host_act_matmul(
        bits, block_size, int(transpose_b), m, k, n,
        int(np.prod(a_shape[:-2])), int(np.prod(b_shape[:-2])), int(np.prod(out_batch)), rank,
        _ptr(out_dims), _ptr(a_strides), _ptr(b_strides), _ptr(a), _ptr(b_in), _ptr(y),
    )  # fmt: skip
    kit.assert_bits_equal(y, want, "Y")


@pytest.mark.parametrize("act_bits", [4, 8])
def test_non_finite_activation_threads(kit, act_bits: int) -> None:
    """A block holding a NaN or an infinity makes its row of Y NaN (docs/ops.md): from float A (the
    quantizer threads) and from A's codes in the activation format (the unpacking threads)."""
    lib = _helper()
    rng = np.random.default_rng(act_bits)
    rows, k, n, block_size = 4, 29, 11, 8
    codes, scales, _ = _exact_weight(rng, n, k, 4, block_size, True, ScaleKind.FLOAT16)
    a = _exact_activations(rng, rows, k, block_size, act_bits)
    a[1, 2], a[2, 20], a[3, 28] = np.nan, np.inf, -np.inf
    fmt = {"k": k, "bits": 4, "block_size": block_size, "symmetric": True, "act_bits": act_bits}
    want = matmul_reference(a, codes, scales, None, **fmt).astype(np.float32)
    assert np.isnan(want[1:]).all() and np.isfinite(want[0]).all()
    qa = quantize(a, BlockFormat(act_bits, block_size, True, ScaleKind.FLOAT32))
    for a_in, a_codes, a_scales, what in ((a, None, None, "float A"), (None, qa.codes, qa.scales, "A codes")):
        y = np.zeros((rows, n), np.float32)
        lib.bct_host_matmul(
            k, n, 4, block_size, 1, act_bits, KIND_CODE[ScaleKind.FLOAT16], 0, rows,
            _ptr(a_in), _ptr(a_codes), _ptr(a_scales), _ptr(codes), _ptr(scales), None, None, _ptr(y),
        )  # fmt: skip
        assert np.isnan(y[1:]).all(), f"{what}: rows with a non-finite activation must be NaN, got {y[1:]}"
        kit.assert_bits_equal(y[0], want[0], f"{what}: the finite row")


def test_act_matmul_threads_infinity(kit) -> None:
    """An infinity in A or B: every output its block feeds is NaN, the others the spec's bits."""
    lib = _helper()
    rng = np.random.default_rng(5)
    m, k, n, bits, block_size = 5, 40, 7, 8, 16
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    a[1, 3], b[30, 2] = np.inf, -np.inf
    want = nl_ref.act_matmul(a, b, bits, block_size)
    assert np.isnan(want[1]).all() and np.isnan(want[:, 2]).all()
    y = np.zeros((m, n), np.float32)
    one = np.zeros(0, np.int64)
    lib.bct_host_act_matmul(
        bits, block_size, 0, m, k, n, 1, 1, 1, 0, _ptr(one), _ptr(one), _ptr(one), _ptr(a), _ptr(b), _ptr(y),
    )  # fmt: skip
    assert np.array_equal(np.isnan(y), np.isnan(want))
    finite = ~np.isnan(want)
    kit.assert_bits_equal(y[finite], want[finite], "finite outputs")


ROW_OPS = {
    "gelu": (0, lambda x, s, b: nl_ref.gelu(x)),
    "gelu-tanh": (1, lambda x, s, b: nl_ref.gelu(x, "tanh")),
    "silu": (2, lambda x, s, b: nl_ref.silu(x)),
    "softmax": (3, lambda x, s, b: nl_ref.softmax(x)),
    "layer-norm": (4, lambda x, s, b: nl_ref.layer_norm(x, s, b, 1e-5)),
    "layer-norm-no-bias": (4, lambda x, s, b: nl_ref.layer_norm(x, s, None, 1e-5)),
    "rms-norm": (5, lambda x, s, b: nl_ref.rms_norm(x, s, 1e-5)),
}


@pytest.mark.parametrize("d", [1, 7, 40, 100, 384])
@pytest.mark.parametrize("name", list(ROW_OPS))
def test_row_op_threads(kit, name: str, d: int) -> None:
    """Rows shorter and longer than a warp, not multiples of 8 or 32, large and NaN-free values."""
    lib = _helper()
    op, spec = ROW_OPS[name]
    rng = np.random.default_rng(d + op)
    x = (rng.standard_normal((5, d)) * np.array([1, 4, 0.01, 30, 1])[:, None]).astype(np.float32)
    scale = rng.standard_normal(d).astype(np.float32)
    bias = None if name == "layer-norm-no-bias" else rng.standard_normal(d).astype(np.float32)
    want = spec(x, scale, bias)
    y = x.copy()
    assert lib.bct_host_row_op(op, x.shape[0], d, _ptr(y), _ptr(scale), _ptr(bias), 1e-5) == 0
    kit.assert_bits_equal(y, np.asarray(want, np.float32), name)


@pytest.mark.parametrize("n", [2, 14, 80, 768])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_matmul_epilogue_threads(kit, epilogue: str, n: int) -> None:
    """BlockMatMul's epilogue kernel (one thread per output element) against the spec, on the product
    of the MatMul kernel: large, small, zero and -inf / NaN-free values; silu_gate halves the width."""
    lib = _helper()
    rng = np.random.default_rng(n)
    p = (rng.standard_normal((4, n)) * np.array([1, 8, 0.01, 60])[:, None]).astype(np.float32)
    p[0, 0] = 0.0
    want = matmul_epilogue(p, epilogue)
    out = np.full(want.shape, np.nan, np.float32)
    lib.bct_host_matmul_epilogue(EPILOGUES.index(epilogue), p.shape[0], n, _ptr(p), _ptr(out))
    kit.assert_bits_equal(out, want, epilogue)


@pytest.mark.parametrize("d", [1, 7, 40, 384])
@pytest.mark.parametrize("name", ["layer-norm", "layer-norm-no-bias", "rms-norm"])
def test_add_norm_threads(kit, name: str, d: int) -> None:
    """BlockAddLayerNorm / BlockAddRMSNorm's warp per row: the sum (output 3) and the normalized row."""
    lib = _helper()
    op, spec = ROW_OPS[name]
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((5, d)) * np.array([1, 4, 0.01, 30, 1])[:, None]).astype(np.float32)
    skip = (rng.standard_normal((5, d)) * 2).astype(np.float32)
    scale = rng.standard_normal(d).astype(np.float32)
    bias = None if name == "layer-norm-no-bias" else rng.standard_normal(d).astype(np.float32)
    total = add_skip(x, skip)
    y, out_sum = x.copy(), np.full_like(x, np.nan)
    assert (
        lib.bct_host_add_norm(op, 5, d, _ptr(y), _ptr(skip), _ptr(out_sum), _ptr(scale), _ptr(bias), 1e-5)
        == 0
    )
    kit.assert_bits_equal(out_sum, total, f"{name} sum")
    kit.assert_bits_equal(y, np.asarray(spec(total, scale, bias), np.float32), name)


# BlockAttention: (B, Hq, Hkv, Sq, Sk, Dh, act_bits, block_size, causal, mask kind, K/V format, "packed"
# (Q, K, V, Y [B, S, H * Dh]), "qkv" (Q, K, V as one [B, S, (Hq + 2 Hkv) * Dh] tensor) or None)
ATTENTION_CASES = [
    (2, 4, 4, 9, 9, 32, 8, 32, False, "padding", None),
    (1, 9, 3, 1, 129, 64, 8, 32, True, None, None),
    (1, 6, 2, 70, 70, 40, 6, 16, True, "rows", None),
    (1, 9, 3, 1, 80, 64, 8, 32, True, None, BlockFormat(8, 32, True, ScaleKind.FLOAT16)),
    (1, 4, 2, 3, 50, 64, 8, 32, False, "rows", BlockFormat(4, 16, False, ScaleKind.POW2)),
    (2, 4, 4, 9, 9, 32, 8, 32, False, "padding", "packed"),
    (1, 6, 2, 70, 70, 40, 6, 16, True, "rows", "packed"),
    (2, 4, 4, 9, 9, 32, 8, 32, False, "padding", "qkv"),
    (1, 6, 2, 70, 70, 40, 6, 16, True, "rows", "qkv"),
]


def _packed(x: np.ndarray) -> np.ndarray:
    b, h, s, dh = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, s, h * dh))


_SCALE_KIND_CODE = {ScaleKind.FLOAT16: 0, ScaleKind.FLOAT32: 1, ScaleKind.POW2: 2}


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(str(v) for v in c[:6]) + f"_{c[-1]}")
def test_attention_threads(kit, case) -> None:
    """Every thread of BlockAttention's CUDA kernels, run on the host, gives the spec's bits."""

    b, hq, hkv, sq, sk, dh, act_bits, block_size, causal, mask_kind, fmt = case
    packed, qkv = fmt in ("packed", "qkv"), fmt == "qkv"
    fmt = None if packed else fmt
    rng = np.random.default_rng(sk)
    q = (1.5 * rng.standard_normal((b, hq, sq, dh))).astype(np.float32)
    k = (1.5 * rng.standard_normal((b, hkv, sk, dh))).astype(np.float32)
    v = rng.standard_normal((b, hkv, sk, dh)).astype(np.float32)
    mask, strides = None, np.zeros(4, np.int64)
    if mask_kind == "padding":
        mask = np.zeros((b, 1, 1, sk), np.float32)
        mask[-1, ..., sk // 2 :] = np.finfo(np.float32).min
        strides = np.array([sk, 0, 0, 1], np.int64)
    elif mask_kind == "rows":
        mask = rng.standard_normal((sq, sk)).astype(np.float32)
        strides = np.array([0, 0, sk, 1], np.int64)
    k_in, v_in = (quantize(k, fmt), quantize(v, fmt)) if fmt is not None else (k, v)
    scale = float(dh) ** -0.5
    if packed:
        q, k_in, v_in = _packed(q), _packed(k), _packed(v)
        k, v = k_in, v_in
    if qkv:
        q = np.concatenate([q, k, v], axis=-1)
        k_in = v_in = None
    want = reference_attention.attention(
        q,
        k_in,
        v_in,
        act_bits=act_bits,
        block_size=block_size,
        scale=scale,
        mask=mask,
        causal=causal,
        q_heads=hq if packed else None,
        kv_heads=hkv if qkv else None,
    )
    y = np.full_like(want, np.nan)
    lib = _helper()
    if fmt is None:
        kv_args = [0, 0, 1, 0, _ptr(k), None, None, _ptr(v), None, None]
    else:
        kv_args = [fmt.bits, fmt.block_size, int(fmt.symmetric), _SCALE_KIND_CODE[fmt.scale_kind]]
        kv_args += [_ptr(k_in.codes), _ptr(k_in.scales), _ptr(k_in.zero_points)]
        kv_args += [_ptr(v_in.codes), _ptr(v_in.scales), _ptr(v_in.zero_points)]
    lib.bct_host_attention(
        act_bits,
        block_size,
        scale,
        int(causal),
        b,
        hq,
        hkv,
        sq,
        sk,
        dh,
        _ptr(q),
        *kv_args,
        _ptr(mask),
        _ptr(strides),
        _ptr(y),
        2 if qkv else int(packed),
    )
    kit.assert_bits_equal(y, want, "Y")


# The decoder step: (B, Hq, Hkv, Sq, past, Dh, rotary width (0: none), packed layout, K/V format or None)
ATTENTION_STEP_CASES = [
    (1, 9, 3, 1, 40, 64, 64, True, BlockFormat(8, 32, True, ScaleKind.FLOAT16)),
    (2, 4, 2, 3, 9, 64, 16, False, BlockFormat(4, 32, True, ScaleKind.FLOAT16)),
    (1, 6, 3, 2, 7, 40, 40, True, None),
]


@pytest.mark.parametrize(
    "case", ATTENTION_STEP_CASES, ids=lambda c: "x".join(str(v) for v in c[:7]) + f"_{c[-1]}"
)
def test_attention_step_threads(kit, case) -> None:
    """The decoder step's CUDA thread bodies (rotary, cache append, packed Y), run on the host, give
    the spec's bits for Y and each present output."""
    b, hq, hkv, sq, past, dh, rot, packed, fmt = case
    rng = np.random.default_rng(past)
    shape = (lambda h: (b, sq, h * dh)) if packed else (lambda h: (b, h, sq, dh))
    q = (1.5 * rng.standard_normal(shape(hq))).astype(np.float32)
    k_new = (1.5 * rng.standard_normal(shape(hkv))).astype(np.float32)
    v_new = rng.standard_normal(shape(hkv)).astype(np.float32)
    past_k = (1.5 * rng.standard_normal((b, hkv, past, dh))).astype(np.float32)
    past_v = rng.standard_normal((b, hkv, past, dh)).astype(np.float32)
    cos = sin = None
    if rot:
        angles = rng.uniform(0, 6.3, (b, sq, rot)).astype(np.float32)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    sk = past + sq
    visible = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + past
    mask = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)
    strides = np.array([0, 0, sk, 1], np.int64)
    k_in, v_in = (quantize(past_k, fmt), quantize(past_v, fmt)) if fmt is not None else (past_k, past_v)
    want_y, want_k, want_v = reference_attention.attention_step(
        q,
        k_new,
        v_new,
        k_in,
        v_in,
        act_bits=8,
        block_size=32,
        scale=0.125,
        mask=mask,
        cos=cos,
        sin=sin,
        q_heads=hq if packed else None,
    )
    y = np.empty_like(want_y)
    if fmt is None:
        kv = [0, 0, 0, _ptr(past_k), None, _ptr(past_v), None]
        got_k, got_v = np.empty_like(want_k), np.empty_like(want_v)
        present = [_ptr(got_k), None, _ptr(got_v), None]
    else:
        kv = [fmt.bits, fmt.block_size, _SCALE_KIND_CODE[fmt.scale_kind]]
        kv += [_ptr(k_in.codes), _ptr(k_in.scales), _ptr(v_in.codes), _ptr(v_in.scales)]
        got_k = [np.empty_like(want_k.codes), np.empty_like(want_k.scales)]
        got_v = [np.empty_like(want_v.codes), np.empty_like(want_v.scales)]
        present = [_ptr(got_k[0]), _ptr(got_k[1]), _ptr(got_v[0]), _ptr(got_v[1])]
    _helper().bct_host_attention_step(
        8,
        32,
        0.125,
        b,
        hq,
        hkv,
        sq,
        past,
        dh,
        int(packed),
        rot,
        sq * rot if rot else 0,
        _ptr(q),
        _ptr(k_new),
        _ptr(v_new),
        _ptr(cos),
        _ptr(sin),
        *kv,
        _ptr(mask),
        _ptr(strides),
        *present,
        _ptr(y),
    )
    kit.assert_bits_equal(y, want_y, "Y")
    if fmt is None:
        kit.assert_bits_equal(got_k, want_k, "present K")
        kit.assert_bits_equal(got_v, want_v, "present V")
    else:
        kit.assert_bits_equal(got_k[0], want_k.codes, "present K codes")
        kit.assert_bits_equal(got_k[1], want_k.scales, "present K scales")
        kit.assert_bits_equal(got_v[0], want_v.codes, "present V codes")
        kit.assert_bits_equal(got_v[1], want_v.scales, "present V scales")
