"""BlockDequantize on CPU against bct_onnx.block_format.dequantize, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from bct_onnx.block_format import BlockFormat, QuantizedTensor, ScaleKind, dequantize, quantize

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # spec overflows on extreme scales

FORMATS = [
    BlockFormat(bits, block_size, symmetric, kind)
    for bits in range(2, 9)
    for block_size in (8, 5)
    for symmetric in (True, False)
    for kind in ScaleKind
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


def test_dequantize_scale_input_type_picks_kind(kit) -> None:
    """The kernel reads the scale kind from the dtype alone: float32 scales on a float16-declared format."""
    fmt16 = BlockFormat(4, 8, True, ScaleKind.FLOAT16)
    q = random_tensor(BlockFormat(4, 8, True, ScaleKind.FLOAT32), (2,), 24, seed=5)
    (got,) = kit.run(
        kit.dequantize_model(fmt16, 24, scale_type=TensorProto.FLOAT), {"codes": q.codes, "scales": q.scales}
    )
    kit.assert_bits_equal(got, dequantize(q), "y")
