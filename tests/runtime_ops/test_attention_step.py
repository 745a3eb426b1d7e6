"""BlockAttention's decoder step (new K / V appended to the cache in the op, rotary, [B, S, H * Dh]
layout) against its spec, bct_onnx.reference_attention.attention_step.

Tolerances: 0 everywhere, compared as raw bits: the kernel (every CPU path) against the spec for Y and
each present output on its own; the spec's rotary against transformers' apply_rotary_pos_emb (the
same float32 Mul / Add per element).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from support import assert_bits_equal, ort_feed, run

import bct_onnx
from bct_onnx import reference_attention as ref
from bct_onnx.block_format import BlockFormat, QuantizedTensor, ScaleKind, quantize
from bct_onnx.ops import DOMAIN

ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.uint8): TensorProto.UINT8,
}
OUTPUTS = ["y", "present_k", "present_v", "present_k_scales", "present_v_scales"]


def step_model(inputs: list[np.ndarray | None], float_cache: bool, **attrs: Any) -> tuple[bytes, dict]:
    """One BlockAttention node with inputs Q, past K (3), past V (3), mask, K_new, V_new, cos, sin."""
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    while names and names[-1] == "":
        names.pop()
    outputs = OUTPUTS[:3] if float_cache else OUTPUTS
    node = helper.make_node("BlockAttention", names, outputs, domain=DOMAIN, name="attn", **attrs)
    in_info = [
        helper.make_tensor_value_info(n, ONNX_TYPES[v.dtype], [f"d{i}_{j}" for j in range(v.ndim)])
        for i, (n, v) in enumerate(zip(names, inputs, strict=False))
        if v is not None
    ]
    out_info = [helper.make_value_info(n, onnx.TypeProto()) for n in outputs if n]
    graph = helper.make_graph([node], "g", in_info, out_info)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return model.SerializeToString(), {n: v for n, v in zip(names, inputs, strict=False) if v is not None}


def sample(shape: tuple[int, ...], seed: int, spread: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * spread).astype(np.float32)


def rotary_tables(batch: int, positions: np.ndarray, rot: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [batch, S, rot] as Llama's rotary embedding computes them (base 10000)."""
    inv = 1.0 / (10000 ** (np.arange(0, rot, 2, dtype=np.float32) / rot))
    angles = positions[:, :, None].astype(np.float32) * inv[None, None, :]
    emb = np.concatenate([angles, angles], axis=-1)
    emb = np.broadcast_to(emb, (batch, positions.shape[1], rot))
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


# (name, B, Hq, Hkv, Sq, past, Dh, kv_bits (0: float cache), rot (0: none), packed, cos rank 4)
CASES = [
    ("decode_gqa_codes8_packed", 1, 9, 3, 1, 128, 64, 8, 64, True, False),
    ("decode_codes4_partial_rotary", 1, 4, 2, 1, 40, 64, 4, 16, True, True),
    ("prefill_no_past_causal_mask", 1, 6, 2, 5, 0, 64, 8, 64, True, False),
    ("chunk_batch2_heads_first", 2, 4, 4, 3, 17, 32, 8, 32, False, True),
    ("float_cache_packed", 2, 6, 3, 2, 9, 40, 0, 40, True, False),
    ("no_rotary_codes6", 1, 2, 1, 1, 33, 48, 6, 0, True, False),
]


def case_inputs(case: tuple[Any, ...], seed: int = 0) -> dict[str, Any]:
    _, b, hq, hkv, sq, past, dh, kv_bits, rot, packed, cos4 = case
    fmt = BlockFormat(kv_bits, 32, True, ScaleKind.FLOAT16) if kv_bits else None
    past_k, past_v = sample((b, hkv, past, dh), seed, 1.5), sample((b, hkv, past, dh), seed + 1)
    if fmt is not None:
        past_k, past_v = quantize(past_k, fmt), quantize(past_v, fmt)
    shape = (lambda h: (b, sq, h * dh)) if packed else (lambda h: (b, h, sq, dh))
    q, k_new, v_new = (
        sample(shape(hq), seed + 2, 1.5),
        sample(shape(hkv), seed + 3, 1.5),
        sample(shape(hkv), seed + 4),
    )
    cos = sin = None
    if rot:
        positions = np.arange(past, past + sq)[None].repeat(b, 0) + np.arange(b)[:, None]
        cos, sin = rotary_tables(b, positions, rot)
    sk = past + sq
    visible = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + past
    mask = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]
    return dict(
        q=q,
        k_new=k_new,
        v_new=v_new,
        past_k=past_k,
        past_v=past_v,
        mask=mask,
        cos=cos,
        sin=sin,
        q_heads=hq if packed else None,
        cos4=cos4,
    )


def run_step(
    args: dict[str, Any],
    act_bits: int = 8,
    block_size: int = 32,
    scale: float = 0.125,
    threads: int | None = None,
) -> list[np.ndarray]:
    """The step's outputs; threads: the session's intra-op threads (default ONNX Runtime's)."""
    attrs: dict[str, Any] = {"act_bits": act_bits, "block_size": block_size, "scale": scale}
    if args.get("causal"):
        attrs["causal"] = 1
    if args["q_heads"]:
        attrs["q_heads"] = args["q_heads"]
    kv: list[np.ndarray | None] = []
    for x in (args["past_k"], args["past_v"]):
        if isinstance(x, QuantizedTensor):
            kv += [x.codes, x.scales, None]
            attrs.update(kv_bits=x.fmt.bits, kv_block_size=x.fmt.block_size, kv_symmetric=1)
        else:
            kv += [x, None, None]
    cos, sin = args["cos"], args["sin"]
    if cos is not None and args["cos4"]:
        cos, sin = cos[:, None], sin[:, None]
    inputs = [args["q"], *kv, args["mask"], args["k_new"], args["v_new"], cos, sin]
    model, feeds = step_model(inputs, not isinstance(args["past_k"], QuantizedTensor), **attrs)
    if threads is None:
        return run(model, feeds)
    return bct_onnx.session(model, threads=threads).run(None, {k: ort_feed(v) for k, v in feeds.items()})


def spec(args: dict[str, Any], act_bits: int = 8, block_size: int = 32, scale: float = 0.125):
    return ref.attention_step(
        args["q"],
        args["k_new"],
        args["v_new"],
        args["past_k"],
        args["past_v"],
        act_bits=act_bits,
        block_size=block_size,
        scale=scale,
        mask=args["mask"],
        causal=bool(args.get("causal")),
        cos=args["cos"],
        sin=args["sin"],
        q_heads=args["q_heads"],
    )


def assert_matches_spec(got: list[np.ndarray], args: dict[str, Any], what: str) -> None:
    y, present_k, present_v = spec(args)
    assert_bits_equal(got[0], y, f"{what}: Y")
    if isinstance(present_k, QuantizedTensor):
        assert len(got) == 5
        for i, (name, expected) in enumerate(
            [
                ("K codes", present_k.codes),
                ("V codes", present_v.codes),
                ("K scales", present_k.scales),
                ("V scales", present_v.scales),
            ],
            start=1,
        ):
            assert_bits_equal(got[i], expected, f"{what}: present {name}")
    else:
        assert len(got) == 3
        assert_bits_equal(got[1], present_k, f"{what}: present K")
        assert_bits_equal(got[2], present_v, f"{what}: present V")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_every_isa_path_gives_the_spec_bits(case: tuple[Any, ...], isa: str, force_isa: Any) -> None:
    force_isa(isa)
    args = case_inputs(case)
    assert_matches_spec(run_step(args), args, f"{case[0]} [{isa}]")


def test_past_rows_are_kept_and_new_rows_are_quantized_on_their_own() -> None:
    args = case_inputs(CASES[0])
    got = run_step(args)
    past = args["past_k"]
    np.testing.assert_array_equal(got[1][:, :, :128], past.codes)
    np.testing.assert_array_equal(got[3][:, :, :128], past.scales)
    rotated = ref.rotary(ref._heads_first(args["k_new"], 3), args["cos"], args["sin"])
    fresh = quantize(rotated, past.fmt)
    np.testing.assert_array_equal(got[1][:, :, 128:], fresh.codes)


def test_spec_rotary_is_transformers_rotary_bit_for_bit() -> None:
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = sample((2, 4, 5, 64), 0, 2.0), sample((2, 2, 5, 64), 1, 2.0)
    cos, sin = rotary_tables(2, np.arange(10, 15)[None].repeat(2, 0), 64)
    tq, tk = apply_rotary_pos_emb(*(torch.from_numpy(x) for x in (q, k, cos, sin)))
    assert_bits_equal(ref.rotary(q, cos, sin), tq.numpy(), "rotary Q")
    assert_bits_equal(ref.rotary(k, cos, sin), tk.numpy(), "rotary K")


def test_packed_q_needs_q_heads() -> None:
    args = case_inputs(CASES[0])
    args["q_heads"] = None
    with pytest.raises(Exception, match="q_heads"):
        run_step(args)


def test_new_rows_of_another_length_are_refused() -> None:
    args = case_inputs(CASES[0])
    args["k_new"] = np.concatenate([args["k_new"], args["k_new"]], axis=1)
    with pytest.raises(Exception, match="K_new"):
        run_step(args)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("mask_kind", ["shared", "per_head", "none_causal"])
def test_decode_step_with_the_query_heads_of_a_kv_head_together(
    mask_kind: str, isa: str, force_isa: Any
) -> None:
    """One query row per head: with a mask shared by the heads (or none), the kernel runs the query heads
    of one KV head as one task (5 here: more than its 4-row batches), else head by head; batch 2,
    causal or not, the same bits as the spec either way."""
    force_isa(isa)
    case = ("decode_batch2_gqa5", 2, 10, 2, 1, 70, 64, 8, 64, True, False)
    args = case_inputs(case, seed=3)
    sk = 71
    if mask_kind == "per_head":  # [B, Hq, 1, Sk]: each head hides other keys
        hidden = np.random.default_rng(5).random((2, 10, 1, sk)) < 0.3
        args["mask"] = np.where(hidden, np.float32(-1e4), np.float32(0.0)).astype(np.float32)
    elif mask_kind == "none_causal":
        args["mask"] = None
        args["causal"] = True
    assert_matches_spec(run_step(args), args, f"{case[0]} {mask_kind} [{isa}]")


def test_concurrent_steps_of_different_shapes() -> None:
    """Steps in flight on several threads at once (the call's buffers are per-thread scratch, reused
    across calls and shapes): every result still the spec's bits."""
    jobs = [(case, seed) for seed in range(3) for case in CASES]

    def work(job: tuple[tuple[Any, ...], int]) -> None:
        case, seed = job
        args = case_inputs(case, seed=seed)
        assert_matches_spec(run_step(args), args, f"{case[0]} seed {seed}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, jobs))


@pytest.mark.parametrize("isa", ["scalar", "avx512vnni"])
@pytest.mark.parametrize(
    ("dh", "block_size", "past"),
    [(128, 32, 37), (80, 16, 20), (64, 64, 130), (24, 8, 5), (40, 32, 9), (160, 32, 11), (96, 24, 21)],
)
def test_8bit_cache_of_other_head_sizes_and_blocks(
    dh: int, block_size: int, past: int, isa: str, force_isa: Any
) -> None:
    """8-bit cache codes in the op's own blocks are packed for the VNNI dots straight from the cache (16
    groups of 4 codes of 16 keys at a time): head sizes of several and of partial 16-group chunks, blocks
    of 8 to 64 (24: a block across two 16-group chunks), key counts that are not multiples of 16; the
    spec's bits. V's codes are read as they are
    (a tile dequantized at a time) up to head size 128, a partial last block included (40 = 32 + 8); 160
    takes the dequantized copy of V."""
    force_isa(isa)
    fmt = BlockFormat(8, block_size, True, ScaleKind.FLOAT16)
    args = case_inputs(("decode", 1, 6, 2, 1, past, dh, 8, dh, True, False), seed=dh)
    past_k, past_v = sample((1, 2, past, dh), dh, 1.5), sample((1, 2, past, dh), dh + 1)
    args["past_k"], args["past_v"] = quantize(past_k, fmt), quantize(past_v, fmt)
    y, *_ = spec(args, block_size=block_size)
    assert_bits_equal(run_step(args, block_size=block_size)[0], y, f"dh {dh} block {block_size} [{isa}]")


def test_a_large_step_then_small_ones() -> None:
    """A call whose buffers exceed what a thread keeps (8 MB: V of 8 KV heads x 16385 keys as float32)
    gives them back at its end; the calls after it, smaller, still give the spec's bits."""
    for case in [("long_past", 1, 8, 8, 1, 16384, 64, 8, 64, True, False), *CASES[:2]]:
        args = case_inputs(case, seed=7)
        assert_matches_spec(run_step(args), args, case[0])


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512vnni"])
@pytest.mark.parametrize("kv_bits", [0, 8, 4])
@pytest.mark.parametrize("past", [0, 1, 2, 16, 37])
def test_decode_step_appends_in_key_chunks(past: int, kv_bits: int, isa: str, force_isa: Any) -> None:
    """A decoder step with the query heads together appends its new row, prepares and packs the keys in
    two chunks per KV head (split at the multiple of 16 keys nearest the middle), and the chunk that
    completes a head runs its queries: with 0, 1, 2, 16 or 37 past rows (a chunk empty, one holding only
    the new row (16), a past/new boundary inside a chunk), batch 2 (chunks of different heads and
    batches), a float, 8-bit or 4-bit cache; every output the spec's bits."""
    force_isa(isa)
    case = ("decode_chunks", 2, 6, 2, 1, past, 64, kv_bits, 64, True, False)
    args = case_inputs(case, seed=past + kv_bits)
    assert_matches_spec(run_step(args), args, f"past {past} kv_bits {kv_bits} [{isa}]")


@pytest.mark.parametrize("isa", ["scalar", "avx512", "avx512vnni"])
def test_cache_key_scales_that_are_not_finite_or_subnormal(isa: str, force_isa: Any) -> None:
    """Key scales of the 8-bit cache widened to float32 (in vectors on the AVX-512 paths): float16
    subnormals exactly, an infinite or NaN scale as act_scale's NaN, which makes the rows of the query
    heads that see that key NaN; every output the spec's bits, 17+ keys so a vector tail is partial."""
    force_isa(isa)
    args = case_inputs(("decode_odd_scales", 1, 6, 2, 1, 40, 64, 8, 64, True, False), seed=11)
    scales = args["past_k"].scales.copy()
    scales[0, 0, 3, 1] = np.float16(np.inf)
    scales[0, 0, 7, 0] = np.float16(-np.inf)
    scales[0, 1, 38, 1] = np.float16(np.nan)
    scales[0, 1, :30, 0] = np.float16(2.0**-20)  # subnormal in float16
    args["past_k"] = QuantizedTensor(args["past_k"].codes, scales, None, 64, args["past_k"].fmt)
    got = run_step(args)
    assert np.all(np.isnan(got[0])), "every query head sees a key with a non-finite scale"
    assert_matches_spec(got, args, f"odd scales [{isa}]")
    clean = case_inputs(("decode_odd_scales", 1, 6, 2, 1, 40, 64, 8, 64, True, False), seed=11)
    scales = clean["past_k"].scales.copy()
    scales[0, 1, :30, 0] = np.float16(2.0**-20)
    clean["past_k"] = QuantizedTensor(clean["past_k"].codes, scales, None, 64, clean["past_k"].fmt)
    got = run_step(clean)
    assert not np.any(np.isnan(got[0]))
    assert_matches_spec(got, clean, f"subnormal scales [{isa}]")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("past", [15, 31, 100, 333])
def test_decode_step_copies_past_keys_as_it_packs_them(
    past: int, threads: int, isa: str, force_isa: Any
) -> None:
    """On the VNNI path a decoder step with an 8-bit cache reads each past K row once: the packing for
    the Q x K^T dots also copies it to the present cache (the new row is quantized there and packed
    after it); on every path V's past rows are read from the past cache, the new row from the present
    one (whose past rows are stored non-temporally). Past lengths that are not multiples of 16 (15: the new row completes a 16-key group; 31;
    100; 333: the second key chunk of a KV head starts at 48 / 160, its past rows end inside a group),
    batch 2 x 3 KV heads as SmolLM2 (9 query heads), on 1 and 2 threads: Y and every present output the
    spec's bits, so a row copied to the wrong place, or packed from the wrong one, fails."""
    force_isa(isa)
    case = ("decode_fused_copy", 2, 9, 3, 1, past, 64, 8, 64, True, False)
    args = case_inputs(case, seed=past)
    got = run_step(args, threads=threads)
    assert_matches_spec(got, args, f"past {past} threads {threads} [{isa}]")
    np.testing.assert_array_equal(got[1][:, :, :past], args["past_k"].codes)
