"""BlockQuantize on CPU against bct_onnx.block_format.quantize, bit for bit, each output on its own."""

from __future__ import annotations

import numpy as np
import pytest

import bct_onnx
from bct_onnx.block_format import RUNTIME_SCALE_KINDS, BlockFormat, ScaleKind, quantize

# The spec itself warns on the deliberately extreme rows (float16 overflow, subnormal blocks).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FORMATS = [
    BlockFormat(bits, 8, symmetric, kind)
    for bits in range(2, 9)
    for symmetric in (True, False)
    for kind in RUNTIME_SCALE_KINDS
]


def _fmt_id(fmt: BlockFormat) -> str:
    return f"b{fmt.bits}-bs{fmt.block_size}-{'sym' if fmt.symmetric else 'asym'}-{fmt.scale_kind.value}"


def hard_rows(axis_size: int, seed: int) -> np.ndarray:
    """Rows that stress the rounding and scale rules; float32 [rows, axis_size]."""
    rng = np.random.default_rng(seed)
    rows = [
        rng.standard_normal(axis_size),  # ordinary
        rng.standard_normal(axis_size) * 1e3,
        rng.standard_normal(axis_size) * 1e-3,
        rng.integers(-16, 17, axis_size) / 2.0,  # many exact ties after scaling
        rng.integers(-8, 8, axis_size).astype(np.float64),  # exact multiples of the scale
        np.zeros(axis_size),  # all-zero blocks: zero scale, inverse 0
        np.full(axis_size, -3.25),  # negative extreme, constant
        np.abs(rng.standard_normal(axis_size)),  # one-signed, as post-GELU
        rng.standard_normal(axis_size) * 1e6,  # float16 scales overflow to inf
        rng.standard_normal(axis_size) * 1e-39,  # subnormal inputs
        rng.standard_normal(axis_size) * 1e-6,  # subnormal float16 scales
        np.where(rng.random(axis_size) < 0.5, -0.0, 0.0),  # signed zeros
    ]
    x = np.stack(rows).astype(np.float32)
    x[0, ::7] = -x[0, ::7] * 4  # a few dominant negatives
    return x


def check_quantize(kit, fmt: BlockFormat, x: np.ndarray, *more: np.ndarray) -> None:
    """BlockQuantize of x (and of each of ``more``, of the same rank, through the same session) is the spec."""
    session = bct_onnx.session(kit.quantize_model(fmt, rank=x.ndim))
    for one in (x, *more):
        _check_outputs(fmt, one, session.run(None, {"x": one}), kit)


def _check_outputs(fmt: BlockFormat, x: np.ndarray, got: list[np.ndarray], kit) -> None:
    want = quantize(x, fmt)
    kit.assert_bits_equal(got[0], want.codes, "codes")
    kit.assert_bits_equal(got[1], want.scales, "scales")
    if fmt.symmetric:
        assert len(got) == 2
    else:
        kit.assert_bits_equal(got[2], want.zero_points, "zero_points")


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("axis_size", [37, 64, 5])
def test_quantize_matches_spec(kit, fmt: BlockFormat, axis_size: int) -> None:
    """All bits 2..8, both zero-point modes, three scale kinds; D=37 and D=5 end in a partial block."""
    check_quantize(kit, fmt, hard_rows(axis_size, seed=fmt.bits * 100 + axis_size))


@pytest.mark.parametrize("block_size", [1, 3, 32, 300])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantize_block_sizes(kit, block_size: int, bits: int) -> None:
    """Block sizes 1, odd, larger than the row (one partial block), on a 3-D input."""
    rng = np.random.default_rng(block_size * 10 + bits)
    x = (rng.standard_normal((2, 3, 77)) * rng.uniform(0.01, 100, (2, 3, 1))).astype(np.float32)
    for symmetric in (True, False):
        for kind in RUNTIME_SCALE_KINDS:
            check_quantize(kit, BlockFormat(bits, block_size, symmetric, kind), x)


def test_quantize_large_tensor_parallel(kit) -> None:
    """Big enough to be split over ORT's intra-op threads."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 768)).astype(np.float32)
    check_quantize(kit, BlockFormat(4, 32, True, ScaleKind.FLOAT16), x)
    check_quantize(kit, BlockFormat(5, 32, False, ScaleKind.POW2), x)


def test_quantize_nonfinite_input_does_not_crash(kit) -> None:
    """NaN and inf give some codes (numpy's own cast of NaN is unspecified); finite blocks stay exact."""
    fmt = BlockFormat(4, 8, True, ScaleKind.FLOAT16)
    x = np.ones((2, 16), np.float32)
    x[0, 3] = np.nan
    x[0, 12] = np.inf
    got = kit.run(kit.quantize_model(fmt), {"x": x})
    want = quantize(x[1:], fmt)
    kit.assert_bits_equal(got[0][1:], want.codes, "codes of the finite row")
    kit.assert_bits_equal(got[1][1:], want.scales, "scales of the finite row")
    assert np.isnan(got[1][0, 0].astype(np.float32)), "a NaN wins the magnitude search, as np.argmax"


# The row loops' instruction-set paths, forced per kernel through BCT_ONNX_ISA (read when a session
# creates the kernel; a path the CPU lacks is skipped): scalar/SSE2, AVX2, AVX-512 (with and without VNNI).
ROW_ISAS = ["scalar", "avx2", "avx512", "avx512vnni"]


@pytest.mark.parametrize("isa", ROW_ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_quantize_isa_paths(kit, isa: str, bits: int, force_isa) -> None:
    """Every path on partial blocks (D=37, 100 with blocks of 32; 1-element rows), odd block sizes,
    one-row and many-row inputs, every zero-point mode and scale kind; NaN-free hard rows."""
    force_isa(isa)
    for axis_size, block_size in ((37, 32), (100, 32), (1, 32), (77, 3), (64, 16), (45, 17)):
        x = hard_rows(axis_size, seed=bits * 1000 + axis_size)
        many = np.tile(x, (40, 1)) * np.linspace(0.5, 2.0, 40 * x.shape[0], dtype=np.float32)[:, None]
        for symmetric in (True, False):
            for kind in RUNTIME_SCALE_KINDS:
                fmt = BlockFormat(bits, block_size, symmetric, kind)
                check_quantize(kit, fmt, x[:1], many.astype(np.float32))  # one session, two runs


@pytest.mark.parametrize("isa", ROW_ISAS)
@pytest.mark.parametrize("block_size", [32, 64])
def test_quantize_sixteen_whole_blocks_at_once(kit, isa: str, block_size: int, force_isa) -> None:
    """Rows of whole blocks of 32 or 64 (the AVX-512 path finds 16 blocks' extremes at once and codes 8-bit
    blocks 32 values at a time): 17 blocks a row (16 at once, then one alone; the rows' blocks run on
    across rows), every hard row, 8 and 4 bits, and a NaN block among the 16 (the scalar rule there,
    the other blocks exact)."""
    force_isa(isa)
    x = hard_rows(17 * block_size, seed=block_size)
    for bits in (8, 4):
        for kind in (ScaleKind.FLOAT32, ScaleKind.FLOAT16):
            check_quantize(kit, BlockFormat(bits, block_size, True, kind), x)
    x[2, 5 * block_size + 3] = np.nan
    fmt = BlockFormat(8, block_size, True, ScaleKind.FLOAT32)
    got = kit.run(kit.quantize_model(fmt), {"x": x})
    want = quantize(np.nan_to_num(x), fmt)
    keep = np.array([r for r in range(x.shape[0]) if r != 2])
    kit.assert_bits_equal(got[0][keep], want.codes[keep], "codes of the NaN-free rows")
    kit.assert_bits_equal(got[1][keep], want.scales[keep], "scales of the NaN-free rows")
    assert np.isnan(got[1][2, 5]), "the NaN block's scale"


@pytest.mark.parametrize("isa", ROW_ISAS)
def test_quantize_isa_paths_nan_blocks(kit, isa: str, force_isa) -> None:
    """A NaN block takes the scalar scale rule on every path; the other blocks stay exact."""
    force_isa(isa)
    x = hard_rows(64, seed=5)[:4].copy()
    x[1, 40] = np.nan
    for fmt in (BlockFormat(8, 32, True, ScaleKind.FLOAT16), BlockFormat(4, 32, False, ScaleKind.FLOAT32)):
        got = kit.run(kit.quantize_model(fmt), {"x": x})
        want = quantize(np.nan_to_num(x), fmt)
        keep = np.array([0, 2, 3])
        kit.assert_bits_equal(got[0][keep], want.codes[keep], "codes of the NaN-free rows")
        kit.assert_bits_equal(got[1][keep], want.scales[keep], "scales of the NaN-free rows")
        kit.assert_bits_equal(got[1][1, :1], want.scales[1, :1], "scale of the NaN-free block")
        assert np.isnan(got[1][1, 1].astype(np.float32)), "the NaN block's scale is NaN, as the spec's"


def whole_block_rows(axis_size: int, seed: int) -> np.ndarray:
    """hard_rows plus blocks of 32 holding both +m and -m as their largest magnitude (either first),
    and blocks whose float32 scale is subnormal or 0 (inverse infinite or 0)."""
    rng = np.random.default_rng(seed)
    ties = rng.standard_normal((4, axis_size))
    for r in range(4):
        for b in range(axis_size // 32):
            first, second = np.sort(rng.choice(32, 2, replace=False))
            sign = 1.0 if (r + b) % 2 else -1.0
            ties[r, b * 32 + first], ties[r, b * 32 + second] = 5.0 * sign, -5.0 * sign
    tiny = rng.standard_normal((2, axis_size)) * np.array([[1e-44], [1e-41]])
    return np.concatenate([hard_rows(axis_size, seed), ties, tiny]).astype(np.float32)


@pytest.mark.parametrize("isa", ROW_ISAS)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_isa_paths_whole_blocks_of_32(kit, isa: str, bits: int, force_isa) -> None:
    """Rows made of whole blocks of 32 (D = 96, 512), where the AVX-512 paths find 16 blocks' largest
    magnitudes at once and write 8-bit symmetric codes through saturating packs: ties between +m and
    -m (the first wins), subnormal and zero scales, float16 overflow, on one row and on many (the
    16-block groups then span rows); every path gives the spec's bits."""
    force_isa(isa)
    for axis_size in (96, 512):
        x = whole_block_rows(axis_size, seed=bits * 10 + axis_size)
        many = np.tile(x, (8, 1)) * np.linspace(0.5, 2.0, 8 * x.shape[0], dtype=np.float32)[:, None]
        for symmetric in (True, False):
            for kind in RUNTIME_SCALE_KINDS:
                fmt = BlockFormat(bits, 32, symmetric, kind)
                check_quantize(kit, fmt, x[:1])
                check_quantize(kit, fmt, many.astype(np.float32))


@pytest.mark.parametrize("isa", ROW_ISAS)
def test_quantize_isa_paths_nan_blocks_among_whole_blocks(kit, isa: str, force_isa) -> None:
    """NaN blocks inside a group of 16 whole blocks: their scales are NaN, every other block exact."""
    force_isa(isa)
    x = whole_block_rows(128, seed=3)[:12].copy()
    nan_blocks = [(1, 1), (2, 0), (2, 3), (9, 2)]
    for r, b in nan_blocks:
        x[r, b * 32 + 7] = np.nan
    for fmt in (BlockFormat(8, 32, True, ScaleKind.FLOAT16), BlockFormat(8, 32, True, ScaleKind.FLOAT32)):
        got = kit.run(kit.quantize_model(fmt), {"x": x})
        want = quantize(np.nan_to_num(x), fmt)
        finite = np.ones(x.shape[0] * 4, bool).reshape(-1, 4)
        for r, b in nan_blocks:
            finite[r, b] = False
            assert np.isnan(got[1][r, b].astype(np.float32)), "a NaN block's scale is NaN, as the spec's"
        codes_finite = np.repeat(finite, 32, axis=1)
        kit.assert_bits_equal(got[0][codes_finite], want.codes[codes_finite], "codes of the NaN-free blocks")
        kit.assert_bits_equal(got[1][finite], want.scales[finite], "scales of the NaN-free blocks")


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 37), (0, 1)])
@pytest.mark.parametrize(
    "fmt", [BlockFormat(4, 32, True), BlockFormat(3, 16, False, ScaleKind.FLOAT32)], ids=_fmt_id
)
def test_quantize_empty_batch(kit, fmt: BlockFormat, shape: tuple[int, ...]) -> None:
    """An empty batch gives empty outputs of the spec's shapes and dtypes, as the other ops do."""
    check_quantize(kit, fmt, np.zeros(shape, np.float32))
