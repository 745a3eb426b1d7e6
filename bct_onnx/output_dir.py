"""Output directories: ``-o DIR/`` writes ``DIR/model.onnx`` and, for a Hugging Face input, the files
that loaders expect beside it (config, generation config, tokenizer), so that optimum's
``ORTModelFor...`` classes and transformers' pipelines load the directory as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import onnx_ir as ir

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


# A sentence-transformers folder: these files plus the module folders modules.json lists (pooling,
# normalisation) let SentenceTransformer(DIR, backend="onnx") rebuild the pipeline around model.onnx.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# sentence-transformers' exporter names the token states "token_embeddings"; optimum's
# ORTModelForFeatureExtraction (which sentence-transformers' ONNX backend drives) reads this name.
FEATURE_EXTRACTION_OUTPUT = "last_hidden_state"
SENTENCE_TRANSFORMERS_OUTPUT = "token_embeddings"


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
    for name in COMPANION_FILES + SENTENCE_TRANSFORMERS_FILES:
        for folder in folders:
            source = folder / name
            if source.is_file() and source.resolve() != (directory / name).resolve():
                shutil.copyfile(source, directory / name)
                copied.append(name)
                break
    modules = sentence_transformers_folder(folders)
    if modules is not None:
        for module in _module_folders(modules):
            if not (directory / module).exists():
                shutil.copytree(modules / module, directory / module)
                copied.append(module + "/")
    if copied:
        logger.info("copied %s into %s", ", ".join(copied), directory)
    return copied


def sentence_transformers_folder(sources: Iterable[Path | None]) -> Path | None:
    """The first of sources that is a sentence-transformers model folder (has modules.json), or None."""
    for source in sources:
        if source is not None and (Path(source) / "modules.json").is_file():
            return Path(source)
    return None


def _module_folders(folder: Path) -> list[str]:
    """The module subfolders modules.json lists (e.g. 1_Pooling), only plain names inside folder."""
    try:
        entries = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("ignoring %s: %s", folder / "modules.json", error)
        return []
    names = [entry.get("path", "") for entry in entries if isinstance(entry, dict)]
    return [name for name in names if name and Path(name).name == name and (folder / name).is_dir()]


def add_feature_extraction_output(model: ir.Model) -> bool:
    """Give a sentence-transformers export the token-state output name optimum reads.

    Adds ``last_hidden_state`` as an Identity of ``token_embeddings`` (the existing outputs stay,
    so the file keeps working for callers that read them). Returns whether it was added.
    """
    outputs = {value.name: value for value in model.graph.outputs}
    token_states = outputs.get(SENTENCE_TRANSFORMERS_OUTPUT)
    if token_states is None or FEATURE_EXTRACTION_OUTPUT in outputs:
        return False
    alias = ir.node("Identity", [token_states], name=f"{FEATURE_EXTRACTION_OUTPUT}_alias")
    alias.outputs[0].name = FEATURE_EXTRACTION_OUTPUT
    alias.outputs[0].dtype = token_states.dtype
    alias.outputs[0].shape = token_states.shape
    model.graph.append(alias)
    model.graph.outputs.append(alias.outputs[0])
    return True
