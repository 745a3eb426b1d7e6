"""all-MiniLM-L6-v2 from its PyPI package: offline export, ORT embeddings equal sentence-transformers'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from bct_onnx.models import minilm

# Cosine of ORT vs torch embeddings, per sentence: FP32 export of the same graph differs by
# float reordering only (about 1e-7); 0.9999 still catches a wrong pooling or missing mask.
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def exported(minilm_export: Path) -> Path:
    """The run's shared export (tests/conftest.py; it also checks the package folder stays untouched)."""
    return minilm_export


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    import sentence_transformers  # heavy (torch): only for this fixture

    model = sentence_transformers.SentenceTransformer(str(minilm.model_dir()), device="cpu")
    return np.asarray(model.encode(minilm.sentences(), normalize_embeddings=True), dtype=np.float32)


def test_model_dir_is_the_package_folder() -> None:
    directory = minilm.model_dir()
    assert directory.name == "model"
    assert (directory / "config.json").is_file()
    assert minilm.max_length() == 256


def test_export_declares_both_outputs(exported: Path) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert outputs["sentence_embedding"][-1] == minilm.EMBEDDING_DIM
    assert outputs["token_embeddings"][-1] == minilm.EMBEDDING_DIM


def test_embeddings_match_sentence_transformers(exported: Path, reference: np.ndarray) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    embeddings = minilm.embed(session, minilm.sentences(), batch_size=7)
    assert embeddings.shape == (len(minilm.sentences()), minilm.EMBEDDING_DIM)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    cosines = (embeddings * reference).sum(axis=1)
    assert cosines.min() > MIN_COSINE, f"worst sentence {int(cosines.argmin())}: cosine {cosines.min()}"


class _TokenOutputOnly:
    """A session exposing only token_embeddings, to exercise the mean-pooling path."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def get_inputs(self) -> Any:
        return self._session.get_inputs()

    def get_outputs(self) -> Any:
        return [o for o in self._session.get_outputs() if o.name == "token_embeddings"]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        assert names == ["token_embeddings"]
        return self._session.run(names, feeds)


def test_mean_pooling_fallback_matches(exported: Path, reference: np.ndarray) -> None:
    session = _TokenOutputOnly(ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]))
    embeddings = minilm.embed(session, minilm.sentences())
    assert (embeddings * reference).sum(axis=1).min() > MIN_COSINE


def test_embed_rejects_a_single_string(exported: Path) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    with pytest.raises(TypeError, match="sequence of sentences"):
        minilm.embed(session, "Call me Ishmael.")


def test_sentences_are_real_and_clean() -> None:
    lines = minilm.sentences()
    assert len(lines) >= 30
    assert lines[0].startswith("It is a truth universally acknowledged")
    assert "Call me Ishmael." in lines
    assert all(line and not line.startswith("#") for line in lines)
    assert len(set(lines)) == len(lines)
