"""BlockDequantize on CPU against bct_onnx.block_format.dequantize, bit for bit."""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto

from bct_onnx.block_format import (
    KERNEL_SCALE_KINDS,
    BlockFormat,
    QuantizedTensor,
    ScaleKind,
    dequantize,
    dequantize_codes,
    quantize,
    unpack_codes,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # spec overflows on extreme scales

FORMATS = [
    BlockFormat(bits, block_size, symmetric, kind)
    for bits in range(2, 9)
    for block_size in (8, 5)
    for symmetric in (True, False)
    for kind in KERNEL_SCALE_KINDS
]


def _fmt_id(fmt: BlockFormat) -> str:
    return f"b{fmt.bits}-bs{fmt.block_size}-{'sym' if fmt.symmetric else 'asym'}-{fmt.scale_kind.value}"


def random_tensor(fmt: BlockFormat, lead: tuple[int, ...], axis_size: int, seed: int) -> QuantizedTensor:
    """Arbitrary packed bytes (padding bits included), finite scales of the kind, random zero points."""
    rng = np.random.default_rng(seed)
    nb = fmt.num_blocks(axis_size)
    codes = rng.integers(0, 256, lead + (fmt.row_bytes(axis_size),), dtype=np.uint8)
    if fmt.scale_kind is ScaleKind.POW2:
        scales = rng.integers(1, 255, lead + (nb,), dtype=np.uint8)
    else:
        scales = (rng.standard_normal(lead + (nb,)) * 10.0 ** rng.integers(-6, 4, lead + (nb,))).astype(
            fmt.scale_dtype
        )
    zero_points = None if fmt.symmetric else rng.integers(0, 1 << fmt.bits, lead + (nb,), dtype=np.uint8)
    return QuantizedTensor(codes, scales, zero_points, axis_size, fmt)


def check_dequantize(kit, q: QuantizedTensor) -> None:
    feeds = {"codes": q.codes, "scales": q.scales}
    if q.zero_points is not None:
        feeds["zero_points"] = q.zero_points
    (got,) = kit.run(kit.dequantize_model(q.fmt, q.axis_size), feeds)
    kit.assert_bits_equal(got, dequantize(q), "y")


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("axis_size", [37, 64])
def test_dequantize_random_codes(kit, fmt: BlockFormat, axis_size: int) -> None:
    check_dequantize(kit, random_tensor(fmt, (4,), axis_size, seed=fmt.bits * 1000 + axis_size))


@pytest.mark.parametrize("fmt", FORMATS[::3], ids=_fmt_id)
def test_dequantize_of_quantize(kit, fmt: BlockFormat) -> None:
    """Round trip through the spec's quantizer, 3-D, D odd."""
    x = np.random.default_rng(fmt.bits).standard_normal((2, 3, 45)).astype(np.float32)
    check_dequantize(kit, quantize(x, fmt))


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("block_size", [32, 16, 7])
def test_dequantize_fast_paths_large(kit, bits: int, block_size: int) -> None:
    """4-bit and 8-bit SIMD paths (and the generic one) on rows long enough to run them, in parallel."""
    for symmetric in (True, False):
        fmt = BlockFormat(bits, block_size, symmetric, ScaleKind.FLOAT16)
        check_dequantize(kit, random_tensor(fmt, (300,), 768, seed=bits + block_size))
        check_dequantize(kit, random_tensor(fmt, (3,), 771, seed=bits * block_size))


def test_dequantize_rank1(kit) -> None:
    fmt = BlockFormat(6, 4, False, ScaleKind.FLOAT32)
    check_dequantize(kit, random_tensor(fmt, (), 13, seed=3))


def test_dequantize_extreme_scales(kit) -> None:
    """Subnormal and infinite float16 scales, pow2 exponents 0 and 255."""
    fmt = BlockFormat(4, 4, True, ScaleKind.FLOAT16)
    q = random_tensor(fmt, (2,), 16, seed=1)
    scales = np.array([[1e-7, np.inf, -6e-8, 65504.0], [0.0, -0.0, 2.0**-24, -np.inf]], np.float16)
    check_dequantize(kit, QuantizedTensor(q.codes, scales, None, 16, fmt))
    fmt2 = BlockFormat(4, 4, True, ScaleKind.POW2)
    scales2 = np.array([[0, 255, 127, 1], [254, 100, 128, 126]], np.uint8)
    check_dequantize(kit, QuantizedTensor(q.codes, scales2, None, 16, fmt2))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_8bit_special_scales_every_path(kit, isa: str, symmetric: bool, force_isa) -> None:
    """8-bit rows, whose AVX-512 path widens the float16 scales of 16 blocks at once: subnormal,
    infinite, zero and NaN scales (quiet and signalling payloads), 21 blocks a row (a partial last
    block), the spec's bits on every path."""
    force_isa(isa)
    fmt = BlockFormat(8, 16, symmetric, ScaleKind.FLOAT16)
    q = random_tensor(fmt, (3,), 16 * 20 + 5, seed=4)
    special = [0x0001, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFD23, 0x8000, 0x0000, 0x03FF, 0x7BFF]
    scales = np.ascontiguousarray(q.scales).view(np.uint16).copy()
    scales.reshape(-1)[1 : 1 + 5 * len(special) : 5] = special
    check_dequantize(kit, QuantizedTensor(q.codes, scales.view(np.float16), q.zero_points, q.axis_size, fmt))


def test_dequantize_scale_input_type_picks_kind(kit) -> None:
    """The kernel reads the scale kind from the dtype alone: float32 scales on a float16-declared format."""
    fmt16 = BlockFormat(4, 8, True, ScaleKind.FLOAT16)
    q = random_tensor(BlockFormat(4, 8, True, ScaleKind.FLOAT32), (2,), 24, seed=5)
    (got,) = kit.run(
        kit.dequantize_model(fmt16, 24, scale_type=TensorProto.FLOAT), {"codes": q.codes, "scales": q.scales}
    )
    kit.assert_bits_equal(got, dequantize(q), "y")


# ---------------------------------------------------------------------------------------------
# Float offsets (value = u * scale + offset; zero_points float16 or float32): bit-exact with the spec

OFFSET_FORMATS = [
    BlockFormat(bits, block_size, False, kind, "float")
    for bits in range(2, 9)
    for block_size in (8, 5, 32)
    for kind in KERNEL_SCALE_KINDS
]


def random_offset_tensor(
    fmt: BlockFormat, lead: tuple[int, ...], axis_size: int, seed: int
) -> QuantizedTensor:
    """Arbitrary codes and scales (as random_tensor) with random float offsets of the format's dtype."""
    q = random_tensor(BlockFormat(fmt.bits, fmt.block_size, True, fmt.scale_kind), lead, axis_size, seed)
    rng = np.random.default_rng(seed + 1)
    nb = fmt.num_blocks(axis_size)
    offsets = (rng.standard_normal(lead + (nb,)) * 10.0 ** rng.integers(-4, 3, lead + (nb,))).astype(
        fmt.zero_point_dtype
    )
    return QuantizedTensor(q.codes, q.scales, offsets, axis_size, fmt)


@pytest.mark.parametrize("fmt", OFFSET_FORMATS, ids=lambda f: _fmt_id(f) + "-float_offsets")
@pytest.mark.parametrize("axis_size", [37, 64, 1])
def test_dequantize_float_offsets(kit, fmt: BlockFormat, axis_size: int) -> None:
    check_dequantize(kit, random_offset_tensor(fmt, (3, 2), axis_size, seed=fmt.bits * 100 + axis_size))


@pytest.mark.parametrize("kind", KERNEL_SCALE_KINDS, ids=lambda k: k.value)
def test_dequantize_float_offsets_of_quantize(kit, kind: ScaleKind, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec's quantizer output (float16 offsets, float32 with float32 scales), also with baseline loops."""
    x = np.random.default_rng(4).standard_normal((5, 77)).astype(np.float32) + 2.0
    q = quantize(x, BlockFormat(4, 32, False, kind, "float"))
    check_dequantize(kit, q)
    monkeypatch.setenv("BCT_ONNX_BASELINE_SIMD", "1")
    check_dequantize(kit, q)


def test_dequantize_float32_offsets_with_float16_scales(kit) -> None:
    """The kernel takes the offset dtype from the input: float32 offsets next to float16 scales work too."""
    fmt = BlockFormat(4, 8, False, ScaleKind.FLOAT16, "float")
    q = random_offset_tensor(fmt, (4,), 40, seed=9)
    offsets32 = (q.zero_points.astype(np.float32) + np.float32(2**-20)).astype(np.float32)
    feeds = {"codes": q.codes, "scales": q.scales, "zero_points": offsets32}
    (got,) = kit.run(kit.dequantize_model(fmt, 40, zero_point_type=TensorProto.FLOAT), feeds)
    want = dequantize_codes(unpack_codes(q.codes, 4, 40), q.scales, offsets32, fmt)
    kit.assert_bits_equal(got, want, "y")


@pytest.mark.parametrize(
    ("zp", "zp_type", "message"),
    [
        (
            np.zeros((2, 5), np.int32),
            TensorProto.INT32,
            (
                "input 'zero_points' must be uint8 (integer zero points) or "
                "float16 / float32 (float offsets: value = code * scale + offset), got int32"
            ),
        ),
        (
            np.zeros((2, 4), np.float16),
            TensorProto.FLOAT16,
            "input 'zero_points' must have shape [2, 5] like 'scales', got [2, 4]",
        ),
    ],
    ids=["int32", "shape"],
)
def test_dequantize_bad_float_offsets(kit, zp: np.ndarray, zp_type: int, message: str) -> None:
    fmt = BlockFormat(4, 8, False, ScaleKind.FLOAT16, "float")
    q = random_offset_tensor(fmt, (2,), 37, seed=2)
    model = kit.dequantize_model(fmt, 37, node_name="bad_dq", zero_point_type=zp_type)
    with pytest.raises(Exception, match=re.escape("bct_onnx BlockDequantize node 'bad_dq': " + message)):
        kit.run(model, {"codes": q.codes, "scales": q.scales, "zero_points": zp})
