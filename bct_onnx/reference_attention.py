"""numpy specification of BlockAttention (docs/ops.md): scaled, masked attention in one op.

Written in the kernels' order (runtime_ops/include/bct/attention_math.h), so the CPU and CUDA
kernels agree with it bit for bit. Per query row: the scores of a tile of ``KEY_TILE`` keys are
BlockActMatMul's (Q and K quantized blockwise along head_dim, integer block dots scaled by
``q_scale * k_scale`` and summed in float32 in block order), times ``scale``, plus the additive mask;
then an online softmax (running max m, running sum l, running output acc, rescaled by exp(m - m_new)
when a tile raises the max) adds the tile's p (summed in 8 interleaved lanes, reference_nonlinear.lane_sum)
to l and accumulates p * V key by key, and the row ends as acc * (1 / l). The
probability matrix is never formed. Against the unfused chain BlockActMatMul -> scale/mask ->
BlockSoftmax -> BlockActMatMul the scores are the same bits; the difference is the chain's
quantization of P and V (here P and V stay float32): ``chain_tolerance`` bounds it.

K and V are float32 [B, Hkv, Sk, Dh], or blockwise codes along Dh (a compressed KV cache). Q is
float32 [B, Hq, Sq, Dh] with Hq a multiple of Hkv (grouped-query attention: query head h reads KV
head h // (Hq // Hkv)). K codes in the run-time format (symmetric, block_size of the op) are used as
they are, with their stored scales widened to float32; other K codes are dequantized and quantized
again. V codes are dequantized (block_format.dequantize).

``attention_step`` is the decoder form (one layer of a with-past decoder in one op): rotary embedding
of Q and the new keys, the KV-cache append (the new rows quantized into the cache's codes), then
``attention`` over the present cache; Q, the new K and V may come as [B, S, H * Dh] and the result
then goes back the same way.
"""

from __future__ import annotations

import numpy as np

from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    dequantize,
    quantize,
    scales_to_float32,
    unpack_codes,
)
from bct_onnx.reference_nonlinear import exp_f32, lane_sum
from bct_onnx.reference_ops import activation_scales, quantize_activations

KEY_TILE = 64  # keys per online-softmax step: the row max is taken over a tile, then p * V key by key
F = np.float32


def _signed_codes(
    x: np.ndarray | QuantizedTensor, act_bits: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Signed codes [..., D] (int64) and float32 scales [..., nb] of an operand of Q x K^T."""
    if isinstance(x, QuantizedTensor) and x.fmt.symmetric and x.fmt.block_size == block_size:
        codes = unpack_codes(x.codes, x.fmt.bits, x.axis_size).astype(np.int64) - (1 << (x.fmt.bits - 1))
        return codes, activation_scales(scales_to_float32(x.scales, x.fmt.scale_kind))
    value = dequantize(x) if isinstance(x, QuantizedTensor) else np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        codes, scales = quantize_activations(value, act_bits, block_size)
    return codes.astype(np.int64) - (1 << (act_bits - 1)), scales


def scores(q: np.ndarray, k, act_bits: int, block_size: int) -> np.ndarray:
    """Q [B, Hq, Sq, Dh] x K^T -> [B, Hq, Sq, Sk] float32, exactly BlockActMatMul's (transpose_b=1)."""
    qa, sa = _signed_codes(q, act_bits, block_size)
    kb, sb = _signed_codes(k, act_bits, block_size)
    group = qa.shape[1] // kb.shape[1]
    kb, sb = np.repeat(kb, group, axis=1), np.repeat(sb, group, axis=1)
    dh = qa.shape[-1]
    acc = np.zeros(qa.shape[:-1] + (kb.shape[-2],), np.float32)
    for blk, lo in enumerate(range(0, dh, block_size)):
        hi = min(dh, lo + block_size)
        dot = np.matmul(qa[..., lo:hi], np.swapaxes(kb[..., lo:hi], -1, -2))  # exact
        scale = sa[..., :, blk, None] * sb[..., None, :, blk]
        acc = (acc + dot.astype(np.float32) * scale).astype(np.float32)
    return acc


def attention(
    q: np.ndarray,
    k: np.ndarray | QuantizedTensor | None,
    v: np.ndarray | QuantizedTensor | None,
    *,
    act_bits: int,
    block_size: int,
    scale: float,
    mask: np.ndarray | None = None,
    causal: bool = False,
    q_heads: int | None = None,
    kv_heads: int | None = None,
) -> np.ndarray:
    """BlockAttention: softmax(scale * (Q x K^T) + mask, causal) x V -> [B, Hq, Sq, Dh] float32.

    causal: query i (of Sq, the last Sq of the Sk positions) sees keys j <= i + Sk - Sq. A row with
    no key it may see, or whose scores are all -inf, is 0. A NaN score (a NaN or an infinity in a block
    of the query or of a key it sees, or a NaN mask) makes the row NaN (the float32 NaN 0x7fc00000).

    An encoder's layout: Q [B, Sq, Hq * Dh] (q_heads gives Hq) with float32 K, V [B, Sk, Hkv * Dh]
    gives Y [B, Sq, Hq * Dh]; the values are those of the heads-first layout (every quantization
    block lies inside one head's row either way). One packed projection: with kv_heads (Hkv) and k
    None, Q's [B, S, *] tensor holds Q's heads then K's (v [B, S, Hkv * Dh]), or with v None too Q's,
    K's and V's heads; the op reads them in place, with the values of the three tensors.
    """
    if k is None:
        if kv_heads is None or q_heads is None or np.asarray(q).ndim != 3:
            raise ValueError("K absent needs Q [B, S, (Hq + Hkv [+ Hkv]) * Dh] with q_heads and kv_heads")
        q = np.asarray(q, dtype=np.float32)
        heads = q_heads + (2 if v is None else 1) * kv_heads
        dh = q.shape[-1] // heads
        q, k, rest = np.split(q, [q_heads * dh, (q_heads + kv_heads) * dh], axis=-1)
        return attention(
            q,
            k,
            rest if v is None else v,
            act_bits=act_bits,
            block_size=block_size,
            scale=scale,
            mask=mask,
            causal=causal,
            q_heads=q_heads,
        )
    if v is None:
        raise ValueError("V absent needs K absent too (Q, K and V in one tensor)")
    if np.asarray(q).ndim == 3:
        if q_heads is None:
            raise ValueError("q_heads is needed when Q is [B, S, Hq * Dh]")
        dh = np.asarray(q).shape[-1] // q_heads
        k, v = (np.asarray(t, np.float32) for t in (k, v))
        y = attention(
            _heads_first(q, q_heads),
            _heads_first(k, k.shape[-1] // dh),
            _heads_first(v, v.shape[-1] // dh),
            act_bits=act_bits,
            block_size=block_size,
            scale=scale,
            mask=mask,
            causal=causal,
        )
        return _heads_last(y)
    q = np.asarray(q, dtype=np.float32)
    batch, heads, sq, dh = q.shape
    s = scores(q, k, act_bits, block_size)
    sk = s.shape[-1]
    values = dequantize(v) if isinstance(v, QuantizedTensor) else np.asarray(v, dtype=np.float32)
    values = np.repeat(values, heads // values.shape[1], axis=1)  # [B, Hq, Sk, Dh]
    with np.errstate(invalid="ignore", over="ignore"):
        s = (s * F(scale)).astype(np.float32)
        if mask is not None:
            s = (s + np.asarray(mask, dtype=np.float32)).astype(np.float32)
    s = np.broadcast_to(s, (batch, heads, sq, sk))
    visible = np.ones((sq, sk), bool)
    if causal:
        visible = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
    m = np.full((batch, heads, sq), -np.inf, np.float32)
    l_sum = np.zeros((batch, heads, sq), np.float32)
    acc = np.zeros((batch, heads, sq, dh), np.float32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for t0 in range(0, sk, KEY_TILE):
            tile = slice(t0, min(sk, t0 + KEY_TILE))
            st = np.where(visible[:, tile], s[..., tile], F(-np.inf))
            m_tile = np.max(np.where(np.isnan(st), F(-np.inf), st), axis=-1)
            m_new = np.maximum(m, m_tile)
            live = m_new != F(-np.inf)  # a tile that leaves the max at -inf adds nothing
            rescale = live & (m_new != m)
            corr = np.where(rescale, exp_f32(m - m_new), F(1))
            l_sum = np.where(rescale, l_sum * corr, l_sum).astype(np.float32)
            acc = np.where(rescale[..., None], acc * corr[..., None], acc).astype(np.float32)
            m = np.where(live, m_new, m)
            # p of the tile (0 where a key is not visible or the tile adds nothing: the lane sums and
            # the kernels' shorter tiles then agree, as adding +0 changes no sum of p >= 0).
            p_tile = exp_f32(s[..., tile] - m[..., None])
            p_tile = np.where(live[..., None] & visible[None, None, :, tile], p_tile, F(0)).astype(np.float32)
            l_sum = np.where(live, l_sum + lane_sum(p_tile), l_sum).astype(np.float32)
            for j in range(tile.start, tile.stop):
                take = live & visible[None, None, :, j]
                p = p_tile[..., j - tile.start]
                acc = np.where(take[..., None], acc + p[..., None] * values[:, :, j, None, :], acc).astype(
                    np.float32
                )
        inv = (F(1) / l_sum).astype(np.float32)
        out = (acc * inv[..., None]).astype(np.float32)
    poisoned = np.any(np.isnan(s) & visible, axis=-1)
    out = np.where((l_sum == 0)[..., None], F(0), out)
    return np.where(poisoned[..., None], np.float32(np.nan), out).astype(np.float32)


def unfused_chain(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    act_bits: int,
    block_size: int,
    scale: float,
    mask: np.ndarray | None = None,
    p_bits: int = 8,
) -> np.ndarray:
    """What BlockAttention replaces, with float K and V: BlockActMatMul(Q, K, transpose_b) -> * scale
    -> + mask -> BlockSoftmax (result asymmetric p_bits codes, as CompressIntermediatesPass stores it)
    -> BlockActMatMul(P, V). GQA heads are repeated first (the export's Expand/Reshape)."""
    from bct_onnx.block_format import BlockFormat, ScaleKind
    from bct_onnx.reference_nonlinear import block_act_matmul, block_softmax

    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = block_act_matmul(q, k, act_bits, block_size, transpose_b=True)
    s = (s * F(scale)).astype(np.float32)
    if mask is not None:
        s = (s + np.asarray(mask, dtype=np.float32)).astype(np.float32)
    p = block_softmax(s, BlockFormat(p_bits, block_size, False, ScaleKind.FLOAT16))
    return block_act_matmul(p, v, act_bits, block_size)


def chain_tolerance(
    q: np.ndarray,
    k,
    v: np.ndarray,
    *,
    act_bits: int,
    block_size: int,
    scale: float,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """A bound on |BlockAttention - unfused chain| per output element (same scores in both).

    The chain stores P as asymmetric 8-bit codes along keys (error <= max p of the block / 510 per
    element, as p >= 0), then quantizes P and V again symmetric to act_bits codes (error <= max|x| of
    the block / 2**act_bits). So |dY| <= sum_j |dp_j| max|V| + sum_j p_j |dv_j|
    <= (e_p * sum_blocks(len * max p) + 2**-act_bits) * max|V|, e_p = 1/510 + 2**-act_bits, with p in
    float64 (attention_probabilities); 1% is added for the second-order terms and float32 rounding.
    """
    p = attention_probabilities(q, k, act_bits=act_bits, block_size=block_size, scale=scale, mask=mask)
    vmax = np.max(np.abs(np.asarray(v, np.float64)), axis=(-2, -1))  # [B, Hkv]
    vmax = np.repeat(vmax, q.shape[1] // vmax.shape[1], axis=1)[..., None, None]
    pad = (-p.shape[-1]) % block_size
    blocks = np.pad(p, [(0, 0)] * 3 + [(0, pad)]).reshape(p.shape[:-1] + (-1, block_size))
    mass = np.sum(np.max(blocks, axis=-1) * block_size, axis=-1)[..., None]  # sum_blocks(len * max p)
    e_v = 2.0**-act_bits
    return 1.01 * ((1.0 / 510 + e_v) * mass + e_v) * vmax


def attention_probabilities(q, k, *, act_bits: int, block_size: int, scale: float, mask=None) -> np.ndarray:
    """softmax(scale * scores + mask) in float64 (for tolerances and tests)."""
    s = scores(q, k, act_bits, block_size).astype(np.float64) * scale
    if mask is not None:
        s = s + np.asarray(mask, np.float64)
    s = s - np.max(s, axis=-1, keepdims=True)
    e = np.exp(s)
    return e / np.sum(e, axis=-1, keepdims=True)


def rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding, rotate_half form, on the first R = cos.shape[-1] elements of x's last axis (R
    even, <= Dh; the rest passes through, as partial rotary): x * cos + rotate_half(x) * sin with
    rotate_half(x) = concat(-x[R/2:R], x[:R/2]), each operation rounded in float32 (the Mul, Slice, Neg,
    Concat, Mul, Add that exporters write). x [B, H, S, Dh]; cos, sin [B or 1, S, R]."""
    x = np.asarray(x, np.float32)
    rot = cos.shape[-1]
    half = rot // 2
    c = np.asarray(cos, np.float32)[:, None]
    s = np.asarray(sin, np.float32)[:, None]
    part = x[..., :rot]
    turned = np.concatenate([-part[..., half:], part[..., :half]], axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        out = ((part * c).astype(np.float32) + (turned * s).astype(np.float32)).astype(np.float32)
    return np.concatenate([out, x[..., rot:]], axis=-1)


def _heads_first(x: np.ndarray, heads: int) -> np.ndarray:
    """[B, S, H * Dh] -> [B, H, S, Dh]."""
    b, s, width = x.shape
    return np.ascontiguousarray(
        np.asarray(x, np.float32).reshape(b, s, heads, width // heads).transpose(0, 2, 1, 3)
    )


def _heads_last(y: np.ndarray) -> np.ndarray:
    """[B, H, S, Dh] -> [B, S, H * Dh]."""
    b, h, s, dh = y.shape
    return np.ascontiguousarray(y.transpose(0, 2, 1, 3).reshape(b, s, h * dh))


def _append(past, new: np.ndarray, fmt: BlockFormat | None):
    """The present cache: past with the new rows appended along the sequence axis (quantized on their own
    into fmt's codes when the cache is compressed)."""
    if fmt is None:
        return np.concatenate([np.asarray(past, np.float32), new], axis=2)
    q = quantize(new, fmt)
    return QuantizedTensor(
        np.concatenate([past.codes, q.codes], axis=2),
        np.concatenate([past.scales, q.scales.astype(past.scales.dtype)], axis=2),
        None,
        new.shape[-1],
        fmt,
    )


def attention_step(
    q: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    past_k: np.ndarray | QuantizedTensor,
    past_v: np.ndarray | QuantizedTensor,
    *,
    act_bits: int,
    block_size: int,
    scale: float,
    mask: np.ndarray | None = None,
    causal: bool = False,
    cos: np.ndarray | None = None,
    sin: np.ndarray | None = None,
    q_heads: int | None = None,
):
    """BlockAttention with new keys and values (docs/ops.md): -> (Y, present K, present V).

    Q [B, Hq, S, Dh] and K_new, V_new [B, Hkv, S, Dh], or all three [B, S, H * Dh] (q_heads gives Hq;
    Hkv is the past's heads; Y is then [B, S, Hq * Dh]). With cos and sin, Q and K_new get
    ``rotary`` first. The present cache is past + new along axis 2: float32 when the past is, else the
    new rows quantized with the past's format (symmetric; blockwise along Dh) and appended to its codes.
    Attention then reads the present cache exactly as ``attention`` does."""
    packed = np.asarray(q).ndim == 3
    kv_heads = (past_k.codes if isinstance(past_k, QuantizedTensor) else np.asarray(past_k)).shape[1]
    if packed:
        if q_heads is None:
            raise ValueError("q_heads is needed when Q is [B, S, Hq * Dh]")
        q, k_new, v_new = (
            _heads_first(q, q_heads),
            _heads_first(k_new, kv_heads),
            _heads_first(v_new, kv_heads),
        )
    q, k_new, v_new = (np.asarray(t, np.float32) for t in (q, k_new, v_new))
    if cos is not None and sin is not None:
        q, k_new = rotary(q, cos, sin), rotary(k_new, cos, sin)
    fmt = past_k.fmt if isinstance(past_k, QuantizedTensor) else None
    present_k, present_v = _append(past_k, k_new, fmt), _append(past_v, v_new, fmt)
    y = attention(
        q,
        present_k,
        present_v,
        act_bits=act_bits,
        block_size=block_size,
        scale=scale,
        mask=mask,
        causal=causal,
    )
    if packed:
        y = _heads_last(y)
    return y, present_k, present_v
