"""The CUDA kernels' per-thread code (runtime_ops/cuda/block_threads.h), run on the host, vs the spec.

No GPU is needed: the test helper library libbct_cuda_threads_host.so (built next to the custom-op
library by a development CMake build, never shipped in wheels) executes every thread of the
BlockQuantize, BlockDequantize and BlockGather kernels one after the other. What it cannot show is
the launch itself (grid sizes, streams); test_library.py::test_cuda_kernels_match_spec covers that
where a GPU exists.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

import bct_onnx
from bct_onnx.block_format import RUNTIME_SCALE_KINDS, BlockFormat, ScaleKind, dequantize, quantize

KIND_CODE = {ScaleKind.FLOAT16: 0, ScaleKind.FLOAT32: 1, ScaleKind.POW2: 2, ScaleKind.FLOAT8E5M2: 3}
FORMATS = [
    BlockFormat(bits, block_size, symmetric, kind)
    for bits in range(2, 9)
    for block_size in (8, 5)
    for symmetric in (True, False)
    for kind in ScaleKind
]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the spec warns on extreme rows


HELPER = Path(bct_onnx.library_path()).with_name("libbct_cuda_threads_host.so")
if not HELPER.is_file():
    pytest.skip(
        f"{HELPER.name} is not next to {bct_onnx.library_path()} (built by development CMake builds only; "
        "run with BCT_ONNX_LIBRARY=<build dir>/libbct_onnx_ops.so)",
        allow_module_level=True,
    )


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
@pytest.mark.parametrize("kind", list(ScaleKind), ids=lambda k: k.value)
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
