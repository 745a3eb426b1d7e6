"""Calibration text from the user's own files: JSON Lines records and local `datasets` files.

A JSONL file holds one JSON object a line with a string field "text". A datasets file is a
Parquet or Arrow file, or a directory written by ``Dataset.save_to_disk``, with a "text" column;
reading it needs the `datasets` package (not a dependency of bct-onnx: ``pip install datasets``).
Each record is one calibration text; long files give up to ``samples`` records spread evenly.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

TEXT_FIELD = "text"
DATASET_SUFFIXES = (".parquet", ".arrow")
DATASET_DIR_MARKERS = ("dataset_info.json", "state.json")  # what Dataset.save_to_disk writes


class TextFileError(ValueError):
    """A calibration text file that cannot be read, or holds no usable text."""


def is_jsonl(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".jsonl"


def is_dataset(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in DATASET_SUFFIXES
    return path.is_dir() and any((path / marker).is_file() for marker in DATASET_DIR_MARKERS)


def spread(records: list[str], samples: int) -> list[str]:
    """Up to ``samples`` of ``records``, evenly spread, in file order."""
    if len(records) <= samples:
        return records
    picks = np.linspace(0, len(records) - 1, num=samples).round().astype(int)
    return [records[i] for i in sorted(set(picks.tolist()))]


def jsonl_texts(path: Path, samples: int) -> list[str]:
    """The "text" field of every record of a JSON Lines file (blank lines skipped)."""
    texts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TextFileError(f"cannot read calibration file {path}: {error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TextFileError(f"{path}:{number}: not a JSON object ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
            raise TextFileError(f'{path}:{number}: a record needs a string field "{TEXT_FIELD}"')
        if record[TEXT_FIELD].strip():
            texts.append(record[TEXT_FIELD])
    if not texts:
        raise TextFileError(f'calibration file {path} has no non-empty "{TEXT_FIELD}" field')
    return spread(texts, samples)


def dataset_texts(path: Path, samples: int) -> list[str]:
    """The "text" column of a local Parquet / Arrow file or save_to_disk directory, read with `datasets`."""
    try:
        import datasets
    except ImportError as error:
        raise TextFileError(
            f"reading {path} needs the datasets package (pip install datasets); "
            "without it, give calibration text as a .txt or .jsonl file"
        ) from error
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        elif path.suffix.lower() == ".arrow":
            loaded = datasets.Dataset.from_file(str(path))
        else:
            with tempfile.TemporaryDirectory(prefix="bct_onnx_datasets_") as cache:  # no ~/.cache writes
                loaded = datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
    except (OSError, ValueError) as error:
        raise TextFileError(f"cannot read {path} as a datasets file: {error}") from error
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    if TEXT_FIELD not in loaded.column_names:
        raise TextFileError(f'{path} has no "{TEXT_FIELD}" column (columns: {", ".join(loaded.column_names)})')
    texts = [t for t in loaded[TEXT_FIELD] if isinstance(t, str) and t.strip()]
    if not texts:
        raise TextFileError(f'{path}: the "{TEXT_FIELD}" column holds no text')
    return spread(texts, samples)
