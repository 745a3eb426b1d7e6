"""Small models shared by the deployment tests: a float MLP built from ONNX helpers, and its
compressed form (written once per test into tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import bct_onnx

from ..test_cli import build_mlp as build_plain_mlp

# Exporters' layer paths for the MLP's nodes, so that reports can group them by layer.
LAYER_NAMES = ("/embed/Gather", "/layers.0/fc1/MatMul", "/layers.0/fc1/Add", "/layers.0/Relu", "/layers.1/fc2/MatMul")


def build_mlp(path: Path) -> Path:
    """test_cli's MLP (ids -> Gather -> MatMul + bias -> Relu -> MatMul -> y [batch, seq, 32]), its
    nodes named like an exporter's."""
    build_plain_mlp(path)
    model = onnx.load(str(path))
    for node, name in zip(model.graph.node, LAYER_NAMES, strict=True):
        node.name = name
    onnx.save(model, str(path))
    return path


def mlp_ids(batch: int = 2, seq: int = 5) -> np.ndarray:
    """The input the deployment tests feed (the C++ example fills input_ids the same way)."""
    return ((np.arange(batch * seq, dtype=np.int64) * 13 + 1) % 100).reshape(batch, seq)


@pytest.fixture()
def mlp_path(tmp_path: Path) -> Path:
    return build_mlp(tmp_path / "mlp.onnx")


@pytest.fixture()
def compressed_mlp(tmp_path: Path, mlp_path: Path) -> Path:
    out = tmp_path / "mlp.bct.onnx"
    bct_onnx.compress(mlp_path, out, calibration="none")
    return out


def save_word_level_tokenizer(directory: Path, words: int = 50) -> Path:
    """A tiny fast tokenizer (whitespace words w0..w{words-1}, [UNK] = 0, [PAD] = 1) saved in directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(directory)
    return directory
