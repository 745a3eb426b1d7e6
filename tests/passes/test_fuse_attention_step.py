"""FuseAttentionStepPass: the cache append, rotary and head split / merge of each with-past decoder
layer go into its BlockAttention, with the same bits.

Tiny Llama (full rotary, grouped-query attention) and Pythia (GPT-NeoX: partial rotary, 25% of the
head) are compressed with the pass switched off, then the pass runs alone: every rule fires in every
layer, the glue nodes are gone, and the model gives the same logits and present caches, bit for bit,
on a decode step over a cache and on a prefill (tolerance 0: the op computes the replaced float32
operations and BlockQuantize's codes in the same order). A float cache fuses the append too.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.models.families import dummy_inputs, export_tiny
from bct_onnx.passes import FuseAttentionStepPass, compress_model
from bct_onnx.passes import fuse_attention_step as step

from bct_onnx import kv_cache, ops
from bct_onnx.config import CompressConfig
from bct_onnx.runtime import session


def _compressed_without_step(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **config
) -> tuple[ir.Model, Path]:
    fp32 = export_tiny(family, tmp_path / family, with_past=True)[0]
    with monkeypatch.context() as patch:
        patch.setattr(FuseAttentionStepPass, "run", lambda self, model, report: None)
        return compress_model(ir.load(fp32), CompressConfig(**config)).model, Path(fp32)


def _run(model: ir.Model, path: Path, fp32: Path, past: int, tokens: int) -> dict[str, np.ndarray]:
    ir.save(model, path)
    sess = session(str(path))
    feeds = kv_cache.compress_feeds(
        dummy_inputs(fp32, past_length=past, sequence_length=tokens), kv_cache.session_formats(sess)
    )
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


@pytest.mark.parametrize(
    ("family", "config", "rotary", "layout"),
    [
        ("llama", {}, True, True),
        ("pythia", {}, True, False),
        ("llama", {"kv_cache_bits": None}, True, True),
        ("opt", {}, False, True),
        ("gpt2", {}, False, False),
    ],
    ids=["llama", "pythia_partial_rotary", "llama_float_cache", "opt_no_rotary", "gpt2_append_only"],
)
def test_step_fuses_every_layer_with_the_same_bits(
    family, config, rotary, layout, tmp_path, monkeypatch
) -> None:
    before, fp32 = _compressed_without_step(family, tmp_path, monkeypatch, **config)
    after = ir.from_proto(ir.to_proto(before))
    result = FuseAttentionStepPass()(after)
    layers = sum(1 for n in before.graph if n.op_type == ops.BLOCK_ATTENTION)
    assert layers >= 2
    rules = {step.RULE_APPEND: layers}
    if rotary:
        rules[step.RULE_ROTARY] = layers
    if layout:
        rules[step.RULE_LAYOUT] = layers
    else:  # the head split or merge is not Reshape + Transpose (GPT-NeoX: Slices of one QKV tensor)
        assert len(result.skipped) == layers
        assert all("decoder step left partly outside BlockAttention" in s.reason for s in result.skipped)
    assert result.rewritten == rules
    assert result.modified
    ir.passes.common.RemoveUnusedNodesPass()(after)
    counts_before = Counter(n.op_type for n in before.graph)
    counts_after = Counter(n.op_type for n in after.graph)
    assert sum(counts_after.values()) <= sum(counts_before.values()) - 3 * layers
    assert counts_after["BlockQuantize"] == 0 and counts_after["Neg"] == 0
    for node in after.graph:
        if node.op_type == ops.BLOCK_ATTENTION:
            assert ("q_heads" in node.attributes) == layout
            assert len(node.inputs) >= 10 and node.inputs[8] is not None
            assert (len(node.inputs) == 12 and node.inputs[10] is not None) == rotary
    for past, tokens in ((6, 1), (0, 5)):
        want = _run(before, tmp_path / "before.onnx", fp32, past, tokens)
        got = _run(after, tmp_path / "after.onnx", fp32, past, tokens)
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(
                got[name], want[name], err_msg=f"{name} (past {past}, {tokens} tokens)"
            )


def test_a_cache_read_elsewhere_is_left_with_the_reason(tmp_path, monkeypatch) -> None:
    model, _ = _compressed_without_step("llama", tmp_path, monkeypatch)
    attention = next(n for n in model.graph if n.op_type == ops.BLOCK_ATTENTION)
    present = attention.inputs[1]
    extra = ir.node("Identity", [present], name="spy")
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    extra.outputs[0].name = "spy_out"
    result = FuseAttentionStepPass()(model)
    reasons = [s.reason for s in result.skipped]
    assert any("read by other nodes" in r for r in reasons), reasons


def test_the_pipeline_fuses_the_step(tmp_path) -> None:
    """compress_model runs the pass after CompressKVCachePass, dead GQA expansions notwithstanding."""
    fp32 = export_tiny("llama", tmp_path / "llama", with_past=True)[0]
    model = compress_model(ir.load(fp32), CompressConfig()).model
    counts = Counter(n.op_type for n in model.graph)
    assert counts["BlockQuantize"] == 0 and counts["Neg"] == 0
    attention = [n for n in model.graph if n.op_type == ops.BLOCK_ATTENTION]
    assert attention and all(len(n.outputs) == 5 and "q_heads" in n.attributes for n in attention)
