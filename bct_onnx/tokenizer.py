"""The one tokenizer loader: a Hugging Face tokenizer from local files, never from the hub."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bct_onnx.models.export import hub_offline

# Any of these files in a directory means a tokenizer can be loaded from it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def find_tokenizer_dir(*candidates: Path | None) -> Path | None:
    """The first candidate directory that holds tokenizer files, or None."""
    for folder in candidates:
        if folder is not None and folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    return None


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """transformers AutoTokenizer from ``folder``, offline; raises OSError / ValueError as transformers does."""
    # transformers is heavy (seconds to import): only callers that tokenize pay for it.
    from transformers import AutoTokenizer

    with hub_offline():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class TextTokenizer:
    """A Hugging Face fast tokenizer read from its tokenizer.json with the ``tokenizers`` library.

    Answers the calls text_feeds makes (``tokenizer(texts, padding=, truncation=, max_length=,
    return_tensors="np")``, ``pad_token``, ``model_max_length``) with the encodings transformers'
    fast tokenizer gives, without importing transformers (which imports torch: about 400 MB and
    seconds of a compile). tests/test_tokenizer.py checks the encodings against transformers'.
    """

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second one wins
            path = folder / name
            if path.is_file():
                config.update(json.loads(path.read_text(encoding="utf-8")))
        pad = config.get("pad_token")
        self.pad_token: str | None = pad.get("content") if isinstance(pad, dict) else pad
        limit = config.get("model_max_length")
        self.model_max_length = limit if isinstance(limit, int) else None

    def __call__(
        self, texts: Sequence[str], padding: bool = False, truncation: bool = True, max_length: int = 128,
        return_tensors: str = "np",
    ) -> dict[str, np.ndarray]:
        tokenizer = self._tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if truncation:
            tokenizer.enable_truncation(max_length)
        if padding:
            if self.pad_token is None:
                raise ValueError("Asking to pad but the tokenizer does not have a padding token.")
            tokenizer.enable_padding(pad_id=tokenizer.token_to_id(self.pad_token), pad_token=self.pad_token)
        encodings = tokenizer.encode_batch(list(texts))
        lengths = {len(e.ids) for e in encodings}
        if len(lengths) > 1:
            raise ValueError("texts of different lengths need padding=True")
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }


def load_text_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """A tokenizer that only encodes (calibration text): a TextTokenizer when folder has a
    tokenizer.json, else load_tokenizer's. Raises OSError / ValueError when neither can read it."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        try:
            return TextTokenizer(folder)
        except ImportError:  # no tokenizers library: transformers says what is missing
            pass
        except Exception as error:
            raise ValueError(f"cannot read {folder / 'tokenizer.json'}: {error}") from error
    return load_tokenizer(folder)
