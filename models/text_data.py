"""Real English text without a dataset hub, from Debian's R packages.

Jane Austen's six novels (r-cran-janeaustenr) are the evaluation text; Herman Melville's Moby-Dick
(the ``mobydick`` data set of r-cran-tokenizers) is calibration text for GPTQ, kept apart from it.

The .deb is fetched by package name with ``apt-get download`` (no install, no root needed),
unpacked with ``dpkg-deb -x`` into a cache directory, and the novels are read from the R package's
lazy-load data base (``data/Rdata.rdb`` + ``.rdx``) with the ``rdata`` package. The text is MIT
licensed (janeaustenr); the novels themselves are public domain.
"""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from bct_onnx.models.cache import cache_dir

logger = logging.getLogger(__name__)

AUSTEN_PACKAGE = "r-cran-janeaustenr"
MOBY_DICK_PACKAGE = "r-cran-tokenizers"
AUSTEN_BOOKS: tuple[str, ...] = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
_R_LIBRARY = Path("usr/lib/R/site-library")


class TextDataUnavailable(RuntimeError):
    """The text could not be fetched or read (no apt-get, no network to the Debian mirror, no rdata)."""


def _run(command: list[str], cwd: Path) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    except FileNotFoundError as error:
        raise TextDataUnavailable(f"{command[0]} is not available on this system ({error})") from error
    except subprocess.TimeoutExpired as error:
        raise TextDataUnavailable(f"{' '.join(command)} timed out after {error.timeout} s") from error
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise TextDataUnavailable(
            f"{' '.join(command)} failed with exit code {result.returncode}: {' | '.join(detail[-3:])}"
        )


def debian_package_root(package: str, root: Path | None = None) -> Path:
    """Directory holding the unpacked files of Debian ``package``; fetched and unpacked once."""
    base = (root or cache_dir()) / "debian"
    target = base / package
    if (target / ".complete").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix=f".{package}-") as scratch_name:
        scratch = Path(scratch_name)
        logger.info("fetching Debian package %s with apt-get download", package)
        _run(["apt-get", "download", package], cwd=scratch)
        debs = sorted(scratch.glob(f"{package}_*.deb"))
        if not debs:
            raise TextDataUnavailable(f"apt-get download {package} produced no .deb in {scratch}")
        unpacked = scratch / "root"
        _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], cwd=scratch)
        (unpacked / ".complete").write_text(debs[-1].name + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)
    return target


def _rdata() -> Any:
    try:
        import rdata
    except ImportError as error:
        raise TextDataUnavailable(
            f"reading R data files needs the rdata package: pip install rdata ({error})"
        ) from error
    return rdata


def read_lazyload_db(data_dir: Path, name: str = "Rdata") -> dict[str, Any]:
    """All objects of an R lazy-load data base (``<name>.rdx`` index + ``<name>.rdb`` blobs).

    The index is a gzip'd RDS file listing (offset, length) per object; each blob in the .rdb is a
    4-byte big-endian length followed by a zlib stream of an R serialization.
    """
    rdata = _rdata()
    index_path, blob_path = data_dir / f"{name}.rdx", data_dir / f"{name}.rdb"
    if not index_path.is_file() or not blob_path.is_file():
        raise TextDataUnavailable(f"no R lazy-load data base {name}.rdx/.rdb in {data_dir}")
    blobs = blob_path.read_bytes()
    objects: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "assumed RDS" for every headerless stream; correct here
        index = rdata.conversion.convert(rdata.parser.parse_file(index_path))
        for key, (offset, length) in index["variables"].items():
            chunk = blobs[int(offset) : int(offset) + int(length)]
            (expected,) = struct.unpack(">I", chunk[:4])
            payload = zlib.decompress(chunk[4:])
            if len(payload) != expected:
                raise TextDataUnavailable(
                    f"{blob_path}: object {key} is corrupt ({len(payload)} != {expected} bytes)"
                )
            objects[str(key)] = rdata.conversion.convert(rdata.parser.parse_data(payload, expand_altrep=True))
    return objects


@lru_cache(maxsize=1)
def _austen_books() -> dict[str, list[str]]:
    root = debian_package_root(AUSTEN_PACKAGE)
    data = read_lazyload_db(root / _R_LIBRARY / "janeaustenr" / "data")
    return {name: [str(line) for line in lines] for name, lines in data.items()}


def austen_lines(book: str = "prideprejudice") -> list[str]:
    """The printed lines of one novel (title, chapter headings and blank lines included)."""
    books = _austen_books()
    if book not in books:
        raise KeyError(f"unknown Austen book {book!r}; known: {', '.join(sorted(books))}")
    return books[book]


def austen_text(book: str = "prideprejudice") -> str:
    """One novel as text: lines of a paragraph joined by spaces, paragraphs separated by blank lines."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in austen_lines(book):
        stripped = line.strip()
        if stripped:
            current.append(stripped)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


@lru_cache(maxsize=1)
def moby_dick_text() -> str:
    """Moby-Dick (public domain) from r-cran-tokenizers, chapters only: Project Gutenberg's header
    and licence footer are cut off; paragraphs separated by blank lines, their lines joined."""
    root = debian_package_root(MOBY_DICK_PACKAGE)
    data = read_lazyload_db(root / _R_LIBRARY / "tokenizers" / "data")
    if "mobydick" not in data:
        raise TextDataUnavailable(f"{MOBY_DICK_PACKAGE} has no mobydick data set (found {sorted(data)})")
    raw = str(data["mobydick"][0]).replace("\r\n", "\n")
    start = raw.find("CHAPTER 1. Loomings.")
    end = raw.find("End of Project Gutenberg")
    if start < 0 or end <= start:
        raise TextDataUnavailable(f"{MOBY_DICK_PACKAGE}: the mobydick text does not have the expected layout")
    paragraphs = [" ".join(p.split()) for p in raw[start:end].split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)
