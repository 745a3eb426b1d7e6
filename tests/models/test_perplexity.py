"""Strided-window perplexity: exact values on constructed logits, ONNX equals torch on a tiny Llama."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bct_onnx.models import minilm
from bct_onnx.models.families import VOCAB, export_tiny
from bct_onnx.models.perplexity import onnx_logits_fn, perplexity, perplexity_of_ids

# FP32 ONNX vs torch perplexity: both are the same float32 logits up to summation order, then a
# float64 log-softmax; the brief's bound is 1e-3 relative, observed agreement is near 1e-7.
REL_TOL = 1e-3


class _ByteTokenizer:
    """Token ids = UTF-8 bytes (the tiny models have a 256-token vocabulary)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, Any]:
        return {"input_ids": list(text.encode("utf-8"))}


def _uniform(ids: np.ndarray) -> np.ndarray:
    return np.zeros((*ids.shape, 50), dtype=np.float32)


@pytest.mark.parametrize(("window", "stride"), [(8, None), (8, 7), (8, 3), (2, 1), (1000, None)])
def test_uniform_logits_give_vocab_size(window: int, stride: int | None) -> None:
    ids = np.arange(37) % 50
    result = perplexity_of_ids(ids, _uniform, window=window, stride=stride)
    assert result.scored_tokens == 36  # every token but the first, exactly once
    assert math.isclose(result.perplexity, 50.0, rel_tol=1e-12)


def test_perfect_predictor_gives_one_and_context_is_aligned() -> None:
    vocab = 11

    def next_token(t: np.ndarray) -> np.ndarray:
        return (3 * t + 1) % vocab

    ids = [0]
    for _ in range(40):
        ids.append(int(next_token(np.array(ids[-1]))))

    def oracle(chunk: np.ndarray) -> np.ndarray:
        logits = np.full((*chunk.shape, vocab), -30.0, dtype=np.float32)
        np.put_along_axis(logits, next_token(chunk)[..., None], 30.0, axis=-1)
        return logits

    result = perplexity_of_ids(ids, oracle, window=7, stride=3)
    assert result.perplexity == pytest.approx(1.0, abs=1e-12)
    assert result.windows == math.ceil((len(ids) - 7) / 3) + 1


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity_of_ids([3], _uniform)
    with pytest.raises(ValueError, match=r"stride must be in \[1, window=4\), got 4"):
        perplexity_of_ids([1, 2, 3], _uniform, window=4, stride=4)


def test_onnx_perplexity_equals_torch_on_tiny_llama(tmp_path: Path) -> None:
    (path,) = export_tiny("llama", tmp_path, with_past=False)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()

    def torch_logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(ids)).logits.numpy()

    text = " ".join(minilm.sentences())
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)[:300]
    assert ids.max() < VOCAB
    expected = perplexity_of_ids(ids, torch_logits, window=64, stride=32)
    got = perplexity(path, _ByteTokenizer(), text, max_tokens=300, window=64, stride=32)
    assert got == pytest.approx(expected.perplexity, rel=REL_TOL)
    # A random-weight model is near uniform over its vocabulary.
    assert 0.5 * VOCAB < got < 2 * VOCAB


def test_past_graph_is_refused(tmp_path: Path) -> None:
    (path,) = export_tiny("gpt2", tmp_path, with_past=True)
    with pytest.raises(ValueError, match="without KV cache"):
        onnx_logits_fn(path)
