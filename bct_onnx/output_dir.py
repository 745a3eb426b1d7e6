"""Output directories: ``-o DIR/`` writes ``DIR/model.onnx`` and, for a Hugging Face input, the files
that loaders expect beside it (config, generation config, tokenizer), so that optimum's
``ORTModelFor...`` classes and transformers' pipelines load the directory as it is.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from bct_onnx.errors import ModelFileError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"  # the name optimum's ORTModelFor... classes look for first
# What loaders read beside the graph: the model and generation configs and every tokenizer file.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def is_directory_output(output: str | os.PathLike[str]) -> bool:
    """True when ``output`` names a directory: it ends with a path separator or is an existing one."""
    text = os.fspath(output)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def model_file(output: str | os.PathLike[str]) -> Path:
    """The .onnx file to write for ``output``: ``output/model.onnx`` for a directory, else ``output``.

    A directory that does not exist yet is created (its parent must exist).
    """
    if not is_directory_output(output):
        return Path(output)
    directory = Path(output)
    try:
        directory.mkdir(exist_ok=True)
    except FileNotFoundError as error:
        raise ModelFileError(
            f"cannot create output directory {directory}: its parent {directory.parent} does not exist"
        ) from error
    except FileExistsError as error:
        raise ModelFileError(f"output {directory} exists and is not a directory") from error
    return directory / MODEL_FILE


def copy_companions(directory: Path, sources: Iterable[Path | None]) -> list[str]:
    """Copy COMPANION_FILES found in ``sources`` (first source holding a file wins) into ``directory``.

    Returns the names copied. The exported folder comes first in ``sources``: optimum writes the
    config and tokenizer it exported with there.
    """
    copied: list[str] = []
    folders = [Path(s) for s in sources if s is not None and Path(s).is_dir()]
    for name in COMPANION_FILES:
        for folder in folders:
            source = folder / name
            if source.is_file() and source.resolve() != (directory / name).resolve():
                shutil.copyfile(source, directory / name)
                copied.append(name)
                break
    if copied:
        logger.info("copied %s into %s", ", ".join(copied), directory)
    return copied
