"""The one tokenizer loader: a Hugging Face tokenizer from local files, never from the hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
