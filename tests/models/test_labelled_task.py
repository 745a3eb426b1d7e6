"""The Austen novel task (models/labelled_task.py): real sentences, disjoint splits, a head that learns."""

from __future__ import annotations

import numpy as np
import pytest
from bct_onnx.models import labelled_task
from bct_onnx.models.text_data import AUSTEN_BOOKS, TextDataUnavailable


@pytest.fixture(scope="module")
def task() -> labelled_task.LabelledTask:
    try:
        return labelled_task.austen_novel_task(train_per_novel=20, test_per_novel=5)
    except TextDataUnavailable as error:
        pytest.skip(f"Austen text not available: {error}")


def test_sentences_are_real_bounded_and_split_disjointly(task):
    assert len(task.train_texts) == 6 * 20 and len(task.test_texts) == 6 * 5
    assert not set(task.train_texts) & set(task.test_texts)
    assert np.bincount(task.test_labels).tolist() == [5] * 6
    for text in task.train_texts + task.test_texts:
        assert labelled_task.MIN_WORDS <= len(text.split()) <= labelled_task.MAX_WORDS
        assert "CHAPTER" not in text and "_" not in text
    assert task.label_names == AUSTEN_BOOKS
    again = labelled_task.austen_novel_task(train_per_novel=20, test_per_novel=5)
    assert again.test_texts == task.test_texts  # fixed seed: the same sentences every run


def test_sentences_of_a_novel_are_its_own():
    try:
        emma = labelled_task.austen_sentences("emma")
    except TextDataUnavailable as error:
        pytest.skip(f"Austen text not available: {error}")
    assert any("Emma" in sentence for sentence in emma[:50])
    assert not any("Elizabeth Bennet" in sentence for sentence in emma)


def test_logistic_head_separates_classes_and_score_reports_the_drop():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 3
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + rng.standard_normal((120, 8))
    head = labelled_task.train_logistic_head(features, labels, 3)
    assert head.accuracy(features, labels) > 0.95
    noisy = features + rng.standard_normal(features.shape) * 3
    result = labelled_task.score(head, features, noisy, labels)
    assert result.fp32_accuracy > result.compressed_accuracy
    assert result.drop_points == pytest.approx(100 * (result.fp32_accuracy - result.compressed_accuracy))
    assert 0 < result.mean_cosine < 1 and result.min_cosine <= result.mean_cosine
    identical = labelled_task.score(head, features, features, labels)
    assert identical.drop_points == 0 and identical.mean_cosine == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        labelled_task.train_logistic_head(features, labels + 5, 3)
