"""The real all-MiniLM-L6-v2 end to end: export, compress, run under ONNX Runtime, compare with FP32.

The thresholds are the acceptance figures of issue 2 (beat ONNX Runtime's own 4-bit blockwise
quantizer, 6.3x at cosine ~0.96, and its int8 quantize_dynamic, 4.0x at ~0.957, at once):
- 4-bit weights and embeddings, block 32, int8 activations: whole-file ratio >= 6.5 and mean
  cosine of sentence embeddings to FP32 >= 0.97 on the real sentences;
- 8-bit weights and activations: mean cosine >= 0.995.
Both compress the ops issue 2 is about, weight MatMuls and embedding Gathers (`--ops MatMul,Gather`),
so these figures do not move when later passes (Softmax, LayerNorm, ...) join the defaults.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bct_onnx.models import minilm

import bct_onnx
from bct_onnx import cli
from bct_onnx.demo import cosine_rows

MIN_RATIO_W4A8 = 6.5
MIN_MEAN_COSINE_W4A8 = 0.97
MIN_MEAN_COSINE_W8A8 = 0.995


@pytest.fixture(scope="module")
def fp32(minilm_export: Path) -> tuple[Path, np.ndarray]:
    """The FP32 export (the run's shared one) and its sentence embeddings."""
    path = minilm_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, minilm.embed(session, minilm.sentences())


def _embeddings(path: Path) -> np.ndarray:
    session = bct_onnx.session(path, providers=["CPUExecutionProvider"])
    return minilm.embed(session, minilm.sentences())


def test_w4a8_from_hf_directory_via_cli(
    fp32: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Hugging Face directory itself as INPUT: exported with optimum on the fly, then compressed."""
    fp32_path, fp32_embeddings = fp32
    out = tmp_path / "minilm.w4a8.onnx"
    report_path = tmp_path / "report.json"
    code = cli.main(
        [
            "compress",
            str(minilm.model_dir()),
            "-o",
            str(out),
            "--task",
            "feature-extraction",
            "--ops",
            "MatMul,Gather",
            "--weight-bits",
            "4",
            "--embedding-bits",
            "4",
            "--act-bits",
            "8",
            "--block-size",
            "32",
            "--report",
            str(report_path),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(report_path.read_text())
    assert report["exported_from"] == str(minilm.model_dir())
    # Six BERT layers: Q, K, V, attention output, FFN in and out = 36 weight MatMuls; word,
    # position and token-type embedding Gathers = 3. The 12 attention score/context MatMuls
    # (activation x activation) are skipped with a reason.
    assert report["rewritten"] == {"Gather": 3, "MatMul": 36}
    assert len(report["skipped"]) == 12
    assert all(s["op_type"] == "MatMul" and s["reason"] for s in report["skipped"])
    # The exported FP32 model of the temporary export has the size of our own FP32 export.
    assert report["input_bytes"] == pytest.approx(fp32_path.stat().st_size, rel=0.001)
    ratio = report["input_bytes"] / report["output_bytes"]
    cosine = cosine_rows(fp32_embeddings, _embeddings(out))
    print(
        f"\nMiniLM W4 (emb 4) A8 b32: ratio {ratio:.3f}x, cosine {cosine.mean():.4f} (min {cosine.min():.4f})"
    )
    assert ratio >= MIN_RATIO_W4A8
    assert cosine.mean() >= MIN_MEAN_COSINE_W4A8


def test_w4a8_asymmetric_python_api(fp32: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """The same figures with a zero point per block (asymmetric weights and tables)."""
    fp32_path, fp32_embeddings = fp32
    out = tmp_path / "minilm.w4a8.asym.onnx"
    _, report = bct_onnx.compress(
        fp32_path,
        out,
        weight_bits=4,
        embedding_bits=4,
        act_bits=8,
        block_size=32,
        symmetric=False,
        ops={"MatMul", "Gather"},
    )
    assert report.rewritten == {"Gather": 3, "MatMul": 36}
    cosine = cosine_rows(fp32_embeddings, _embeddings(out))
    ratio = report.compression_ratio
    print(f"\nMiniLM W4A8 b32 asym: ratio {ratio:.3f}x, cosine {cosine.mean():.4f} (min {cosine.min():.4f})")
    assert ratio >= MIN_RATIO_W4A8
    assert cosine.mean() >= MIN_MEAN_COSINE_W4A8


def test_w8a8_python_api(fp32: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    fp32_path, fp32_embeddings = fp32
    out = tmp_path / "minilm.w8a8.onnx"
    _, report = bct_onnx.compress(
        fp32_path, out, weight_bits=8, act_bits=8, block_size=32, ops={"MatMul", "Gather"}
    )
    assert report.rewritten == {"Gather": 3, "MatMul": 36}
    cosine = cosine_rows(fp32_embeddings, _embeddings(out))
    ratio = report.compression_ratio
    print(f"\nMiniLM W8A8 b32: ratio {ratio:.3f}x, cosine {cosine.mean():.4f} (min {cosine.min():.4f})")
    assert cosine.mean() >= MIN_MEAN_COSINE_W8A8


# The default configuration compresses every op kind (attention MatMuls, Softmax, LayerNorm, Gelu
# too). Its accuracy target is the 4-bit one above; this floor only says "runs and is not broken"
# (a wrong scale or layout anywhere gives cosines far below it; measured 0.965).
MIN_MEAN_COSINE_DEFAULT_SANITY = 0.9


@pytest.fixture(scope="module")
def default_compressed(
    fp32: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> tuple[bct_onnx.CompileReport, np.ndarray]:
    """The default configuration's report and its per-sentence cosines to FP32: one compression read by
    the tests below (each checks a different property of it)."""
    fp32_path, fp32_embeddings = fp32
    out = tmp_path_factory.mktemp("minilm_default") / "minilm.default.onnx"
    _, report = bct_onnx.compress(fp32_path, out)
    return report, cosine_rows(fp32_embeddings, _embeddings(out))


def test_default_config_runs_end_to_end(default_compressed: tuple[bct_onnx.CompileReport, np.ndarray]) -> None:
    """What `bct-onnx demo` does with no flags: every op kind with a pass, compressed and run."""
    report, cosine = default_compressed
    assert {"MatMul", "Gather"} <= set(report.rewritten) <= set(report.config["ops"])
    ratio = report.compression_ratio
    print(f"\nMiniLM default config: {report.rewritten}, ratio {ratio:.3f}x, cosine {cosine.mean():.4f}")
    assert cosine.mean() >= MIN_MEAN_COSINE_DEFAULT_SANITY


def test_default_config_keeps_the_ffn_intermediates_compressed(
    default_compressed: tuple[bct_onnx.CompileReport, np.ndarray],
) -> None:
    """Issue 3, item 3 on the real model. With the default fusions, attention's probabilities never
    leave BlockAttention and GELU is the FFN up-projection's epilogue, so the one float edge left per
    layer between compressed ops, epilogue -> FFN down-projection, passes codes: 6 tensors (18 with
    fuse_ops and fuse_attention off: Softmax -> P x V, MatMul -> Gelu, Gelu -> MatMul). The
    LayerNorm results stay float: each is also read by a residual Add (and a Shape)."""
    report, cosine = default_compressed
    assert report.rules["intermediate kept compressed"] == 6
    # GELU epilogue -> MatMul as 8-bit codes: per token and layer between 1536 * (32 - 8 - 1) / 8 (float32
    # scales per block of 32) and 1536 * (32 - 8) / 8 bytes (the scales' own cost left out) saved.
    assert 6 * 4416 <= report.rules["activation bytes saved per token (static last dims)"] <= 6 * 4608
    layer_norm_reasons = {s.reason for s in report.skipped if s.op_type == "BlockLayerNorm"}
    assert all("Add" in r or "Shape" in r or "graph output" in r for r in layer_norm_reasons), (
        layer_norm_reasons
    )
    print(
        f"\nMiniLM default config, 6 intermediates compressed: cosine {cosine.mean():.4f} (min {cosine.min():.4f})"
    )
    assert cosine.mean() >= MIN_MEAN_COSINE_DEFAULT_SANITY


def test_demo_prints_the_figures_and_writes_nothing_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bct-onnx demo` end to end (one timed run), from an empty working directory it must not touch."""
    monkeypatch.chdir(tmp_path)
    code = cli.main(["demo", "--runs", "1", "--threads", "1", "--ops", "MatMul,Gather"])
    out = capsys.readouterr().out
    assert code == 0
    ratio = re.search(r"compression ratio: (\d+\.\d+)x", out)
    assert ratio is not None and float(ratio.group(1)) >= MIN_RATIO_W4A8, out
    for needle in (
        f"cosine FP32 vs compressed, {len(minilm.sentences())} sentences: mean 0.9",
        "latency, ONNX Runtime CPU, 1 thread(s), median of 1 warm runs",
        "batch of 8 sentences",
        "1 sentence",
        "FP32/compressed",
    ):
        assert needle in out, out
    assert list(tmp_path.iterdir()) == []


def test_demo_bad_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--weight-bits", "9"])
    assert exc.value.code == 2
    assert "argument --weight-bits: expected an integer in 2..8, got 9" in capsys.readouterr().err


# Issue 9: a plain .onnx with no tokenizer beside it and default flags (an encoder: the 8x budget with
# one-byte scales of bct_onnx/model_defaults.py, data-free sensitivities and GPTQ), scored on Austen
# test sentences the compressor never sees. Measured 8.01x at mean cosine 0.9819 on 600 of them
# (docs/results.md); here the first 120 (0.9814 at the budget-flag commit da8e581).
MIN_RATIO_DEFAULT = 8.0
MIN_MEAN_COSINE_DEFAULT_DATA_FREE = 0.975


def test_default_flags_on_a_plain_onnx_reach_8x_data_free(fp32: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    from bct_onnx.models import labelled_task
    from bct_onnx.models.text_data import TextDataUnavailable

    try:
        sentences = list(labelled_task.austen_novel_task().test_texts[:120])
    except TextDataUnavailable as err:
        pytest.skip(str(err))
    fp32_path, _ = fp32
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.onnx").write_bytes(fp32_path.read_bytes())  # no tokenizer files beside it
    out = tmp_path / "default.onnx"
    _, report = bct_onnx.compress(plain / "model.onnx", out)
    assert report.model_kind["kind"] == "encoder"
    assert report.model_kind["applied"] == {"target_ratio": 8.0, "scale_kind": "float8e5m2", "budget_floor": False}
    # No tokenizer beside the file: only data-free calibration (GPTQ on made-up ids) may run.
    assert report.budget is not None and report.budget["target_ratio"] == 8.0
    assert "--tokenizer" in report.summary()  # says what a tokenizer would add
    assert report.calibration["method"] == "none" or "data-free" in report.calibration["source"]
    tokenizer = minilm.load_tokenizer()
    reference = minilm.embed(
        ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]), sentences, tokenizer=tokenizer
    )
    cosine = cosine_rows(reference, minilm.embed(bct_onnx.session(out), sentences, tokenizer=tokenizer))
    print(f"\nMiniLM budget 8x, plain .onnx: ratio {report.compression_ratio:.3f}x, cosine {cosine.mean():.4f}")
    assert report.compression_ratio >= MIN_RATIO_DEFAULT
    assert cosine.mean() >= MIN_MEAN_COSINE_DEFAULT_DATA_FREE
