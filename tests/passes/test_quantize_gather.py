"""QuantizeGatherPass: embedding lookups become BlockGather; shape gathers are left alone silently."""

from __future__ import annotations

import numpy as np
import pytest
from bct_onnx.passes import QuantizeGatherPass
from support import model_from_text, op_types, run_bct_session, run_reference

from bct_onnx.block_format import dequantize
from bct_onnx.config import CompressConfig
from bct_onnx.ops import DOMAIN
from bct_onnx.weight_quantizer import quantize_tensor

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(99)
EMBEDDING = f"""{HEADER}
g (int64[B, S] ids) => (float[B, S, 40] Y) {{
  Y = Gather <axis = 0> (E, ids)
}}"""


def table(v: int = 50, d: int = 40) -> np.ndarray:
    return RNG.standard_normal((v, d)).astype(np.float32)


@pytest.mark.parametrize("embedding_bits", [None, 8, 3])
def test_embedding_lookup_becomes_block_gather(embedding_bits):
    e = table()
    model = model_from_text(EMBEDDING, {"E": e})
    config = CompressConfig(weight_bits=4, embedding_bits=embedding_bits, symmetric=embedding_bits != 3)
    result = QuantizeGatherPass(config)(model)
    assert result.modified
    assert op_types(result.model) == ["BlockGather"]
    assert result.rewritten == {"Gather": 1}
    assert result.skipped == []
    node = next(iter(result.model.graph))
    assert node.domain == DOMAIN
    bits = embedding_bits or 4
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    assert attrs == {"bits": bits, "block_size": 32, "symmetric": int(embedding_bits != 3), "axis_size": 40}
    assert node.inputs[0].name == "ids"
    assert node.inputs[1].const_value.shape == (50, -(-40 * bits // 8))
    assert len(node.inputs) == (3 if embedding_bits != 3 else 4)
    # Numerics: rows of the dequantized table, bit-exact, including negative indices.
    ids = np.array([[0, 49, -1, 7], [3, -50, 2, 2]], dtype=np.int64)
    (y,) = run_reference(result.model, {"ids": ids})
    expected = dequantize(quantize_tensor(e, config.embedding_format))[ids]
    np.testing.assert_array_equal(y, expected)
    assert np.abs(y - e[ids]).max() < np.abs(e).max() * (0.3 if bits < 4 else 0.15)


def test_ort_session_matches_reference():
    model = model_from_text(EMBEDDING, {"E": table()})
    compressed = QuantizeGatherPass(CompressConfig())(model).model
    ids = np.array([[0, 49, -1, 7]], dtype=np.int64)
    (y_ref,) = run_reference(compressed, {"ids": ids})
    (y_ort,) = run_bct_session(compressed, {"ids": ids})
    np.testing.assert_array_equal(y_ort, y_ref)  # dequantized rows: a function of rounding alone


def test_shape_gathers_are_left_alone_without_a_report():
    text = f"""{HEADER}
    g (float[B, S, 8] x) => (int64 n, int64[2] m) {{
      s = Shape(x)
      n = Gather <axis = 0> (s, one)
      m = Gather <axis = 0> (dims, pick)
    }}"""
    inits = {
        "one": np.array(1, np.int64),
        "dims": np.array([4, 5, 6], np.int64),
        "pick": np.array([0, 2], np.int64),
    }
    model = model_from_text(text, inits)
    result = QuantizeGatherPass(CompressConfig())(model)
    assert not result.modified
    assert op_types(result.model) == ["Shape", "Gather", "Gather"]
    assert result.skipped == []


@pytest.mark.parametrize(
    "text,inits,reason",
    [
        (
            "g (int64[4] ids) => (float[50, 4] Y) { Y = Gather <axis = 1> (E, ids) }",
            {"E": table()},
            "Gather on axis 1; only axis 0 (row lookup) is compressed",
        ),
        (
            "g (int64[4] ids, float[50, 40] E) => (float[4, 40] Y) { Y = Gather (E, ids) }",
            {},
            "table 'E' is a graph input, not a constant",
        ),
        (
            "g (int64[4] ids, float[50, 40] x) => (float[4, 40] Y) { t = Relu(x) \n Y = Gather (t, ids) }",
            {},
            "table (input 0) is computed at run time, not a constant initializer",
        ),
        (
            "g (int64[4] ids) => (float[4, 2, 40] Y) { Y = Gather (E, ids) }",
            {"E": np.ones((50, 2, 40), np.float32)},
            "table has rank 3; only 2-D [V, D] tables are compressed",
        ),
        (
            "g (int64[4] ids) => (float16[4, 40] Y) { Y = Gather (E, ids) }",
            {"E": np.ones((50, 40), np.float16)},
            "table dtype FLOAT16 is not FLOAT (float32)",
        ),
    ],
    ids=["axis1", "graph-input", "computed", "rank3", "float16"],
)
def test_near_misses_are_skipped_with_reason(text, inits, reason):
    model = model_from_text(f"{HEADER}\n{text}", inits)
    before = op_types(model)
    result = QuantizeGatherPass(CompressConfig())(model)
    assert not result.modified
    assert op_types(result.model) == before
    assert [(s.op_type, s.reason) for s in result.skipped] == [("Gather", reason)]


def test_second_run_does_not_modify():
    model = model_from_text(EMBEDDING, {"E": table()})
    first = QuantizeGatherPass(CompressConfig())(model)
    second = QuantizeGatherPass(CompressConfig())(first.model)
    assert first.modified and not second.modified
    assert second.rewritten == {} and second.skipped == []


@pytest.mark.parametrize("scale_kind", ["float16", "pow2", "float32"])
def test_float_offsets_table(scale_kind):
    """zero_points="float": the table stores float offsets (float32 with float32 scales), ORT = spec bit for bit."""
    e = np.abs(table(50, 45)) + 1.0  # one-signed rows, D = 45: a partial last block
    model = model_from_text(EMBEDDING.replace("40", "45"), {"E": e})
    config = CompressConfig(symmetric=False, zero_points="float", scale_kind=scale_kind, embedding_scale_kind=None)
    compressed = QuantizeGatherPass(config)(model).model
    node = next(iter(compressed.graph))
    offsets = node.inputs[3].const_value.numpy()
    assert offsets.dtype == (np.float32 if scale_kind == "float32" else np.float16) and offsets.shape == (
        50,
        2,
    )
    assert ".bct_q4b32f_" in node.inputs[1].name  # the tag tells float offsets from integer zero points
    ids = np.array([[0, 49, -1, 7]], dtype=np.int64)
    (y_ref,) = run_reference(compressed, {"ids": ids})
    np.testing.assert_array_equal(y_ref, dequantize(quantize_tensor(e, config.embedding_format))[ids])
    (y_ort,) = run_bct_session(compressed, {"ids": ids})
    np.testing.assert_array_equal(y_ort, y_ref)
    integer = QuantizeGatherPass(CompressConfig(symmetric=False, scale_kind=scale_kind, embedding_scale_kind=None))(
        model_from_text(EMBEDDING.replace("40", "45"), {"E": e})
    ).model
    every = np.arange(50, dtype=np.int64)[None]
    (y_int,) = run_reference(integer, {"ids": every})
    (y_all,) = run_reference(compressed, {"ids": every})
    assert (
        np.abs(y_all - e[every]).mean() < 0.85 * np.abs(y_int - e[every]).mean()
    )  # range [1, 4], not [0, 4]
