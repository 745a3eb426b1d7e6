"""The blockwise format, implemented once in numpy: this module is the specification.

A tensor is cut into blocks of ``block_size`` consecutive elements along its last axis (callers
move the axis they quantize along to the end first; a MatMul weight [K, N] is stored as its
transpose [N, K]). A partial last block is legal. Every block has one scale and, when
asymmetric, either one integer zero point (value ``(u - zero_point) * scale``) or one float
offset (value ``u * scale + offset``, GGUF Q4_1 style). Integer zero points are stored one byte a
block, or (``ZeroPointKind.PACKED``) packed at the code width into one dense stream in the order of
the scales, like a row of codes (``pack_zero_points``; 4-bit: two a byte). Codes are unsigned integers ``u`` of
``bits`` bits (2..8); symmetric blocks use the implicit zero point ``2 ** (bits - 1)``. Each row of
codes is packed densely, little-endian, least significant bit first: code ``i`` of a row occupies
bits ``[i * bits, (i + 1) * bits)`` of that row's bytes, so a row of ``D`` codes takes
``ceil(D * bits / 8)`` bytes. The C++ and CUDA kernels must agree with every function
here bit-exactly; docs/block_format.md explains the format in prose.
"""

from __future__ import annotations

import dataclasses
import enum

import ml_dtypes
import numpy as np

MIN_BITS = 2
MAX_BITS = 8
MAX_BLOCK_SIZE = 1 << 31  # the ops' limit (runtime_ops kMaxBlockSize): int64 block arithmetic cannot overflow
POW2_EXPONENT_BIAS = 127  # one-byte exponent, as OCP's E8M0: scale = 2 ** (code - 127)
POW2_MIN_EXPONENT = -126
POW2_MAX_EXPONENT = 127


class ScaleKind(str, enum.Enum):
    """How a block's scale is stored."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"
    POW2 = "pow2"  # one byte: a biased power-of-two exponent, so dequantization is a shift
    # one byte: ONNX FLOAT8E5M2 (sign, 5 exponent, 2 mantissa bits: the upper byte of a float16),
    # four steps per octave instead of pow2's one; for weights and tables (chosen offline)
    FLOAT8E5M2 = "float8e5m2"
    # one byte: ONNX FLOAT8E4M3FN (3 mantissa bits, no infinities, largest 448) times one float32
    # factor per tensor, chosen so the tensor's largest scale lands at 448; weights and tables only
    FLOAT8E4M3 = "float8e4m3"


# The scale kinds kernels can choose at run time (BlockQuantize, compressed activations);
# float8e5m2 and float8e4m3 are chosen offline only (weights, tables).
RUNTIME_SCALE_KINDS: tuple[ScaleKind, ...] = (ScaleKind.FLOAT16, ScaleKind.FLOAT32, ScaleKind.POW2)
# The scale kinds the kernels read as stored; the ops widen float8e4m3 scales (with their factor) to
# float32 once, at session creation (docs/ops.md: scale_factor).
KERNEL_SCALE_KINDS: tuple[ScaleKind, ...] = tuple(kind for kind in ScaleKind if kind is not ScaleKind.FLOAT8E4M3)


class ZeroPointKind(str, enum.Enum):
    """What an asymmetric block stores besides its scale (symmetric blocks store neither)."""

    INTEGER = "integer"  # uint8 zero point: value = (u - zero_point) * scale
    PACKED = "packed"  # the same integer zero points, stored packed at the code width (pack_zero_points)
    FLOAT = "float"  # float offset (the block minimum): value = u * scale + offset


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """Parameters of one blockwise-quantized tensor."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    scale_kind: ScaleKind = ScaleKind.FLOAT16
    zero_point_kind: ZeroPointKind = ZeroPointKind.INTEGER  # asymmetric blocks only

    def __post_init__(self) -> None:
        if not isinstance(self.bits, (int, np.integer)) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if not isinstance(self.block_size, (int, np.integer)) or not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(
                f"block_size must be an integer in [1, {MAX_BLOCK_SIZE}], got {self.block_size!r}"
            )
        object.__setattr__(self, "scale_kind", ScaleKind(self.scale_kind))
        object.__setattr__(self, "zero_point_kind", ZeroPointKind(self.zero_point_kind))
        if self.symmetric and self.zero_point_kind is ZeroPointKind.FLOAT:
            raise ValueError("zero_point_kind 'float' (float offsets) needs symmetric=False")

    @property
    def float_offsets(self) -> bool:
        """True when blocks carry a float offset: value = u * scale + offset."""
        return not self.symmetric and self.zero_point_kind is ZeroPointKind.FLOAT

    @property
    def zero_point_dtype(self) -> np.dtype | None:
        """dtype of the zero_points array: uint8 zero points (packed or not), float16/float32 offsets,
        None if symmetric.

        Offsets are float16 next to float16 and pow2 scales (2 bytes a block, as GGUF's Q4_1 ``m``)
        and float32 next to float32 scales.
        """
        if self.symmetric:
            return None
        if self.zero_point_kind is not ZeroPointKind.FLOAT:
            return np.dtype(np.uint8)
        return np.dtype(np.float32) if self.scale_kind is ScaleKind.FLOAT32 else np.dtype(np.float16)

    @property
    def packed_zero_points(self) -> bool:
        """True when integer zero points are stored packed at the code width (pack_zero_points)."""
        return not self.symmetric and self.zero_point_kind is ZeroPointKind.PACKED

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def implicit_zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def num_blocks(self, axis_size: int) -> int:
        return -(-axis_size // self.block_size)

    def row_bytes(self, axis_size: int) -> int:
        return -(-axis_size * self.bits // 8)

    @property
    def scale_dtype(self) -> np.dtype:
        return {
            ScaleKind.FLOAT16: np.dtype(np.float16),
            ScaleKind.FLOAT32: np.dtype(np.float32),
            ScaleKind.POW2: np.dtype(np.uint8),
            ScaleKind.FLOAT8E5M2: np.dtype(ml_dtypes.float8_e5m2),
            ScaleKind.FLOAT8E4M3: np.dtype(ml_dtypes.float8_e4m3fn),
        }[self.scale_kind]

    def storage_bits_per_value(self) -> float:
        """Average storage per element for long rows: codes plus the block's scale and zero point/offset."""
        zp_dtype = self.zero_point_dtype
        zp_bits = 0 if zp_dtype is None else (self.bits if self.packed_zero_points else zp_dtype.itemsize * 8)
        return self.bits + (self.scale_dtype.itemsize * 8 + zp_bits) / self.block_size


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Packed codes [..., row_bytes], scales [..., num_blocks], zero points or offsets (asymmetric only).

    Zero points are held one a block here whatever the format stores (``stored_zero_points``).
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    axis_size: int
    fmt: BlockFormat
    scale_factor: float | None = None  # float8e4m3 scales only: scale = e4m3(byte) * scale_factor

    @property
    def stored_zero_points(self) -> np.ndarray | None:
        """The zero points as the format stores them: packed at the code width for PACKED formats."""
        if self.zero_points is None or not self.fmt.packed_zero_points:
            return self.zero_points
        return pack_zero_points(self.zero_points, self.fmt.bits)

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        if self.zero_points is not None and self.fmt.packed_zero_points:
            zp = self.fmt.row_bytes(self.zero_points.size)
        return self.codes.nbytes + self.scales.nbytes + zp


def round_half_to_even(x: np.ndarray) -> np.ndarray:
    """IEEE round-to-nearest-even, the rounding every kernel uses (np.rint on float32)."""
    return np.rint(x.astype(np.float32, copy=False))


def _pad_to_blocks(x: np.ndarray, block_size: int, edge: bool = False) -> np.ndarray:
    """Reshape [..., D] to [..., num_blocks, block_size], padding the last block with zeros.

    edge=True pads with the row's last value instead, which leaves a partial block's minimum and
    maximum those of its real elements (what float-offset blocks need; zeros would move them).
    """
    d = x.shape[-1]
    nb = -(-d // block_size)
    pad = nb * block_size - d
    if pad:
        fill = (
            np.repeat(x[..., -1:], pad, axis=-1) if edge else np.zeros(x.shape[:-1] + (pad,), dtype=x.dtype)
        )
        x = np.concatenate([x, fill], axis=-1)
    return x.reshape(x.shape[:-1] + (nb, block_size))


def pad_to_blocks(x: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """[..., D] -> [..., num_blocks, block_size] as the spec pads a partial last block for fmt.

    Zeros for symmetric and integer-zero-point blocks (they never change the scale there); the
    row's last value for float-offset blocks (so the minimum and maximum are the real elements').
    """
    return _pad_to_blocks(np.asarray(x), fmt.block_size, edge=fmt.float_offsets)


def pow2_exponent_at_least(ratio: np.ndarray) -> np.ndarray:
    """Smallest e with 2**e >= ratio (ratio > 0, float32), clamped to the one-byte range."""
    mantissa, exponent = np.frexp(ratio.astype(np.float32))  # ratio = m * 2**exponent, m in [0.5, 1)
    e = np.where(mantissa == 0.5, exponent - 1, exponent)
    return np.clip(e, POW2_MIN_EXPONENT, POW2_MAX_EXPONENT).astype(np.int32)


def scale_kind_of(scales: np.ndarray) -> ScaleKind:
    """The scale kind a stored scales array holds, from its dtype (uint8 = pow2 exponents)."""
    kinds = {
        np.dtype(np.float16): ScaleKind.FLOAT16,
        np.dtype(np.float32): ScaleKind.FLOAT32,
        np.dtype(np.uint8): ScaleKind.POW2,
        np.dtype(ml_dtypes.float8_e5m2): ScaleKind.FLOAT8E5M2,
        np.dtype(ml_dtypes.float8_e4m3fn): ScaleKind.FLOAT8E4M3,
    }
    dtype = np.asarray(scales).dtype
    if dtype not in kinds:
        raise ValueError(
            f"scales of dtype {dtype} are not a scale kind (float16, float32, uint8, float8_e5m2, float8_e4m3fn)"
        )
    return kinds[dtype]


def float8e5m2_at_least(value: np.ndarray) -> np.ndarray:
    """float32 values -> the float8e5m2 of the same sign nearest to each that is not smaller in
    magnitude (round away from zero; magnitudes above 57344 become infinity, 0 stays 0)."""
    value = np.asarray(value, dtype=np.float32)
    nearest = value.astype(ml_dtypes.float8_e5m2)  # round to nearest even
    short = np.abs(nearest.astype(np.float32)) < np.abs(value)
    bits = nearest.view(np.uint8) + short.astype(np.uint8)  # next magnitude up: the next code (sign bit kept)
    return bits.view(ml_dtypes.float8_e5m2)


FLOAT8E4M3_MAX = 448.0


def float8e4m3_at_least(value: np.ndarray) -> np.ndarray:
    """float32 values -> the float8e4m3fn of the same sign nearest to each that is not smaller in
    magnitude (round away from zero), saturating at +-448 (e4m3fn has no infinity; 0 stays 0)."""
    value = np.clip(np.asarray(value, dtype=np.float32), -FLOAT8E4M3_MAX, FLOAT8E4M3_MAX)
    nearest = value.astype(ml_dtypes.float8_e4m3fn)  # round to nearest even
    short = np.abs(nearest.astype(np.float32)) < np.abs(value)
    bits = nearest.view(np.uint8) + short.astype(np.uint8)
    return bits.view(ml_dtypes.float8_e4m3fn)


def check_scale_factor(scale_kind: ScaleKind, scale_factor: float | None) -> np.float32 | None:
    """The float32 per-tensor factor of float8e4m3 scales (finite, > 0); None for other kinds, which
    take none (ValueError when one is missing, given to another kind, or not finite and positive)."""
    if ScaleKind(scale_kind) is not ScaleKind.FLOAT8E4M3:
        if scale_factor is not None:
            raise ValueError(f"scale_factor is for float8e4m3 scales only, not {ScaleKind(scale_kind).value}")
        return None
    if scale_factor is None:
        raise ValueError("float8e4m3 scales need a scale_factor (scale = e4m3(byte) * scale_factor)")
    with np.errstate(over="ignore"):
        factor = np.float32(scale_factor)
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"scale_factor must be finite and > 0 in float32, got {scale_factor!r}")
    return factor


def float8e4m3_scale_factor(x: np.ndarray, fmt: BlockFormat) -> float:
    """The per-tensor factor of float8e4m3 scales for x [..., D]: the largest float32 spec scale of
    its blocks over 448 (e4m3fn's largest value), so the largest scale is stored near 448 and no scale
    but those of nearly-zero blocks is subnormal; 1.0 for an all-zero tensor."""
    x = np.asarray(x, dtype=np.float32)
    if fmt.symmetric and not fmt.float_offsets:
        # A symmetric block's float32 scale is its largest-magnitude element over -2**(bits-1), and float32
        # division is monotonic: the largest |scale| is the largest |x| so divided (the same float32
        # division), without the blocks' argmax (a weight of 576 x 1536: 9 ms -> 1 ms).
        largest = np.float32(np.abs(x).max()) / np.float32(1 << (fmt.bits - 1)) if x.size else np.float32(0.0)
    else:
        plain = dataclasses.replace(fmt, scale_kind=ScaleKind.FLOAT32)
        scales, _ = choose_scales(pad_to_blocks(x, plain), plain)
        largest = np.float32(np.abs(scales).max()) if scales.size else np.float32(0.0)
    factor = np.float32(largest / np.float32(FLOAT8E4M3_MAX))
    return float(factor) if np.isfinite(factor) and factor > 0 else 1.0


def scales_to_float32(scales: np.ndarray, scale_kind: ScaleKind, scale_factor: float | None = None) -> np.ndarray:
    """Stored scales -> the float32 scale the arithmetic uses (float8e4m3: the byte's value times the
    float32 scale_factor, one float32 multiply)."""
    factor = check_scale_factor(scale_kind, scale_factor)
    if ScaleKind(scale_kind) is ScaleKind.POW2:
        return np.ldexp(np.float32(1.0), scales.astype(np.int32) - POW2_EXPONENT_BIAS).astype(np.float32)
    if factor is not None:
        return (scales.astype(np.float32) * factor).astype(np.float32)
    return scales.astype(np.float32)


def widen_scales(scales: np.ndarray, scale_factor: float | None) -> np.ndarray:
    """What the ops do at creation for a node with a scale_factor attribute: float8e4m3 scales ->
    their float32 values (scale kind float32); scales unchanged when scale_factor is None."""
    if scale_factor is None:
        return scales
    return scales_to_float32(np.asarray(scales), ScaleKind.FLOAT8E4M3, scale_factor)


def _inverse(scale: np.ndarray) -> np.ndarray:
    """1 / scale in float32, with 0 for a zero scale (an all-zero block)."""
    scale = np.asarray(scale, dtype=np.float32)  # every caller's scale is float32 already
    return np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=scale != 0)


def choose_scales(
    blocks: np.ndarray, fmt: BlockFormat, scale_factor: float | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored scales (and zero points) for blocks [..., nb, block_size] of float32 values.

    Symmetric: the element of largest magnitude ``m`` (first one on ties) maps to the most negative
    code, ``scale = m / -2**(bits-1)`` (negative when m > 0), so all 2**bits codes are used.
    POW2 symmetric: the smallest power of two with ``amax / scale <= 2**(bits-1) - 1``.
    Asymmetric: the range [min(x, 0), max(x, 0)] is spread over 2**bits - 1 steps and the zero point
    is ``clamp(rne(-lo / scale), 0, 2**bits - 1)`` (POW2: smallest power of two >= that step).
    Float offsets: offset = the block minimum rounded to the offset dtype, step =
    ``max(max(x) - offset, 0) / (2**bits - 1)`` stored in the scale kind (POW2: smallest power of two
    >= step, e = 0 for a zero step); the second result is then the offsets array.
    float8e5m2 and float8e4m3 round the scale away from zero; float8e4m3 stores scale / scale_factor
    (saturating at 448), so the scale the arithmetic sees is the stored byte times scale_factor.
    """
    factor = check_scale_factor(fmt.scale_kind, scale_factor)
    blocks = blocks.astype(np.float32, copy=False)
    if fmt.float_offsets:
        return _choose_offset_scales(blocks, fmt, factor)
    if fmt.symmetric:
        idx = np.argmax(np.abs(blocks), axis=-1)
        m = np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0]
        return symmetric_scales(m, fmt, factor), None
    return asymmetric_scales(blocks.min(axis=-1), blocks.max(axis=-1), fmt, factor)


def asymmetric_scales(
    low: np.ndarray, high: np.ndarray, fmt: BlockFormat, factor: np.float32 | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """choose_scales of asymmetric blocks (integer zero points) whose minimum and maximum are low and
    high (float32 [...]); float8e4m3: for the float32 scale factor (check_scale_factor)."""
    lo = np.minimum(low, np.float32(0.0))
    hi = np.maximum(high, np.float32(0.0))
    step = ((hi - lo) / np.float32(fmt.qmax)).astype(np.float32)
    stored = _stored_step(step, fmt, factor)
    inv = _inverse(scales_to_float32(stored, fmt.scale_kind, factor))
    zp = np.clip(round_half_to_even(-lo * inv), 0, fmt.qmax).astype(np.uint8)
    return stored, zp


def symmetric_scales(m: np.ndarray, fmt: BlockFormat, factor: np.float32 | None = None) -> np.ndarray:
    """Stored symmetric scales of blocks whose element of largest magnitude is m (float32 [...]);
    float8e4m3: for the float32 scale factor (check_scale_factor)."""
    if fmt.scale_kind is ScaleKind.POW2:
        amax = np.abs(m)
        ratio = amax / np.float32(fmt.qmax)
        e = pow2_exponent_at_least(np.where(amax > 0, ratio, np.float32(1.0)))
        e = np.where(amax > 0, e, 0)
        return (e + POW2_EXPONENT_BIAS).astype(np.uint8)
    scale = (m / np.float32(-(1 << (fmt.bits - 1)))).astype(np.float32)
    if fmt.scale_kind is ScaleKind.FLOAT8E5M2:  # rounded away from zero: m never leaves the code range
        return float8e5m2_at_least(scale)
    if factor is not None:
        return float8e4m3_at_least(scale / factor)
    return scale.astype(fmt.scale_dtype)


def _stored_step(step: np.ndarray, fmt: BlockFormat, factor: np.float32 | None = None) -> np.ndarray:
    """A non-negative float32 step stored in fmt's scale kind (pow2: smallest 2**e >= step, e = 0 for
    0; float8e5m2: smallest float8e5m2 >= step; float8e4m3: smallest e4m3 >= step / factor, at most 448)."""
    if fmt.scale_kind is ScaleKind.POW2:
        e = np.where(step > 0, pow2_exponent_at_least(np.where(step > 0, step, np.float32(1.0))), 0)
        return (e + POW2_EXPONENT_BIAS).astype(np.uint8)
    if fmt.scale_kind is ScaleKind.FLOAT8E5M2:
        return float8e5m2_at_least(step)
    if factor is not None:
        return float8e4m3_at_least(step / factor)
    return step.astype(fmt.scale_dtype)


def _choose_offset_scales(
    blocks: np.ndarray, fmt: BlockFormat, factor: np.float32 | None
) -> tuple[np.ndarray, np.ndarray]:
    """Stored scales and float offsets of float-offset blocks [..., nb, block_size] (float32)."""
    assert fmt.zero_point_dtype is not None
    lo = blocks.min(axis=-1)
    hi = blocks.max(axis=-1)
    offsets = lo.astype(fmt.zero_point_dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        step = ((hi - offsets.astype(np.float32)) / np.float32(fmt.qmax)).astype(np.float32)
    step = np.where(step > 0, step, np.float32(0.0)).astype(np.float32)  # offset rounded above every value
    return _stored_step(step, fmt, factor), offsets


def codes_for(
    blocks: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    fmt: BlockFormat,
    scale_factor: float | None = None,
) -> np.ndarray:
    """Unsigned codes [..., nb, block_size] of blocks for given stored scales and zero points."""
    inv = _inverse(scales_to_float32(scales, fmt.scale_kind, scale_factor))[..., None]
    if fmt.float_offsets:
        assert zero_points is not None
        shifted = blocks.astype(np.float32, copy=False) - zero_points[..., None].astype(np.float32)
        q = round_half_to_even(np.clip(shifted * inv, 0, fmt.qmax))
        return q.astype(np.uint8)
    q = round_half_to_even(blocks.astype(np.float32, copy=False) * inv)
    if fmt.symmetric:
        q = np.clip(q, fmt.qmin, fmt.qmax) + np.float32(fmt.implicit_zero_point)
    else:
        assert zero_points is not None
        q = np.clip(q + zero_points[..., None].astype(np.float32), 0, fmt.qmax)
    return q.astype(np.uint8)


def quantize_codes(
    x: np.ndarray, fmt: BlockFormat, scale_factor: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Unpacked unsigned codes [..., D], stored scales [..., nb], zero points (or None) of x [..., D]
    (float8e4m3: for the given scale_factor, see float8e4m3_scale_factor)."""
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    blocks = pad_to_blocks(x, fmt)
    scales, zp = choose_scales(blocks, fmt, scale_factor)
    codes = codes_for(blocks, scales, zp, fmt, scale_factor)
    codes = codes.reshape(codes.shape[:-2] + (codes.shape[-2] * codes.shape[-1],))[..., :d]
    return codes, scales, zp


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Dense little-endian packing of unsigned codes [..., D] into bytes [..., ceil(D*bits/8)].

    Eight codes of ``bits`` bits fill exactly ``bits`` bytes: each group of eight is assembled in a
    little-endian uint64 (code i at bit i * bits) whose first ``bits`` bytes are the group's bytes.
    """
    codes = np.asarray(codes)
    d = codes.shape[-1]
    groups = -(-d // 8)
    if groups * 8 != d:  # zero codes complete the last group; its extra bytes are cut below
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (groups * 8 - d,), codes.dtype)], axis=-1)
    eight = codes.reshape(codes.shape[:-1] + (groups, 8))
    word = np.zeros(eight.shape[:-1], dtype="<u8")
    for i in range(8):
        word |= eight[..., i].astype("<u8") << np.uint64(bits * i)
    packed = word[..., None].view(np.uint8)[..., :bits]  # [..., groups, bits]
    # C-contiguous, as callers hand the bytes to kernels by pointer (a partial last group is cut off)
    return np.ascontiguousarray(packed.reshape(codes.shape[:-1] + (groups * bits,))[..., : -(-d * bits // 8)])


def unpack_codes(packed: np.ndarray, bits: int, axis_size: int) -> np.ndarray:
    """Inverse of pack_codes: bytes [..., row_bytes] -> unsigned codes [..., axis_size] (uint8)."""
    packed = np.asarray(packed, dtype=np.uint8)
    bit_stream = np.unpackbits(packed, axis=-1, count=axis_size * bits, bitorder="little")
    bit_planes = bit_stream.reshape(packed.shape[:-1] + (axis_size, bits)).astype(np.uint16)
    return (bit_planes << np.arange(bits, dtype=np.uint16)).sum(axis=-1).astype(np.uint8)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Integer zero points [..., num_blocks] packed at the code width into one dense 1-D stream, in
    the order of the scales, exactly like one row of codes: uint8 [ceil(count * bits / 8)]. Each
    must be below 2**bits (ValueError otherwise)."""
    zero_points = np.asarray(zero_points)
    if zero_points.dtype != np.uint8:
        raise ValueError(f"zero points to pack must be uint8, got {zero_points.dtype}")
    if zero_points.size and int(zero_points.max()) >= 1 << bits:
        raise ValueError(f"zero point {int(zero_points.max())} does not fit in {bits} bits (0..{(1 << bits) - 1})")
    return pack_codes(zero_points.reshape(1, -1), bits)[0]


def unpack_zero_points(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of pack_zero_points: the stream uint8 [ceil(count * bits / 8)] -> uint8 zero points of
    ``shape`` (the scales' shape)."""
    packed = np.asarray(packed, dtype=np.uint8)
    count = int(np.prod(shape))
    expected = -(-count * bits // 8)
    if packed.shape != (expected,):
        raise ValueError(
            f"packed zero points of {count} blocks at {bits} bits must have shape ({expected},) "
            f"(ceil({count} * {bits} / 8)), got {packed.shape}"
        )
    return unpack_codes(packed[None], bits, count)[0].reshape(shape)


def default_scale_factor(x: np.ndarray, fmt: BlockFormat) -> float | None:
    """The scale_factor the spec stores with x quantized in fmt: float8e4m3_scale_factor, or None."""
    return float8e4m3_scale_factor(x, fmt) if fmt.scale_kind is ScaleKind.FLOAT8E4M3 else None


def quantize(x: np.ndarray, fmt: BlockFormat) -> QuantizedTensor:
    """Blockwise-quantize x [..., D] along its last axis and pack the codes."""
    x = np.asarray(x, dtype=np.float32)
    factor = default_scale_factor(x, fmt)
    codes, scales, zp = quantize_codes(x, fmt, factor)
    return QuantizedTensor(pack_codes(codes, fmt.bits), scales, zp, x.shape[-1], fmt, factor)


def dequantize_codes(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    fmt: BlockFormat,
    scale_factor: float | None = None,
) -> np.ndarray:
    """float32 values [..., D] of unpacked codes [..., D]: (u - zero_point) * scale, or u * scale + offset."""
    d = codes.shape[-1]
    nb = fmt.num_blocks(d)
    scale = np.repeat(scales_to_float32(scales, fmt.scale_kind, scale_factor), fmt.block_size, axis=-1)[..., :d]
    if fmt.float_offsets:
        assert zero_points is not None and zero_points.shape[-1] == nb
        offset = np.repeat(zero_points.astype(np.float32), fmt.block_size, axis=-1)[..., :d]
        product = (codes.astype(np.float32) * scale).astype(np.float32)  # one rounding, then one more
        return (product + offset).astype(np.float32)
    if fmt.symmetric:
        zp = np.float32(fmt.implicit_zero_point)
    else:
        assert zero_points is not None and zero_points.shape[-1] == nb
        zp = np.repeat(zero_points.astype(np.float32), fmt.block_size, axis=-1)[..., :d]
    return ((codes.astype(np.float32) - zp) * scale).astype(np.float32)


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """float32 values [..., D] of a packed QuantizedTensor."""
    codes = unpack_codes(q.codes, q.fmt.bits, q.axis_size)
    return dequantize_codes(codes, q.scales, q.zero_points, q.fmt, q.scale_factor)


def fake_quantize(x: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """quantize then dequantize (the value the runtime will see), without packing."""
    factor = default_scale_factor(x, fmt)
    codes, scales, zp = quantize_codes(x, fmt, factor)
    return dequantize_codes(codes, scales, zp, fmt, factor)
