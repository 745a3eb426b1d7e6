"""A real labelled task for sentence encoders: which of Jane Austen's six novels a sentence is from.

The sentences come from Debian's r-cran-janeaustenr (models/text_data.py), split at sentence ends,
kept when 8..40 words long, and sampled per novel with a fixed seed into disjoint train and test
sets. A small head (multinomial logistic regression, numpy) is trained on the FP32 model's
sentence embeddings of the train set; the accuracy drop of a compressed model is the head's
accuracy on the compressed model's test embeddings against the same head on FP32's, in points,
as the BCT paper measures GLUE drops. The test sentences double as the evaluation set of the
embedding-cosine figure. None of this text is calibration text: the shipped calibration lines
and Moby-Dick contain no Austen (bct-onnx eval checks the overlap for perplexity text).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
from bct_onnx.models.text_data import AUSTEN_BOOKS, austen_text

MIN_WORDS = 8
MAX_WORDS = 40
DEFAULT_TRAIN_PER_NOVEL = 300
DEFAULT_TEST_PER_NOVEL = 100
# A sentence ends at . ! or ? followed by space and an upper-case letter or an opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_HEADING = re.compile(r"^(CHAPTER|VOLUME|Chapter)\b")


def austen_sentences(book: str) -> list[str]:
    """Sentences of one novel, MIN_WORDS..MAX_WORDS words long, in reading order, without headings."""
    sentences: list[str] = []
    for paragraph in austen_text(book).split("\n\n"):
        if _HEADING.match(paragraph):
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            words = sentence.split()
            if MIN_WORDS <= len(words) <= MAX_WORDS:
                sentences.append(" ".join(words).replace("_", ""))  # _word_ marks italics in the text
    return sentences


@dataclasses.dataclass(frozen=True)
class LabelledTask:
    """Disjoint train and test sentences with integer labels indexing label_names."""

    label_names: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray


def austen_novel_task(
    train_per_novel: int = DEFAULT_TRAIN_PER_NOVEL,
    test_per_novel: int = DEFAULT_TEST_PER_NOVEL,
    seed: int = 0,
) -> LabelledTask:
    """Sentences of the six novels labelled by novel, sampled without replacement (fixed seed)."""
    if train_per_novel < 1 or test_per_novel < 1:
        raise ValueError(f"train_per_novel and test_per_novel must be >= 1, got {train_per_novel}, {test_per_novel}")
    rng = np.random.default_rng(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, book in enumerate(AUSTEN_BOOKS):
        sentences = sorted(set(austen_sentences(book)))  # duplicates ("Yes." x 40) would leak across splits
        need = train_per_novel + test_per_novel
        if len(sentences) < need:
            raise ValueError(f"{book} has {len(sentences)} usable sentences, fewer than {need}")
        picked = rng.choice(len(sentences), size=need, replace=False)
        train += [(sentences[i], label) for i in picked[:train_per_novel]]
        test += [(sentences[i], label) for i in picked[train_per_novel:]]
    return LabelledTask(
        label_names=AUSTEN_BOOKS,
        train_texts=tuple(text for text, _ in train),
        train_labels=np.array([label for _, label in train], dtype=np.int64),
        test_texts=tuple(text for text, _ in test),
        test_labels=np.array([label for _, label in test], dtype=np.int64),
    )


@dataclasses.dataclass(frozen=True)
class LogisticHead:
    """Multinomial logistic regression on standardised features: softmax(((x - mean) / std) W + b)."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # [features, classes]
    bias: np.ndarray  # [classes]

    def logits(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        return z @ self.weights + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(features), axis=-1)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(features) == np.asarray(labels)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def train_logistic_head(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2: float = 1e-2,
    steps: int = 500,
    learning_rate: float = 0.5,
) -> LogisticHead:
    """Fit a LogisticHead by full-batch gradient descent with Nesterov momentum (deterministic).

    The loss is mean cross-entropy plus ``l2 / 2 * |W|^2``; it is convex, so the result depends only
    on the data and these settings.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be [n, d] and labels [n], got {x.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    mean = x.mean(axis=0)
    std = np.maximum(x.std(axis=0), 1e-8)
    z = (x - mean) / std
    onehot = np.eye(num_classes)[y]
    w = np.zeros((x.shape[1], num_classes))
    b = np.zeros(num_classes)
    w_prev, b_prev = w, b
    for step in range(1, steps + 1):
        momentum = (step - 1) / (step + 2)
        w_look = w + momentum * (w - w_prev)
        b_look = b + momentum * (b - b_prev)
        residual = (_softmax(z @ w_look + b_look) - onehot) / len(y)
        w_prev, b_prev = w, b
        w = w_look - learning_rate * (z.T @ residual + l2 * w_look)
        b = b_look - learning_rate * residual.sum(axis=0)
    return LogisticHead(mean, std, w, b)


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """FP32 against compressed on the test set: accuracies, drop in points, embedding cosines."""

    fp32_accuracy: float
    compressed_accuracy: float
    mean_cosine: float
    min_cosine: float
    test_sentences: int

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.fp32_accuracy - self.compressed_accuracy)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a with the same row of b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return np.sum(a * b, axis=-1) / norms


def score(
    head: LogisticHead, fp32_test: np.ndarray, compressed_test: np.ndarray, labels: Sequence[int] | np.ndarray
) -> TaskScore:
    """The head (trained on FP32 train features) on FP32's and the compressed model's test features."""
    labels = np.asarray(labels)
    cosines = row_cosines(fp32_test, compressed_test)
    return TaskScore(
        fp32_accuracy=head.accuracy(fp32_test, labels),
        compressed_accuracy=head.accuracy(compressed_test, labels),
        mean_cosine=float(cosines.mean()),
        min_cosine=float(cosines.min()),
        test_sentences=len(labels),
    )
