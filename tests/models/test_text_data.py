"""Jane Austen's novels from Debian r-cran-janeaustenr (fetched by package name; skips visibly offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bct_onnx.models import text_data


@pytest.fixture(scope="module")
def books() -> dict[str, str]:
    try:
        return {book: text_data.austen_text(book) for book in text_data.AUSTEN_BOOKS}
    except text_data.TextDataUnavailable as error:
        pytest.skip(f"Austen text unavailable (needs apt-get download {text_data.AUSTEN_PACKAGE}): {error}")


def test_six_novels_with_their_openings(books: dict[str, str]) -> None:
    assert set(books) == set(text_data.AUSTEN_BOOKS)
    assert (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife." in books["prideprejudice"]
    )
    assert "Emma Woodhouse, handsome, clever, and rich" in books["emma"]
    assert all(len(text) > 300_000 for text in books.values())


def test_paragraphs_are_joined(books: dict[str, str]) -> None:
    paragraphs = books["prideprejudice"].split("\n\n")
    assert paragraphs[:2] == ["PRIDE AND PREJUDICE", "By Jane Austen"]
    assert all(p == p.strip() and "\n" not in p for p in paragraphs)


def test_unknown_book_is_named(books: dict[str, str]) -> None:
    with pytest.raises(KeyError, match=r"unknown Austen book 'ulysses'; known: emma"):
        text_data.austen_lines("ulysses")


def test_missing_database_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(
        text_data.TextDataUnavailable,
        match=rf"no R lazy-load data base Rdata.rdx/.rdb in {re.escape(str(tmp_path))}",
    ):
        text_data.read_lazyload_db(tmp_path)


def test_failed_download_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on PATH
    with pytest.raises(text_data.TextDataUnavailable, match=r"apt-get is not available"):
        text_data.debian_package_root("r-cran-janeaustenr", root=tmp_path)


def test_moby_dick_is_calibration_text_without_gutenberg_boilerplate() -> None:
    try:
        text = text_data.moby_dick_text()
    except text_data.TextDataUnavailable as error:
        pytest.skip(f"Moby-Dick unavailable (needs apt-get download {text_data.MOBY_DICK_PACKAGE}): {error}")
    assert text.startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert text.rstrip().endswith("only found another orphan.")
    assert "Gutenberg" not in text and len(text) > 1_000_000
    from bct_onnx.calibration import SAMPLE_WORDS, calibration_texts

    windows, max_tokens, description = calibration_texts("moby-dick")
    assert len(windows) == 64 and max_tokens == SAMPLE_WORDS and "Moby-Dick" in description
