"""BlockMatMul's ``epilogue`` (GELU, SiLU gating) on every CPU path against the spec
(bct_onnx.reference_fused): the fused node's output equals, bit for bit, the spec's epilogue and
requantization applied to the product the unfused node computes from the same inputs, and a
silu_gate node over concatenated gate/up weights equals the unfused gate and up nodes."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import assert_bits_equal, covering_pairs

import bct_onnx
from bct_onnx import reference_nonlinear as nl
from bct_onnx.block_format import BlockFormat, ScaleKind, pack_codes, quantize
from bct_onnx.ops import BLOCK_MATMUL, DOMAIN
from bct_onnx.reference_fused import block_matmul_epilogue, concat_gate_up, matmul_epilogue

ISAS = ("scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx", "amx-emulated")
OUT_FORMATS = {
    "float": None,
    "own": BlockFormat(8, 32, True, ScaleKind.FLOAT32),
    "asym16": BlockFormat(8, 16, False, ScaleKind.FLOAT16),
    "pow2": BlockFormat(4, 32, True, ScaleKind.POW2),
}
SCALE_KIND_NAME = {ScaleKind.FLOAT32: "float32", ScaleKind.FLOAT16: "float16", ScaleKind.POW2: "pow2"}


def _weight(rng: np.random.Generator, n: int, k: int, bits: int = 4, block_size: int = 32):
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    scales = (rng.standard_normal((n, -(-k // block_size))) * 0.05).astype(np.float16)
    return pack_codes(codes, bits), scales


def _node(
    name: str, a: str, w: str, n: int, k: int, act_bits: int, outputs: list[str], bias: str = "", **attrs: Any
):
    return helper.make_node(
        BLOCK_MATMUL, [a, f"{w}_codes", f"{w}_scales", "", bias], outputs, domain=DOMAIN, name=name,
        K=k, N=n, bits=4, block_size=32, symmetric=1, act_bits=act_bits, **attrs,
    )  # fmt: skip


def _out_attrs(fmt: BlockFormat | None) -> dict[str, Any]:
    if fmt is None:
        return {}
    return {
        "out_bits": fmt.bits,
        "out_block_size": fmt.block_size,
        "out_symmetric": int(fmt.symmetric),
        "out_scale_kind": SCALE_KIND_NAME[fmt.scale_kind],
    }


def _session(nodes, outputs: list[str], initializers: dict[str, np.ndarray]):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)],
        [helper.make_value_info(name, helper.TypeProto()) for name in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return bct_onnx.session(model.SerializeToString())


# Every pair of (epilogue, output format, act_bits), on every path (was the full product).
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "epilogue,out,act_bits", covering_pairs(["gelu", "gelu_tanh", "silu_gate"], sorted(OUT_FORMATS), [0, 8]), ids=str
)
def test_epilogue_is_the_spec_applied_to_the_unfused_product(
    isa: str, epilogue: str, out: str, act_bits: int, force_isa: Any
) -> None:
    force_isa(isa)
    rng = np.random.default_rng(7)
    k, n = 96, 80  # N / 2 = 40: a partial output block with block 16 / 32
    w_codes, w_scales = _weight(rng, n, k)
    bias = (rng.standard_normal(n) * 0.5).astype(np.float32)
    fmt = OUT_FORMATS[out]
    outputs = (
        ["P", "Y"] + (["Y_scales"] if fmt else []) + (["Y_zero_points"] if fmt and not fmt.symmetric else [])
    )
    nodes = [
        _node("unfused", "A", "W", n, k, act_bits, ["P"], bias="bias"),
        _node(
            "fused", "A", "W", n, k, act_bits, outputs[1:], bias="bias", epilogue=epilogue, **_out_attrs(fmt)
        ),
    ]
    sess = _session(nodes, outputs, {"W_codes": w_codes, "W_scales": w_scales, "bias": bias})
    a = (rng.standard_normal((2, 5, k)) * 2).astype(np.float32)
    p, *fused = sess.run(None, {"A": a})
    width = n // 2 if epilogue == "silu_gate" else n
    assert p.shape == (2, 5, n)
    want = nl.store_result(matmul_epilogue(p, epilogue), fmt)
    if fmt is None:
        assert fused[0].shape == (2, 5, width)
        assert_bits_equal(fused[0], want, "Y")
    else:
        assert_bits_equal(fused[0], want.codes, "codes")  # each output on its own
        assert_bits_equal(fused[1], want.scales, "scales")
        if not fmt.symmetric:
            assert_bits_equal(fused[2], want.zero_points, "zero points")
    # And the spec's own product (float64 reference rounded once) is close to the kernel's.
    spec = block_matmul_epilogue(
        a, w_codes, w_scales, None, epilogue=epilogue, k=k, bits=4, block_size=32, symmetric=True,
        act_bits=act_bits, bias=bias,
    )  # fmt: skip
    if fmt is None:
        np.testing.assert_allclose(fused[0], spec, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act_bits", [0, 8])
def test_silu_gate_over_concatenated_weights_equals_the_unfused_chain(
    isa: str, act_bits: int, force_isa: Any
) -> None:
    """Gate and up BlockMatMuls + SiLU + Mul (the graph before FuseMatMulEpiloguePass) against one node."""
    force_isa(isa)
    rng = np.random.default_rng(11)
    k, half = 64, 48
    gate, up = _weight(rng, half, k), _weight(rng, half, k)
    codes, scales, _ = concat_gate_up((*gate, None), (*up, None))
    inits = {"G_codes": gate[0], "G_scales": gate[1], "U_codes": up[0], "U_scales": up[1], "W_codes": codes,
             "W_scales": scales}  # fmt: skip
    nodes = [
        _node("gate", "A", "G", half, k, act_bits, ["g"]),
        _node("up", "A", "U", half, k, act_bits, ["u"]),
        _node("fused", "A", "W", 2 * half, k, act_bits, ["Y"], epilogue="silu_gate"),
    ]
    sess = _session(nodes, ["g", "u", "Y"], inits)
    a = rng.standard_normal((7, k)).astype(np.float32) * 3
    g, u, y = sess.run(None, {"A": a})
    assert_bits_equal(y, (nl.silu(g) * u).astype(np.float32), "Y")


def test_epilogue_reads_quantized_operand_and_reports_bad_attributes() -> None:
    rng = np.random.default_rng(3)
    k, n = 32, 6
    w_codes, w_scales = _weight(rng, n, k)
    inits = {"W_codes": w_codes, "W_scales": w_scales}
    with pytest.raises(
        Exception,
        match=re.escape("bct_onnx BlockMatMul node 'odd': attribute 'epilogue' silu_gate needs an even N"),
    ):
        bad = _weight(rng, 5, k)
        _session([_node("odd", "A", "W", 5, k, 0, ["Y"], epilogue="silu_gate")], ["Y"],
                 {"W_codes": bad[0], "W_scales": bad[1]}).run(None, {"A": np.zeros((1, k), np.float32)})  # fmt: skip
    with pytest.raises(
        Exception,
        match=re.escape(
            "attribute 'epilogue' must be 'none', 'gelu', 'gelu_tanh' or 'silu_gate', got 'relu'"
        ),
    ):
        _session([_node("bad", "A", "W", n, k, 0, ["Y"], epilogue="relu")], ["Y"], inits).run(
            None, {"A": np.zeros((1, k), np.float32)}
        )
    # A given as codes of another format: dequantized first, then the same product and epilogue.
    fmt = BlockFormat(8, 16, False, ScaleKind.FLOAT16)
    a = rng.standard_normal((3, k)).astype(np.float32)
    qa = quantize(a, fmt)
    node = helper.make_node(
        BLOCK_MATMUL, ["A", "W_codes", "W_scales", "", "", "A_scales", "A_zero_points"], ["Y"], domain=DOMAIN,
        name="q", K=k, N=n, bits=4, block_size=32, symmetric=1, act_bits=8, epilogue="gelu", in_bits=8,
        in_block_size=16, in_symmetric=0,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(name, t, None) for name, t in
         (("A", TensorProto.UINT8), ("A_scales", TensorProto.FLOAT16), ("A_zero_points", TensorProto.UINT8))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, key) for key, v in inits.items()],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    y = bct_onnx.session(model.SerializeToString()).run(
        None, {"A": qa.codes, "A_scales": qa.scales, "A_zero_points": qa.zero_points}
    )[0]
    spec = block_matmul_epilogue(qa, w_codes, w_scales, None, epilogue="gelu", k=k, bits=4, block_size=32,
                                 symmetric=True, act_bits=8)  # fmt: skip
    np.testing.assert_allclose(y, spec, rtol=1e-5, atol=1e-5)


# Every pair of (epilogue, output format, rows), on every path (was the full product: 18).
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "epilogue,out,rows", covering_pairs(["none", "gelu", "silu_gate"], ["own", "asym16", "pow2"], [40, 69]), ids=str
)
def test_prefill_rows_requantized_in_chunks_equal_the_requantized_product(
    isa: str, epilogue: str, out: str, rows: int, force_isa: Any
) -> None:
    """Prefill with quantized Y (integer mode): rows of the product go from the kernel to the epilogue
    and the requantization in chunks of rows (69: a partial last chunk), never through a full product
    buffer. Bit for bit the spec applied to the float product of an unfused node, with A given as float
    and as codes of the kernel's own format, and one row whose partial sums overflow float32 (recomputed
    inside its chunk)."""
    force_isa(isa)
    rng = np.random.default_rng(rows)
    k, n = 96, 80
    w_codes, w_scales = _weight(rng, n, k)
    bias = (rng.standard_normal(n) * 0.5).astype(np.float32)
    fmt = OUT_FORMATS[out]
    own = BlockFormat(8, 32, True, ScaleKind.FLOAT32)
    outputs = ["Y", "Y_scales"] + ([] if fmt.symmetric else ["Y_zero_points"])
    extra = {} if epilogue == "none" else {"epilogue": epilogue}
    in_attrs = {"in_bits": 8, "in_block_size": 32, "in_symmetric": 1}
    nodes = [
        _node("unfused", "A", "W", n, k, 8, ["P"], bias="bias"),
        _node("fused", "A", "W", n, k, 8, outputs, bias="bias", **extra, **_out_attrs(fmt)),
        helper.make_node(
            BLOCK_MATMUL, ["Aq", "W_codes", "W_scales", "", "bias", "Aq_scales"], [f"q{o}" for o in outputs],
            domain=DOMAIN, name="fused_codes", K=k, N=n, bits=4, block_size=32, symmetric=1, act_bits=8,
            **extra, **_out_attrs(fmt), **in_attrs,
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("A", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("Aq", TensorProto.UINT8, None),
            helper.make_tensor_value_info("Aq_scales", TensorProto.FLOAT, None),
        ],
        [
            helper.make_value_info(name, helper.TypeProto())
            for name in ["P", *outputs, *(f"q{o}" for o in outputs)]
        ],
        initializer=[
            numpy_helper.from_array(w_codes, "W_codes"),
            numpy_helper.from_array(w_scales, "W_scales"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    sess = bct_onnx.session(model.SerializeToString())
    a = (rng.standard_normal((rows, k)) * 2).astype(np.float32)
    a[rows - 3] *= np.float32(2.0**121)  # |Y| ~1e36 but the unscaled integer-dot sums overflow
    aq = quantize(a, own)
    p, *results = sess.run(None, {"A": a, "Aq": aq.codes, "Aq_scales": aq.scales})
    assert np.isfinite(p).all()
    want = nl.store_result(p if epilogue == "none" else matmul_epilogue(p, epilogue), fmt)
    half = len(outputs)
    for label, got in (("float A", results[:half]), ("codes A", results[half:])):
        assert_bits_equal(got[0], want.codes, f"{label}: codes")  # each output on its own
        assert_bits_equal(got[1], want.scales, f"{label}: scales")
        if not fmt.symmetric:
            assert_bits_equal(got[2], want.zero_points, f"{label}: zero points")
