"""BlockAttention (scale, mask, Q x K^T, streaming softmax and x V in one op) against its spec.

Tolerances, per output element:
- Kernel (every CPU path) vs bct_onnx.reference_attention.attention: 0, compared as raw bits (the
  same float32 operations in the same order: integer block dots, then per key tile the online softmax).
- The spec vs float64 softmax(scores) x V' (V' = V or its dequantized codes, same quantized scores):
  3e-6 * max|V| (the float32 roundings of exp_f32, the running rescale and the sums).
- The spec vs the unfused chain BlockActMatMul -> scale/mask -> BlockSoftmax (8-bit codes) ->
  BlockActMatMul: within reference_attention.chain_tolerance (the chain's P and V quantization).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from support import assert_bits_equal, run

from bct_onnx import block_format as bf
from bct_onnx import reference_attention as ref
from bct_onnx.block_format import BlockFormat, QuantizedTensor, ScaleKind
from bct_onnx.ops import DOMAIN

ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.uint8): TensorProto.UINT8,
}


def attention_model(inputs: list[np.ndarray | None], **attrs: Any) -> tuple[bytes, dict[str, np.ndarray]]:
    """One BlockAttention node over inputs Q, K, K_scales, K_zero_points, V, V_scales, V_zero_points, mask."""
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node("BlockAttention", names, ["y"], domain=DOMAIN, name="attn", **attrs)
    in_info = [
        helper.make_tensor_value_info(n, ONNX_TYPES[v.dtype], [f"d{i}_{j}" for j in range(v.ndim)])
        for i, (n, v) in enumerate(zip(names, inputs, strict=False))
        if v is not None
    ]
    graph = helper.make_graph([node], "g", in_info, [helper.make_value_info("y", onnx.TypeProto())])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    feeds = {n: v for n, v in zip(names, inputs, strict=False) if v is not None}
    return model.SerializeToString(), feeds


def run_attention(
    q, k, v, *, act_bits, block_size, scale, mask=None, causal=False, q_heads=None, kv_heads=None
) -> np.ndarray:
    attrs: dict[str, Any] = {
        "act_bits": act_bits,
        "block_size": block_size,
        "scale": scale,
        "causal": int(causal),
    }
    if q_heads is not None:
        attrs["q_heads"] = q_heads
    if kv_heads is not None:
        attrs["kv_heads"] = kv_heads
    kv_inputs: list[np.ndarray | None] = []
    for x in (k, v):
        if x is None:  # a part of Q's tensor (kv_heads)
            kv_inputs += [None, None, None]
        elif isinstance(x, QuantizedTensor):
            kv_inputs += [x.codes, x.scales, x.zero_points]
            attrs.update(
                kv_bits=x.fmt.bits, kv_block_size=x.fmt.block_size, kv_symmetric=int(x.fmt.symmetric)
            )
        else:
            kv_inputs += [x, None, None]
    model, feeds = attention_model([q, *kv_inputs, mask], **attrs)
    return run(model, feeds)[0]


def sample(shape: tuple[int, ...], seed: int, spread: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * spread).astype(np.float32)


def padding_mask(batch: int, sk: int, seed: int) -> np.ndarray:
    """BERT's additive key-padding mask [B, 1, 1, Sk]: the last keys of some rows at float32's min."""
    lengths = np.random.default_rng(seed).integers(sk // 2, sk + 1, batch)
    keep = np.arange(sk)[None, :] < lengths[:, None]
    return np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]


# (name, B, Hq, Hkv, Sq, Sk, Dh, act_bits, block_size, mask kind, causal)
CASES = [
    ("encoder_padded", 2, 4, 4, 20, 20, 32, 8, 32, "padding", False),
    ("encoder_block16", 2, 3, 3, 9, 9, 64, 8, 16, "padding", False),
    ("decode_gqa", 1, 9, 3, 1, 129, 64, 8, 32, None, True),
    ("prefill_gqa_causal", 1, 6, 2, 70, 70, 64, 8, 32, None, True),
    ("chunk_causal_full_mask", 2, 2, 1, 5, 77, 24, 6, 32, "full", True),
    ("bits4_partial_block", 1, 2, 2, 7, 130, 40, 4, 32, "rows", False),
    # the AVX-512 rows: head sizes of 5 and 8 vectors, runs not a multiple of the row group, a mask
    # broadcast over keys (key stride 0), causal rows of one group that see different key counts
    ("encoder_dh80_rows67", 2, 3, 3, 67, 67, 80, 8, 16, "padding", False),
    ("prefill_dh128_causal", 1, 4, 2, 37, 37, 128, 8, 32, None, True),
    ("dh48_mask_per_query", 2, 2, 2, 13, 150, 48, 8, 32, "per_query", False),
]


def case_inputs(case: tuple[Any, ...], seed: int = 0) -> dict[str, Any]:
    _, b, hq, hkv, sq, sk, dh, act_bits, bs, mask_kind, causal = case
    q = sample((b, hq, sq, dh), seed, 1.5)
    k = sample((b, hkv, sk, dh), seed + 1, 1.5)
    v = sample((b, hkv, sk, dh), seed + 2)
    mask = None
    if mask_kind == "padding":
        mask = padding_mask(b, sk, seed + 3)
    elif mask_kind == "full":
        mask = sample((b, hq, sq, sk), seed + 4)
    elif mask_kind == "rows":
        mask = sample((sq, sk), seed + 5)
    elif mask_kind == "per_query":
        mask = sample((b, 1, sq, 1), seed + 6)
    return dict(
        q=q, k=k, v=v, mask=mask, causal=causal, act_bits=act_bits, block_size=bs, scale=float(dh) ** -0.5
    )


def case_id(case: tuple[Any, ...]) -> str:
    return case[0]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_isa_path_gives_the_spec_bits(case: tuple[Any, ...], isa: str, force_isa: Any) -> None:
    force_isa(isa)
    args = case_inputs(case)
    assert_bits_equal(run_attention(**args), ref.attention(**args), "Y")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_spec_is_softmax_of_the_quantized_scores_times_v(case: tuple[Any, ...]) -> None:
    args = case_inputs(case, seed=10)
    y = ref.attention(**args)
    s = (
        ref.scores(args["q"], args["k"], args["act_bits"], args["block_size"]).astype(np.float64)
        * args["scale"]
    )
    if args["mask"] is not None:
        s = s + args["mask"]
    if args["causal"]:
        sq, sk = s.shape[-2:]
        s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    v = np.repeat(args["v"], args["q"].shape[1] // args["v"].shape[1], axis=1).astype(np.float64)
    exact = p @ v
    assert np.max(np.abs(y - exact)) <= 3e-6 * np.max(np.abs(v))


@pytest.mark.parametrize("case", [c for c in CASES if not c[-1]], ids=case_id)
def test_spec_against_the_unfused_chain(case: tuple[Any, ...]) -> None:
    args = case_inputs(case, seed=20)
    args.pop("causal")
    y = ref.attention(**args)
    chain = ref.unfused_chain(**args)
    tol = ref.chain_tolerance(**args)
    err = np.abs(y.astype(np.float64) - chain)
    assert np.all(err <= tol), float(np.max(err - tol))
    assert np.max(err) > 0  # the chain quantizes P and V: the bound is not vacuous


KV_FORMATS = [
    BlockFormat(8, 32, True, ScaleKind.FLOAT16),  # the run-time block format: K codes used as they are
    BlockFormat(8, 32, True, ScaleKind.POW2),
    BlockFormat(4, 16, False, ScaleKind.FLOAT16),  # another format: dequantized, then quantized again
    BlockFormat(8, 64, True, ScaleKind.FLOAT32),
]


@pytest.mark.parametrize("isa", ["scalar", "avx512vnni"])
@pytest.mark.parametrize(
    "fmt",
    KV_FORMATS,
    ids=lambda f: f"b{f.bits}_bs{f.block_size}_{'s' if f.symmetric else 'a'}_{f.scale_kind.value}",
)
def test_kv_cache_codes(fmt: BlockFormat, isa: str, force_isa: Any) -> None:
    """K and V as blockwise codes along the head size (a compressed KV cache), decode and GQA."""
    force_isa(isa)
    args = case_inputs(CASES[2], seed=30)
    args["k"] = bf.quantize(args["k"], fmt)
    args["v"] = bf.quantize(args["v"], fmt)
    y = run_attention(**args)
    assert_bits_equal(y, ref.attention(**args), "Y")
    float_kv = dict(args, k=bf.dequantize(args["k"]), v=bf.dequantize(args["v"]))
    if fmt.symmetric and fmt.block_size == args["block_size"]:
        # Codes used as they are against their float value quantized again (float16 scales give the
        # same codes, pow2 scales others): two 8-bit roundings of one K, within 2% of max|V|.
        np.testing.assert_allclose(
            y, ref.attention(**float_kv), rtol=0, atol=0.02 * np.max(np.abs(float_kv["v"]))
        )
    else:
        assert_bits_equal(y, ref.attention(**float_kv), "Y vs float K, V")


def test_row_with_no_live_key_is_zero_and_nan_stays_in_its_row() -> None:
    args = case_inputs(CASES[0], seed=40)
    mask = np.zeros((2, 1, 20, 20), np.float32)
    mask[0, 0, 3, :] = -np.inf  # query 3 of batch 0 sees nothing
    q = args["q"].copy()
    q[1, 2, 5, 0] = np.nan  # one block of one query row
    args.update(mask=mask, q=q)
    y = run_attention(**args)
    assert_bits_equal(y, ref.attention(**args), "Y")
    assert np.all(y[0, :, 3] == 0)
    assert np.all(np.isnan(y[1, 2, 5]))
    assert np.isfinite(np.delete(y.reshape(-1, 32), [1 * 80 + 2 * 20 + 5], axis=0)).all()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
def test_extreme_scores_give_the_spec_bits_on_every_isa_path(isa: str, force_isa: Any) -> None:
    """Masks of +-inf and float32's extremes over several key tiles: rows that see nothing in a tile,
    a max that rises in the third tile, a +inf score (inf - inf: a NaN row), a NaN mask entry."""
    force_isa(isa)
    args = case_inputs(("extreme", 2, 3, 3, 9, 150, 64, 8, 32, None, False), seed=70)
    mask = np.zeros((2, 3, 9, 150), np.float32)
    big = np.finfo(np.float32).max
    mask[0, 0, 0, :70] = -np.inf  # the first tile (and part of the second) sees nothing
    mask[0, 1, 1, 130:] = 50.0  # the max rises in the last tile: l and y rescaled
    mask[0, 2, 2, 5] = np.inf  # +inf score: s - m = inf - inf
    mask[1, 0, 3, 100] = np.nan  # a NaN mask entry poisons its row
    mask[1, 1, 4, :] = -big  # every score near float32's lowest
    mask[1, 2, 5, 64:] = -np.inf  # only the first tile is live
    args.update(mask=mask)
    y = run_attention(**args)
    assert_bits_equal(y, ref.attention(**args), "Y")
    assert np.isnan(y[0, 2, 2]).all() and np.isnan(y[1, 0, 3]).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(k=np.zeros((2, 3, 20, 32), np.float32), v=np.zeros((2, 3, 20, 32), np.float32)),
            "multiple of K's heads 3",
        ),
        (dict(mask=np.zeros((2, 1, 3, 20), np.float32)), "input 'mask' [2, 1, 3, 20] does not broadcast"),
        (dict(v=np.zeros((2, 4, 21, 32), np.float32)), "must have the same shape"),
        (dict(k=np.zeros((2, 4, 20, 16), np.float32)), "input 'K' last dim must be Q's head size 32"),
    ],
)
def test_bad_inputs_name_the_input(change: dict[str, Any], message: str) -> None:
    args = case_inputs(CASES[0])
    args.update(change)
    with pytest.raises(Exception, match="bct_onnx BlockAttention node 'attn': .*") as info:
        run_attention(**args)
    assert message in str(info.value)


def packed(x: np.ndarray) -> np.ndarray:
    """[B, H, S, Dh] -> [B, S, H * Dh] (an encoder's tensors before the head split)."""
    b, h, s, dh = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, s, h * dh))


def packed_case(case: tuple[Any, ...], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(heads-first args, the same in [B, S, H * Dh] with q_heads)."""
    args = case_inputs(case, seed)
    packed_args = dict(args, q=packed(args["q"]), k=packed(args["k"]), v=packed(args["v"]), q_heads=case[2])
    return args, packed_args


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_packed_layout_gives_the_spec_bits_on_every_isa_path(
    case: tuple[Any, ...], isa: str, force_isa: Any
) -> None:
    """Q, K, V [B, S, H * Dh] in, Y [B, S, H * Dh] out (an encoder's head split / merge in the op):
    the spec's bits, which are the heads-first op's bits in the packed layout."""
    force_isa(isa)
    args, packed_args = packed_case(case, seed=50)
    y = run_attention(**packed_args)
    want = ref.attention(**packed_args)
    assert y.shape == packed_args["q"].shape
    assert_bits_equal(y, want, "Y")
    assert_bits_equal(want, packed(ref.attention(**args)), "spec packed vs heads first")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=np.zeros((2, 20, 4, 32), np.float32)), "input 'K' must be [B 2, S, H * Dh] with Dh 32"),
        (dict(v=np.zeros((2, 20, 100), np.float32)), "input 'V' must be [B 2, S, H * Dh] with Dh 32"),
        (dict(q_heads=3), "needs attribute 'q_heads' dividing its last dim, got 3"),
        (dict(q_heads=None), "needs attribute 'q_heads' dividing its last dim, got 0"),
    ],
)
def test_packed_layout_bad_inputs_name_the_input(change: dict[str, Any], message: str) -> None:
    _, args = packed_case(CASES[0], seed=0)
    args.update(change)
    with pytest.raises(Exception, match="bct_onnx BlockAttention node 'attn': .*") as info:
        run_attention(**args)
    assert message in str(info.value)


# Q, K, V of one length (an encoder's self-attention): the cases one projection can give.
SELF_CASES = [case for case in CASES if case[4] == case[5]]


def projection_case(case: tuple[Any, ...], seed: int, with_v: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(packed args, the same with K, and V when with_v, as heads of Q's tensor: attribute kv_heads)."""
    _, args = packed_case(case, seed)
    parts = [args["q"], args["k"]] + ([args["v"]] if with_v else [])
    one = dict(args, q=np.concatenate(parts, axis=-1), k=None, kv_heads=case[3])
    if with_v:
        one["v"] = None
    return args, one


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("with_v", [True, False], ids=["qkv", "qk"])
@pytest.mark.parametrize("case", SELF_CASES, ids=case_id)
def test_one_projection_gives_the_separate_tensors_bits_on_every_isa_path(
    case: tuple[Any, ...], with_v: bool, isa: str, force_isa: Any
) -> None:
    """Q and K (and V) as parts of one [B, S, (Hq + Hkv [+ Hkv]) * Dh] tensor (the packed projection
    PackSharedInputMatMulsPass makes), read in place: the bits of the op given them apart."""
    force_isa(isa)
    args, one = projection_case(case, seed=60, with_v=with_v)
    y = run_attention(**one)
    want = ref.attention(**args)
    assert y.shape == args["q"].shape
    assert_bits_equal(y, want, "Y")
    assert_bits_equal(ref.attention(**one), want, "spec one projection vs apart")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(kv_heads=5),
            "holding Q and K (K absent) needs a last dim divisible by 9 heads (q_heads 4, kv_heads 5)",
        ),
        (dict(kv_heads=None), "input 'K' is required"),
    ],
)
def test_one_projection_bad_inputs_name_the_input(change: dict[str, Any], message: str) -> None:
    _, one = projection_case(CASES[0], seed=0, with_v=False)
    one.update(change)
    with pytest.raises(Exception, match="bct_onnx BlockAttention node 'attn': .*") as info:
        run_attention(**one)
    assert message in str(info.value)


def test_packed_layout_needs_float_k_and_v() -> None:
    _, args = packed_case(CASES[0], seed=0)
    fmt = BlockFormat(8, 32, True, ScaleKind.FLOAT16)
    codes = bf.quantize(args["k"].reshape(2, 20, 4, 32), fmt)
    model, feeds = attention_model(
        [args["q"], codes.codes.reshape(2, 20, -1), codes.scales.reshape(2, 20, -1), None, args["v"]],
        act_bits=8,
        block_size=32,
        q_heads=4,
        kv_bits=8,
        kv_block_size=32,
    )
    with pytest.raises(Exception, match="must be float32: kv_bits must be 0"):
        run(model, feeds)


def test_causal_needs_sq_at_most_sk() -> None:
    args = case_inputs(CASES[0])
    args.update(k=args["k"][:, :, :5], v=args["v"][:, :, :5], mask=None, causal=True)
    with pytest.raises(Exception, match="causal=1 needs Sq <= Sk"):
        run_attention(**args)
