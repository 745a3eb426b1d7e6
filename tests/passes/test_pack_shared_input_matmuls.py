"""PackSharedInputMatMulsPass: a tiny BERT's Q and K BlockMatMuls become one BlockMatMul read in
place by BlockAttention (attribute kv_heads), and the model's outputs keep their bits (tolerance 0) on
every CPU path; near misses say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.models import families
from bct_onnx.passes import PackSharedInputMatMulsPass, pipeline
from bct_onnx.passes.framework import CompressPassResult
from bct_onnx.passes.pack_shared_input_matmuls import RULE
from support import assert_bits_equal, run_bct_session

from bct_onnx import ops
from bct_onnx.api import compress
from bct_onnx.config import CompressConfig, NodeOverride, OpSettings

ISA_PATHS = ["scalar", "avx2", "avx512", "avx512vnni"]


class _NoPacking(PackSharedInputMatMulsPass):
    def call(self, model: ir.Model) -> CompressPassResult:
        return CompressPassResult(model, modified=False)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return families.export_tiny("bert", tmp_path_factory.mktemp("tiny-bert"), with_past=False)[0]


def _unpacked(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, config: CompressConfig) -> ir.Model:
    """tiny_bert compressed by the pipeline without this pass."""
    monkeypatch.setattr(pipeline, "PackSharedInputMatMulsPass", _NoPacking)
    return ir.external_data.load_to_model(compress(tiny_bert, config=config, calibration=None).model)


def _count(model: ir.Model, op_type: str) -> int:
    return sum(1 for node in model.graph if node.op_type == op_type and node.domain == ops.DOMAIN)


def _feeds(model: ir.Model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    feeds = {}
    for value in model.graph.inputs:
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, 90, (2, 11)).astype(np.int64)
        else:
            mask = np.ones((2, 11), np.int64)
            mask[1, 7:] = 0  # padded keys in the second row
            feeds[value.name] = mask if value.name == "attention_mask" else np.zeros((2, 11), np.int64)
    return feeds


V_WIDER = NodeOverride("*value*", OpSettings(weight_bits=8), op="MatMul")


@pytest.mark.parametrize("overrides", [(), (V_WIDER,)], ids=["v_same_format", "v_wider"])
def test_packed_model_keeps_its_bits_on_every_isa_path(
    tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, overrides: tuple[NodeOverride, ...]
) -> None:
    """Q and K packed, V left apart whatever its format; the model's outputs keep their bits."""
    config = CompressConfig(weight_bits=4, target_ratio=None, overrides=overrides)
    unpacked = _unpacked(tiny_bert, monkeypatch, config)
    layers = _count(unpacked, ops.BLOCK_ATTENTION)
    assert layers >= 2
    packed = ir.from_proto(ir.to_proto(unpacked))
    result = PackSharedInputMatMulsPass()(packed)
    assert result.modified
    assert result.rewritten == {RULE: layers}
    assert _count(packed, ops.BLOCK_MATMUL) == _count(unpacked, ops.BLOCK_MATMUL) - layers
    for node in packed.graph:
        if node.op_type != ops.BLOCK_ATTENTION:
            continue
        heads = node.attributes["q_heads"].as_int()
        assert node.attributes["kv_heads"].as_int() == heads
        assert node.inputs[1] is None
        projection, v = node.inputs[0].producer(), node.inputs[4].producer()
        assert projection.name.endswith("/query/MatMul/qk") and "/value/" in v.name
        assert projection.attributes["N"].as_int() == 2 * v.attributes["N"].as_int()
    feeds = _feeds(unpacked)
    for isa in ISA_PATHS:
        monkeypatch.setenv("BCT_ONNX_ISA", isa)
        want = run_bct_session(unpacked, feeds)
        got = run_bct_session(packed, feeds)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_bits_equal(g, w, f"output {i} on {isa}")


def test_the_pipeline_packs_and_drops_the_separate_weights(tiny_bert: Path) -> None:
    config = CompressConfig(weight_bits=4, target_ratio=None)
    result = compress(tiny_bert, config=config, calibration=None)
    layers = _count(result.model, ops.BLOCK_ATTENTION)
    assert layers >= 2
    assert _count(result.model, ops.BLOCK_MATMUL) == 5 * layers  # QK, V, output, FFN up, FFN down
    read = {v.name for node in result.model.graph for v in node.inputs if v is not None}
    assert set(result.model.graph.initializers) <= read  # the per-projection weights are gone


def test_different_formats_are_not_packed(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """K's weights wider than Q's: nothing to pack (the attention keeps Q, K, V apart), and the skip
    names the attribute."""
    k_wider = NodeOverride("*key*", OpSettings(weight_bits=8), op="MatMul")
    unpacked = _unpacked(
        tiny_bert, monkeypatch, CompressConfig(weight_bits=4, target_ratio=None, overrides=(k_wider,))
    )
    result = PackSharedInputMatMulsPass()(unpacked)
    assert not result.modified
    reasons = [skip.reason for skip in result.skipped]
    assert reasons and all("differ in attribute 'bits'" in reason for reason in reasons), reasons
