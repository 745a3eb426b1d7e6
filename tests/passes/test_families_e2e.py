"""Every seed family, all components compressed, run under ONNX Runtime and compared with FP32.

Tiny random-weight models (bct_onnx.models.families) are exported offline, compressed with the
default config (everything: 4-bit weights, 8-bit activations and intermediates, block 32) and run
with the custom-op library. Stated tolerance: cosine similarity of every float output to FP32
>= 0.97 (random weights are harder to quantize than trained ones; measured values in
docs/results.md). The share of compressed nodes among the target kinds (MatMul, Gather, Gelu,
Softmax, LayerNormalization, SiLU) must be 100% except where EXPECTED_FLOAT says why; each graph's row of the
family x kind table (docs/results.md) is printed (run with -s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bct_onnx.models import families
from bct_onnx.passes import compress_model
from bct_onnx.passes.coverage import TARGET_KINDS, format_shares, target_kind_shares

from bct_onnx.config import CompressConfig
from bct_onnx.runtime import session

MIN_COSINE = 0.97
# Nodes of a target kind that stay float on purpose, per family: kind -> (count, why).
ROTARY = "rotary frequencies inv_freq x positions: positions up to the context length, not attention"
EXPECTED_FLOAT = {"llama": {"MatMul": (1, ROTARY)}, "pythia": {"MatMul": (1, ROTARY)}}


def _graphs(name: str, out: Path) -> list[Path]:
    paths = families.export_tiny(name, out, with_past=False)
    return [p for p in paths if p.name != "decoder_model_merged.onnx"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64) + 1e-30))


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_family_compresses_every_component_and_runs(name, tmp_path):
    for path in _graphs(name, tmp_path):
        model = ir.load(path)
        result = compress_model(model, CompressConfig())
        out = tmp_path / f"{path.stem}.bct.onnx"
        ir.save(result.model, out)
        feeds = families.dummy_inputs(path)
        reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in reference.get_outputs()]
        expected = reference.run(names, feeds)
        got = session(str(out)).run(names, feeds)
        cosines = {}
        for output, a, b in zip(names, expected, got):
            if a.dtype.kind == "f" and a.size:
                cosines[output] = cos = _cosine(a, b)
                assert cos >= MIN_COSINE, f"{name} {path.name} {output}: cosine {cos:.4f} < {MIN_COSINE}"
        shares = target_kind_shares(model, result.model)
        print(f"\n{name}/{path.stem}: cosine to FP32 " + ", ".join(f"{k} {v:.4f}" for k, v in cosines.items()))
        print(format_shares({f"{name}/{path.stem}": shares}))
        for kind in TARGET_KINDS:
            share = shares[kind]
            allowed = EXPECTED_FLOAT.get(name, {}).get(kind, (0, ""))[0]
            assert share.original - share.compressed <= allowed, (
                f"{name} {path.name}: {kind} {share.compressed}/{share.original} compressed; skips: "
                + "; ".join(str(s) for s in result.skipped if s.op_type in (kind, "Gemm"))[:2000]
            )
        assert result.activations is not None
