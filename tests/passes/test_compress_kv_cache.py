"""CompressKVCachePass: a decoder's cache crosses steps as codes + float16 scales (docs/kv_cache.md).

A small with-past graph checks the rewrite bit for bit against the numpy spec (block_format): the
step's new rows are BlockQuantize'd and appended, old rows pass through untouched, attention reads
their BlockDequantize. Tiny Llama and GPT-2 exports check the whole path: compress, decode through the
compressed cache (GreedyDecoder, the KV-cache perplexity path), and the cache's bytes per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bct_onnx.models.families import export_tiny
from bct_onnx.models.perplexity import onnx_cached_logits_fn, onnx_logits_fn
from bct_onnx.passes import CompressKVCachePass, compress_model
from onnx import TensorProto, helper

from bct_onnx import block_format, kv_cache
from bct_onnx.config import CompressConfig
from bct_onnx.evaluate import GreedyDecoder
from bct_onnx.runtime import session

HEADS, HEAD_DIM = 2, 24  # 24: a partial last block with block size 16
PAST, KEY, PRESENT = "past_key_values.0.key", "new_key", "present.0.key"


def cache_graph(axis: int = -2, extra_reader: str | None = None, present_is_output: bool = True) -> ir.Model:
    """present = Concat(past, new_key, axis); y = present * 2; plus a read of the past's length."""
    past = helper.make_tensor_value_info(PAST, TensorProto.FLOAT, ["batch", HEADS, "past", HEAD_DIM])
    new = helper.make_tensor_value_info(KEY, TensorProto.FLOAT, ["batch", HEADS, "seq", HEAD_DIM])
    nodes = [
        helper.make_node("Concat", [PAST, KEY], [PRESENT], axis=axis, name="cat"),
        helper.make_node("Mul", [PRESENT, "two"], ["y"], name="attend"),
        helper.make_node("Shape", [PAST], ["past_len"], start=2, end=3, name="past_len"),
    ]
    total = ["batch", HEADS, "total", HEAD_DIM]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, total),
        helper.make_tensor_value_info("past_len", TensorProto.INT64, [1]),
    ]
    if present_is_output:
        outputs.append(helper.make_tensor_value_info(PRESENT, TensorProto.FLOAT, total))
    if extra_reader == "Shape":
        nodes.append(helper.make_node("Shape", [PAST], ["full_shape"], name="full_shape"))
        outputs.append(helper.make_tensor_value_info("full_shape", TensorProto.INT64, [4]))
    elif extra_reader == "Add":
        nodes.append(helper.make_node("Add", [PAST, PAST], ["doubled"], name="doubled"))
        outputs.append(
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", HEADS, "past", HEAD_DIM])
        )
    graph = helper.make_graph(
        nodes, "g", [past, new], outputs, [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def run_compressed(model: ir.Model, tmp_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    path = tmp_path / "kv.onnx"
    ir.save(model, path)
    sess = session(str(path))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


@pytest.mark.parametrize("bits", [8, 4])
def test_cache_is_appended_as_codes_bit_exactly(bits: int, tmp_path: Path) -> None:
    model = cache_graph()
    result = CompressKVCachePass(CompressConfig(kv_cache_bits=bits, kv_cache_block_size=16))(model)
    assert result.modified and result.rewritten == {"KV cache input": 1}
    assert [n.op_type for n in model.graph] == [
        "BlockQuantize",
        "Concat",
        "Concat",
        "BlockDequantize",
        "Mul",
        "Shape",
    ]
    fmt = kv_cache.KVCacheFormat(bits, 16, HEAD_DIM)
    assert kv_cache.read_formats(model.metadata_props) == {PAST: fmt}
    inputs = {v.name: v for v in model.graph.inputs}
    assert inputs[f"{PAST}.codes"].dtype == ir.DataType.UINT8
    assert list(inputs[f"{PAST}.codes"].shape) == ["batch", HEADS, "past", fmt.row_bytes]
    assert inputs[f"{PAST}.scales"].dtype == ir.DataType.FLOAT16
    assert list(inputs[f"{PAST}.scales"].shape) == ["batch", HEADS, "past", 2]
    assert [v.name for v in model.graph.outputs] == ["y", "past_len", f"{PRESENT}.codes", f"{PRESENT}.scales"]

    rng = np.random.default_rng(3)
    past = rng.standard_normal((1, HEADS, 5, HEAD_DIM)).astype(np.float32)
    new = rng.standard_normal((1, HEADS, 2, HEAD_DIM)).astype(np.float32)
    past_codes, past_scales = kv_cache.quantize_cache(past, fmt)
    got = run_compressed(
        model, tmp_path, {f"{PAST}.codes": past_codes, f"{PAST}.scales": past_scales, KEY: new}
    )
    new_codes, new_scales = kv_cache.quantize_cache(new, fmt)
    np.testing.assert_array_equal(got[f"{PRESENT}.codes"][:, :, :5], past_codes)  # old rows untouched
    np.testing.assert_array_equal(got[f"{PRESENT}.codes"][:, :, 5:], new_codes)
    np.testing.assert_array_equal(got[f"{PRESENT}.scales"][:, :, :5], past_scales)
    np.testing.assert_array_equal(got[f"{PRESENT}.scales"][:, :, 5:], new_scales)
    spec = block_format.fake_quantize(np.concatenate([past, new], axis=2), fmt.block_format)
    np.testing.assert_array_equal(got["y"], spec * np.float32(2))
    np.testing.assert_array_equal(got["past_len"], [5])

    # An empty cache (prefill): zero-length codes and scales.
    empty = {f"{PAST}.codes": past_codes[:, :, :0], f"{PAST}.scales": past_scales[:, :, :0], KEY: new}
    got = run_compressed(model, tmp_path, empty)
    np.testing.assert_array_equal(got[f"{PRESENT}.codes"], new_codes)
    np.testing.assert_array_equal(got["past_len"], [0])


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (cache_graph(axis=3), "is not a two-input Concat on axis 2"),
        (cache_graph(extra_reader="Add"), "read by Add 'doubled' (input 0), not only by the cache Concat"),
        (cache_graph(extra_reader="Shape"), "read by Shape 'full_shape'"),
        (cache_graph(present_is_output=False), "is not a graph output (present)"),
    ],
)
def test_cache_read_otherwise_stays_float_with_the_reason(model: ir.Model, reason: str) -> None:
    result = CompressKVCachePass(CompressConfig())(model)
    assert not result.modified and not result.rewritten
    (skip,) = result.skipped
    assert skip.node == PAST and skip.op_type == "KVCache" and reason in skip.reason, skip.reason


def test_float_cache_config_and_qdq_leave_the_cache_alone() -> None:
    assert not CompressKVCachePass(CompressConfig(kv_cache_bits=None))(cache_graph()).modified
    assert not CompressKVCachePass(CompressConfig(format="qdq"))(cache_graph()).modified
    with pytest.raises(ValueError, match="kv_cache_bits must be an integer in"):
        CompressConfig(kv_cache_bits=9)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_decoder_decodes_through_a_compressed_cache(family: str, tmp_path: Path) -> None:
    (past_path,) = export_tiny(family, tmp_path / "past", with_past=True)
    (plain_path,) = export_tiny(family, tmp_path / "plain", with_past=False)
    fp32 = ort.InferenceSession(str(past_path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 200, (1, 14)).astype(np.int64)
    # The perplexity path through the cache, one token per call, equals the no-cache path in FP32.
    no_cache = onnx_logits_fn(ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"]))(ids)
    np.testing.assert_allclose(onnx_cached_logits_fn(fp32, 1)(ids), no_cache, rtol=1e-4, atol=1e-4)

    logits = {}
    per_token = {None: kv_cache.bytes_per_token(fp32.get_inputs())}
    for bits in (None, 8, 4):
        result = compress_model(ir.load(past_path), CompressConfig(kv_cache_bits=bits, weight_bits=8))
        layers = sum(1 for v in fp32.get_inputs() if v.name.startswith(kv_cache.PAST_PREFIX))
        assert result.rewritten.get("KV cache input", 0) == (0 if bits is None else layers)
        # FuseAttentionPass made one BlockAttention per layer: it reads K and V codes, no BlockDequantize.
        assert result.rewritten.get("BlockAttention reads the cache codes", 0) == (
            0 if bits is None else layers // 2
        )
        assert not any(node.op_type == "BlockDequantize" for node in result.model.graph)
        out = tmp_path / f"kv{bits}.onnx"
        ir.save(result.model, out)
        sess = session(str(out))
        per_token[bits] = kv_cache.bytes_per_token(sess.get_inputs())
        logits[bits] = onnx_cached_logits_fn(sess, 1)(ids)
        assert onnx_cached_logits_fn(sess, 5)(ids).shape == logits[bits].shape  # chunks of 5 tokens
        decoder = GreedyDecoder(sess)
        assert decoder.uses_cache and len(decoder.generate(ids[0, :4], 6, eos=None)) == 6
    rows = per_token[None] // (4 * 16)  # layers x (K, V) x heads; tiny head_dim 16: one block of 32
    assert per_token[8] == rows * (16 + 2) and per_token[4] == rows * (8 + 2)
    # Against the same compressed weights with a float cache: the cache's own error only.
    assert _cosine(logits[8], logits[None]) > 0.999
    assert _cosine(logits[4], logits[None]) > 0.98


def test_onnx_checker_accepts_the_rewritten_graph() -> None:
    model = cache_graph()
    CompressKVCachePass(CompressConfig())(model)
    onnx.checker.check_model(ir.to_proto(model))
    outputs = {v.name: v for v in model.graph.outputs}
    assert list(outputs[f"{PRESENT}.codes"].shape) == ["batch", HEADS, "total", HEAD_DIM]  # 8-bit: 24 bytes
    assert list(outputs[f"{PRESENT}.scales"].shape) == ["batch", HEADS, "total", 1]


def test_output_directory_for_optimum_keeps_a_float_cache(tmp_path: Path) -> None:
    from bct_onnx.models.families import build_tiny

    import bct_onnx

    source = build_tiny("llama", tmp_path / "llama")
    to_dir = bct_onnx.compress(
        source, f"{tmp_path / 'dir'}/", task="text-generation-with-past", calibration="none"
    )
    assert any("the KV cache stays float" in warning for warning in to_dir.report.warnings)
    to_file = bct_onnx.compress(
        source, tmp_path / "file.onnx", task="text-generation-with-past", calibration="none"
    )
    assert not any("KV cache" in warning for warning in to_file.report.warnings)
    types = {
        name: {
            i.name: i.type for i in session(str(path)).get_inputs() if i.name.startswith(kv_cache.PAST_PREFIX)
        }
        for name, path in (("dir", tmp_path / "dir" / "model.onnx"), ("file", tmp_path / "file.onnx"))
    }
    assert set(types["dir"].values()) == {"tensor(float)"}
    assert set(types["file"].values()) == {"tensor(uint8)", "tensor(float16)"}
    assert len(types["file"]) == 2 * len(types["dir"])
