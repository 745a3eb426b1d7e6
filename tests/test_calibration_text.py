"""The shipped calibration text: what it holds, and that it never overlaps an evaluation text."""

from __future__ import annotations

import pytest
from bct_onnx.models.text_data import AUSTEN_BOOKS, TextDataUnavailable, austen_text

from bct_onnx import evaluate
from bct_onnx.calibration import SHIPPED_TEXT_FILES, calibration_text, calibration_texts


def test_shipped_text_holds_every_file_without_comment_lines() -> None:
    lines = calibration_text()
    assert len(SHIPPED_TEXT_FILES) == 2
    assert not any(line.startswith("#") or not line.strip() for line in lines)
    # The quotations come first, then the prose paragraphs (long lines: over 80 words each).
    assert lines[0].startswith("Four score and seven years ago")
    paragraphs = [line for line in lines if len(line.split()) > 80]
    assert len(paragraphs) >= 20
    assert calibration_texts("shipped")[0] == lines == calibration_texts("auto")[0]


@pytest.mark.parametrize("book", AUSTEN_BOOKS)
def test_shipped_text_shares_no_eight_word_run_with_austen(book: str) -> None:
    try:
        novel = austen_text(book)
    except (TextDataUnavailable, OSError) as error:
        pytest.skip(f"Austen text not available here: {error}")
    words = novel.split()
    runs = {tuple(words[i : i + 8]) for i in range(len(words) - 7)}
    for line in calibration_text():
        tokens = line.split()
        shared = [" ".join(tokens[i : i + 8]) for i in range(len(tokens) - 7) if tuple(tokens[i : i + 8]) in runs]
        assert not shared, f"calibration line shares {shared[0]!r} with {book}"
    evaluate._check_no_overlap(novel, "shipped")
