"""Perplexity of a decoder-only ONNX export on a text, in numpy: without KV cache (the whole window per
call), or through a with-past export that carries its cache (float or compressed) from step to step.

Teacher forcing over strided windows, as in the transformers perplexity guide: each window of
``window`` tokens starts ``stride`` tokens after the previous one and scores only the tokens no
earlier window scored, so every token after the first is scored exactly once, with up to
``window - stride`` tokens of left context.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bct_onnx import kv_cache, runtime

LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with what it was computed from."""

    perplexity: float
    mean_nll: float  # nats per scored token
    scored_tokens: int
    windows: int


def _session(session_or_path: Any) -> Any:
    if isinstance(session_or_path, (str, os.PathLike)):
        return runtime.session(session_or_path, with_library=False)
    return session_or_path


def onnx_logits_fn(session_or_path: Any) -> LogitsFn:
    """Logits (1, T, vocab) for ids (1, T) from a no-past decoder graph (input_ids [+ mask, positions])."""
    session = _session(session_or_path)
    inputs = {i.name for i in session.get_inputs()}
    if any(name.startswith("past_key_values") for name in inputs):
        raise ValueError(
            "perplexity needs a decoder export without KV cache (task text-generation); "
            f"this graph has past_key_values inputs: {sorted(inputs)}"
        )
    output_names = [o.name for o in session.get_outputs()]
    logits_name = "logits" if "logits" in output_names else output_names[0]

    def run(ids: np.ndarray) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones_like(ids)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        unknown = inputs - feeds.keys()
        if unknown:
            raise ValueError(f"cannot feed decoder inputs {sorted(unknown)}")
        (logits,) = session.run([logits_name], feeds)
        return np.asarray(logits)

    return run


def step_feeds(inputs: set[str], ids: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """Decoder feeds for ids (1, S) at positions start..start+S-1 after ``start`` cached tokens."""
    feeds: dict[str, np.ndarray] = {"input_ids": ids}
    if "attention_mask" in inputs:
        feeds["attention_mask"] = np.ones((1, start + ids.shape[1]), dtype=np.int64)
    if "position_ids" in inputs:
        feeds["position_ids"] = np.arange(start, start + ids.shape[1], dtype=np.int64)[None, :]
    return feeds


def onnx_cached_logits_fn(session_or_path: Any, step_tokens: int = 1) -> LogitsFn:
    """Logits (1, T, vocab) for ids (1, T) from a with-past decoder graph, ``step_tokens`` tokens per call.

    Each window starts from an empty cache; every later call reads the cache the previous calls wrote
    (present.* fed back as past_key_values.*), float or compressed (bct_onnx.kv_cache), so with
    step_tokens=1 every prediction is a decode step that attends over the stored cache.
    """
    if step_tokens < 1:
        raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
    session = _session(session_or_path)
    declared = session.get_inputs()
    inputs = {i.name for i in declared}
    past = [i.name for i in declared if i.name.startswith(kv_cache.PAST_PREFIX)]
    if not past:
        raise ValueError(f"the KV-cache perplexity path needs past_key_values inputs; this graph has {sorted(inputs)}")
    output_names = [o.name for o in session.get_outputs()]
    present = [name.replace(kv_cache.PAST_PREFIX, kv_cache.PRESENT_PREFIX, 1) for name in past]
    missing = sorted(set(present) - set(output_names))
    if missing:
        raise ValueError(f"the graph lacks cache outputs {missing[:2]} for its inputs")
    logits_name = "logits" if "logits" in output_names else output_names[0]

    def run(ids: np.ndarray) -> np.ndarray:
        cache = kv_cache.empty_cache(declared)
        pieces = []
        for start in range(0, ids.shape[1], step_tokens):
            chunk = ids[:, start : start + step_tokens]
            outputs = session.run([logits_name, *present], {**step_feeds(inputs, chunk, start), **cache})
            pieces.append(np.asarray(outputs[0]))
            cache = dict(zip(past, outputs[1:], strict=True))
        return np.concatenate(pieces, axis=1)

    return run


def _window_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits)[target], computed in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    return float((log_norm - picked).sum())


def perplexity_of_ids(
    ids: Sequence[int] | np.ndarray, logits_fn: LogitsFn, window: int = 512, stride: int | None = None
) -> PerplexityResult:
    """Strided-window perplexity of token ``ids`` under any ``logits_fn`` (ONNX, torch, compressed ...)."""
    tokens = np.asarray(ids, dtype=np.int64).reshape(-1)
    if tokens.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {tokens.size}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    step = stride if stride is not None else window // 2
    if not 1 <= step < window:
        # stride == window would leave the first token of every window without context, unscored
        raise ValueError(f"stride must be in [1, window={window}), got {step}")
    total_nll, scored, windows = 0.0, 0, 0
    scored_until = 1  # token 0 has no left context and is never scored
    start = 0
    while scored_until < tokens.size:
        end = min(start + window, tokens.size)
        chunk = tokens[start:end]
        logits = logits_fn(chunk[None, :])[0]  # (len, vocab); position p predicts token start+p+1
        first = max(scored_until, start + 1)
        targets = tokens[first:end]
        total_nll += _window_nll(logits[first - start - 1 : end - start - 1], targets)
        scored += targets.size
        windows += 1
        scored_until = end
        start += step
    mean = total_nll / scored
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, scored_tokens=scored, windows=windows)


def tokenize_for_perplexity(tokenizer: Any, text: str, max_tokens: int | None) -> np.ndarray:
    """Token ids of ``text`` without special tokens, cut to ``max_tokens``."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return ids[:max_tokens] if max_tokens is not None else ids


def perplexity(
    session_or_path: Any,
    tokenizer: Any,
    text: str,
    max_tokens: int | None = 2048,
    window: int = 512,
    stride: int | None = None,
) -> float:
    """Perplexity of ``text`` (first ``max_tokens`` tokens) under a no-past decoder ONNX export."""
    ids = tokenize_for_perplexity(tokenizer, text, max_tokens)
    return perplexity_of_ids(ids, onnx_logits_fn(session_or_path), window=window, stride=stride).perplexity
