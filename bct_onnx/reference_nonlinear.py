"""numpy specification of the compressed nonlinear ops and of BlockActMatMul (docs/ops.md).

Every op is dequantize -> float32 compute -> requantize. The quantize/dequantize steps are
``block_format`` itself; the float32 compute in between is written here operation by operation in
the order the C++ and CUDA kernels evaluate it (runtime_ops/include/bct/nonlinear_math.h), so the
kernels agree with this module bit for bit: float outputs exactly, codes, scales and zero points
exactly. That is possible because nothing here calls a library transcendental: exp, erf and tanh
are fixed float32 polynomials (Cephes expf; erf a ratio of two polynomials), and every numpy operation
on float32 arrays is one IEEE-rounded operation, like the kernels' (no fused multiply-add).

Row sums use ``LANES`` interleaved accumulators (lane j adds elements i = j mod 8 in order) combined
pairwise at the end; numpy's own ``sum`` (pairwise blocks of 128) would differ in the last bits.

Accuracy of the float path against exact math (float64), measured by tests/runtime_ops/test_nonlinear.py:
exp_f32 within 1 ulp on [-87, 88]; erf_f32 within 4e-7 and tanh_f32 within 1.8e-7 absolute; GELU
within 2.5e-7 * max(|x|, 1) (erf form) and 1.2e-7 * |x| (tanh form) of the exact function; SiLU within
3 ulp (relative 2e-7) of x * sigmoid(x), and -0 below x = -88 where |x * sigmoid(x)| < 5.4e-37.
"""

from __future__ import annotations

import numpy as np

from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    ScaleKind,
    dequantize,
    quantize,
)
from bct_onnx.reference_ops import quantize_activations

LANES = 8

F = np.float32
_EXP_HI = F(88.0)
_EXP_LO = F(-87.0)
_LOG2E = F(1.44269504088896341)
_LN2_HI = F(0.693359375)
_LN2_LO = F(-2.12194440e-4)
_EXP_P = tuple(
    F(c)
    for c in (
        1.9875691500e-4,
        1.3981999507e-3,
        8.3334519073e-3,
        4.1665795894e-2,
        1.6666665459e-1,
        5.0000001201e-1,
    )
)
# erf(a) = a * P(a^2) / Q(a^2) for 0 <= a <= 4 (a weighted least-squares fit to erf on [0, 4], highest
# coefficient first), 1 beyond (erf(4) = 1 - 1.5e-8 rounds to 1 in float32).
_ERF_CLAMP = F(4.0)
_ERF_NUM = tuple(F(c) for c in (1.9168949e-08, -1.9704373e-06, 0.0001521507, 0.0041687866, 0.05205821, 0.21114579, 1.1283789))
_ERF_DEN = tuple(F(c) for c in (0.0010664745, 0.01530672, 0.11963671, 0.52045214, 1.0))
_INV_SQRT2 = F(0.707106781186547524)
_SQRT_2_OVER_PI = F(0.797884560802865356)
_GELU_CUBIC = F(0.044715)
_HALF = F(0.5)
_ONE = F(1.0)
_TWO = F(2.0)
_SILU_LO = F(-88.0)

Operand = "np.ndarray | QuantizedTensor"


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def exp_f32(x: np.ndarray) -> np.ndarray:
    """exp in float32 as the kernels compute it: Cephes expf; 0 below -87, clamped above 88."""
    x = _f32(x)
    with np.errstate(invalid="ignore"):
        inside = (x >= _EXP_LO) & (x <= _EXP_HI)
        xk = np.where(inside, x, np.where(x > _EXP_HI, _EXP_HI, _EXP_LO)).astype(np.float32)
        k = np.rint(xk * _LOG2E)
        r = (xk - k * _LN2_HI) - k * _LN2_LO
        z = r * r
        p = np.full_like(r, _EXP_P[0])
        for c in _EXP_P[1:]:
            p = p * r + c
        y = (p * z + r) + _ONE
        two_k = ((k.astype(np.int32) + 127) << 23).astype(np.uint32).view(np.float32)
        out = y * two_k
        return np.where(np.isnan(x), x, np.where(x < _EXP_LO, F(0.0), out)).astype(np.float32)


def erf_f32(x: np.ndarray) -> np.ndarray:
    """erf in float32 as the kernels compute it: a rational function of |x| clamped to 4, at most 1."""
    x = _f32(x)
    a = np.minimum(np.abs(x), _ERF_CLAMP)  # NaN stays NaN
    z = a * a
    num = np.full_like(a, _ERF_NUM[0])
    for c in _ERF_NUM[1:]:
        num = num * z + c
    den = np.full_like(a, _ERF_DEN[0])
    for c in _ERF_DEN[1:]:
        den = den * z + c
    v = np.minimum((a * num) / den, _ONE)
    return np.where(x < 0, -v, v).astype(np.float32)


def tanh_f32(x: np.ndarray) -> np.ndarray:
    """tanh in float32 as the kernels compute it: 1 - 2 / (exp_f32(2x) + 1)."""
    x = _f32(x)
    with np.errstate(over="ignore"):
        return (_ONE - _TWO / (exp_f32(_TWO * x) + _ONE)).astype(np.float32)


def lane_sum(v: np.ndarray) -> np.ndarray:
    """Sum over the last axis in the kernels' order: 8 interleaved lanes, combined pairwise."""
    v = _f32(v)
    d = v.shape[-1]
    pad = -d % LANES
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.float32)], axis=-1)
    lanes = v.reshape(v.shape[:-1] + ((d + pad) // LANES, LANES))
    # Each lane starts from +0.0 like the kernels' accumulators (so an all -0.0 lane sums to +0.0).
    lanes = np.concatenate([np.zeros(lanes.shape[:-2] + (1, LANES), np.float32), lanes], axis=-2)
    acc = np.add.accumulate(lanes, axis=-2, dtype=np.float32)[..., -1, :]  # sequential per lane
    a = [acc[..., j] for j in range(LANES)]
    return (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Float32 ops (the compute step between dequantize and requantize)


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU: approximate="none" is the erf form, "tanh" the tanh form (as ONNX Gelu-20)."""
    x = _f32(x)
    if approximate == "tanh":
        with np.errstate(over="ignore", invalid="ignore"):
            x3 = (x * x) * x
            inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x3)
            return ((_HALF * x) * (_ONE + tanh_f32(inner))).astype(np.float32)
    if approximate != "none":
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    with np.errstate(over="ignore", invalid="ignore"):
        return ((_HALF * x) * (_ONE + erf_f32(x * _INV_SQRT2))).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU (Llama's MLP activation) x * sigmoid(x), evaluated as x / (1 + exp_f32(-x)); -0 below -88."""
    x = _f32(x)
    with np.errstate(over="ignore", invalid="ignore"):
        y = x / (_ONE + exp_f32(-x))
        return np.where(x < _SILU_LO, F(-0.0), y).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis: e = exp_f32(x - max), e * (1 / lane_sum(e))."""
    x = _f32(x)
    with np.errstate(invalid="ignore"):
        m = np.max(np.where(np.isnan(x), -np.inf, x), axis=-1, keepdims=True).astype(np.float32)
        e = exp_f32(x - m)
    inv = (_ONE / lane_sum(e))[..., None]
    return (e * inv).astype(np.float32)


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, epsilon: float) -> np.ndarray:
    """LayerNorm over the last axis (two-pass variance, biased), affine with scale and bias."""
    x = _f32(x)
    n = F(x.shape[-1])
    mean = (lane_sum(x) / n)[..., None]
    d = x - mean
    var = (lane_sum(d * d) / n)[..., None]
    inv = _ONE / np.sqrt(var + F(epsilon))
    y = (d * inv) * _f32(scale)
    if bias is not None:
        y = y + _f32(bias)
    return y.astype(np.float32)


def rms_norm(x: np.ndarray, scale: np.ndarray, epsilon: float) -> np.ndarray:
    """RMS normalization over the last axis (Llama): x / sqrt(mean(x^2) + eps) * scale."""
    x = _f32(x)
    ms = (lane_sum(x * x) / F(x.shape[-1]))[..., None]
    inv = _ONE / np.sqrt(ms + F(epsilon))
    return ((x * inv) * _f32(scale)).astype(np.float32)


def act_matmul(
    a: np.ndarray, b: np.ndarray, act_bits: int, block_size: int, transpose_b: bool = False
) -> np.ndarray:
    """A [..., M, K] x B [..., K, N] (or B [..., N, K] with transpose_b), both quantized at run time.

    A along K (its last axis) and B along K (axis -2, or -1 with transpose_b), symmetric, float32
    scales, exactly ``quantize_codes(., BlockFormat(act_bits, block_size, True, "float32"))``. Per
    output element and block, the integer dot product of the signed codes (u - 2**(bits-1)) is
    scaled by ``a_scale * b_scale`` and accumulated in float32 in block order, starting from 0. A block
    holding a NaN or an infinity has scale NaN (reference_ops.activation_scales), so every output
    using it is NaN.
    Batch dims broadcast like numpy.matmul; both operands need rank >= 2.
    """
    a = _f32(a)
    b = _f32(b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError("act_matmul needs rank >= 2 operands")
    bt = b if transpose_b else np.swapaxes(b, -1, -2)  # [..., N, K]
    if a.shape[-1] != bt.shape[-1]:
        raise ValueError(f"K mismatch: A {a.shape}, B {b.shape}, transpose_b={transpose_b}")
    fmt = BlockFormat(act_bits, block_size, True, ScaleKind.FLOAT32)
    batch = np.broadcast_shapes(a.shape[:-2], bt.shape[:-2])
    m, n = a.shape[-2], bt.shape[-2]
    if a.size == 0 or bt.size == 0:
        return np.zeros(batch + (m, n), np.float32)  # empty, or K = 0 is rejected by the kernels anyway
    zp = 1 << (act_bits - 1)
    with np.errstate(invalid="ignore", over="ignore"):
        ca, sa = quantize_activations(a, act_bits, block_size)
        cb, sb = quantize_activations(bt, act_bits, block_size)
    qa = ca.astype(np.int64) - zp  # [..., M, K]
    qb = cb.astype(np.int64) - zp  # [..., N, K]
    k = a.shape[-1]
    nb = fmt.num_blocks(k)
    acc = np.zeros(batch + (m, n), np.float32)
    for blk in range(nb):
        lo, hi = blk * block_size, min(k, (blk + 1) * block_size)
        dot = np.matmul(qa[..., lo:hi], np.swapaxes(qb[..., lo:hi], -1, -2))  # exact int64
        scale = sa[..., :, blk, None] * sb[..., None, :, blk]  # float32 [..., M, N]
        acc = (acc + dot.astype(np.float32) * scale).astype(np.float32)
    return acc


# ---------------------------------------------------------------------------------------------
# The operand convention: float32 or blockwise-quantized in, float32 or blockwise-quantized out.


def load_operand(x: np.ndarray | QuantizedTensor) -> np.ndarray:
    """The float32 value an op computes on: x itself, or block_format.dequantize of a quantized x."""
    if isinstance(x, QuantizedTensor):
        return dequantize(x)
    return _f32(x)


def store_result(y: np.ndarray, out_fmt: BlockFormat | None) -> np.ndarray | QuantizedTensor:
    """The op's output: y (out_bits=0) or block_format.quantize(y, out_fmt) along the last axis."""
    return y if out_fmt is None else quantize(y, out_fmt)


def block_gelu(x, approximate: str = "none", out_fmt: BlockFormat | None = None):
    """BlockGelu: dequantize -> gelu -> requantize."""
    return store_result(gelu(load_operand(x), approximate), out_fmt)


def block_silu(x, out_fmt: BlockFormat | None = None):
    """BlockSilu: dequantize -> silu -> requantize."""
    return store_result(silu(load_operand(x)), out_fmt)


def block_softmax(x, out_fmt: BlockFormat | None = None):
    """BlockSoftmax (axis=-1): dequantize -> softmax -> requantize."""
    return store_result(softmax(load_operand(x)), out_fmt)


def block_layer_norm(x, scale, bias=None, epsilon: float = 1e-5, out_fmt: BlockFormat | None = None):
    """BlockLayerNorm: dequantize -> layer_norm -> requantize."""
    return store_result(layer_norm(load_operand(x), scale, bias, epsilon), out_fmt)


def block_rms_norm(x, scale, epsilon: float = 1e-6, out_fmt: BlockFormat | None = None):
    """BlockRMSNorm: dequantize -> rms_norm -> requantize."""
    return store_result(rms_norm(load_operand(x), scale, epsilon), out_fmt)


def block_act_matmul(
    a, b, act_bits: int, block_size: int, transpose_b: bool = False, out_fmt: BlockFormat | None = None
):
    """BlockActMatMul: A (float or quantized operand) x B (float32) -> float or quantized."""
    return store_result(act_matmul(load_operand(a), b, act_bits, block_size, transpose_b), out_fmt)
