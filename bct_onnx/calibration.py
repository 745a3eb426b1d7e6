"""Calibration for GPTQ: the Hessian X^T X of every constant-weight MatMul's activation input.

The float model is run once through ONNX Runtime on a few calibration batches with each such
MatMul's activation input exposed as an extra graph output; the Hessians are summed in float64.
Only what GPTQ needs is kept ([K, K] float32 per activation), never the activations themselves.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import heapq
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bct_onnx import model_io, ops, runtime
from bct_onnx.errors import BctOnnxError
from bct_onnx.models.text_data import TextDataUnavailable, moby_dick_text
from bct_onnx.text_files import TextFileError, dataset_texts, is_dataset, is_jsonl, jsonl_texts

logger = logging.getLogger(__name__)

MatMulKey = tuple[str, str]  # (activation input name, weight initializer name)


DEFAULT_DAMPING = 0.01  # GPTQ's damping (the paper's) for calibration inputs given by the caller
# GPTQ's damping for text calibration (text_feeds): the shipped text (about 7k tokens) describes an
# evaluation text loosely, so GPTQ trusts its Hessians less (docs/results.md, "Calibration text and Hessians").
TEXT_DAMPING = 0.1


class CalibrationError(BctOnnxError, ValueError):
    """Calibration inputs do not fit the model, or the float model cannot run on them."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration batches: each a dict of input name -> numpy array, as fed to ONNX Runtime."""

    feeds: tuple[Mapping[str, np.ndarray], ...]
    # GPTQ's damping (a fraction of the Hessian's mean diagonal added to it). Made-up inputs
    # (bct_onnx.synthetic_calibration) describe the real ones loosely: more damping trusts them less.
    damping: float = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        if not self.feeds:
            raise CalibrationError("calibration needs at least one batch of inputs")
        if not self.damping > 0:
            raise CalibrationError(f"calibration damping must be > 0, got {self.damping!r}")


# Shipped calibration lines: short public-domain quotations, then original paragraphs of prose
# (about 120 tokens each) that give the Hessians longer contexts and more tokens than the inputs of
# a decoder's down projection (docs/results.md, "Calibration text and Hessians").
SHIPPED_TEXT_FILES = ("data/calibration_text.txt", "data/calibration_prose.txt")


def calibration_text() -> list[str]:
    """English lines shipped for calibration (never the demo's or eval's evaluation text)."""
    lines = []
    for name in SHIPPED_TEXT_FILES:
        text = resources.files("bct_onnx").joinpath(name).read_text(encoding="utf-8")
        lines += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return lines


# Calibration text sources: a path to a UTF-8 file, or one of these names ("auto" = "shipped").
TEXT_SOURCES = ("auto", "shipped", "moby-dick")
# Long texts are cut into up to SAMPLES windows of SAMPLE_WORDS words (at most as many tokens each).
# Calibrate on text like what the model will see (docs/results.md compares the sources).
SAMPLES = 64
SAMPLE_WORDS = 256
# The shipped lines are under 150 tokens each; a decoder's packed rows of 1024 tokens give its attention
# the longer contexts it sees in use, and fewer row starts (whose first positions carry outsized
# activations) weigh on its Hessians (docs/results.md, "Calibration text and Hessians": rows of 128,
# 512, 1024 and 2048 compared on two texts).
SHIPPED_MAX_TOKENS = 1024
# Tokens of packed rows per calibration batch: the Hessians are sums over rows, so the batching changes
# nothing but float32 rounding, while a decoder's attention scores (rows x heads x length^2 floats, 36 MiB
# a row of 1024 tokens for SmolLM2's 9 heads, several alive at once) grow with the rows of a run.
PACKED_BATCH_TOKENS = 1024


def calibration_texts(source: str = "auto") -> tuple[list[str], int, str]:
    """(texts, max tokens per text, description) of a calibration source.

    "auto" / "shipped": public-domain quotations and original prose inside the package; "moby-dick":
    windows of Melville's novel from Debian's r-cran-tokenizers (fetched once with apt-get download, then
    cached); a .jsonl file: its records' "text" fields; a .parquet / .arrow file or a
    save_to_disk directory: its "text" column (needs `datasets`); any other file: windows of UTF-8 text.
    """
    if source in ("auto", "shipped"):
        return calibration_text(), SHIPPED_MAX_TOKENS, "shipped calibration text"
    if source == "moby-dick":
        try:
            text = moby_dick_text()
        except (TextDataUnavailable, OSError) as error:
            raise CalibrationError(f"calibration text moby-dick is not available: {error}") from error
        return text_windows(text), SAMPLE_WORDS, "Moby-Dick (Debian r-cran-tokenizers)"
    path = Path(source)
    if is_jsonl(path) or is_dataset(path):
        try:
            records = jsonl_texts(path, SAMPLES) if is_jsonl(path) else dataset_texts(path, SAMPLES)
        except TextFileError as error:
            raise CalibrationError(str(error)) from error
        return records, SAMPLE_WORDS, f"{len(records)} records of {path}"
    if not path.is_file():
        raise CalibrationError(
            f"calibration text {source!r} is neither a file nor one of {', '.join(TEXT_SOURCES)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationError(f"cannot read calibration text file {path}: {error}") from error
    if not text.split():
        raise CalibrationError(f"calibration text file {path} is empty")
    return text_windows(text), SAMPLE_WORDS, f"file {path}"


def text_windows(text: str, samples: int = SAMPLES, words: int = SAMPLE_WORDS) -> list[str]:
    """Up to ``samples`` windows of ``words`` consecutive words, spread evenly over the text."""
    tokens = text.split()
    count = max(1, len(tokens) // words)
    picks = np.linspace(0, count - 1, num=min(samples, count)).round().astype(int)
    return [" ".join(tokens[i * words : (i + 1) * words]) for i in sorted(set(picks.tolist()))]


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
PAST_PREFIX = "past_key_values"  # optimum's KV-cache inputs: fed empty (no past) during calibration


def text_feeds(
    model: ir.Model, tokenizer: Any, texts: Sequence[str] | None = None, max_length: int = 128, batch_size: int = 8
) -> Calibration:
    """Calibration batches for a text model (encoder or decoder) from its tokenizer.

    Fills input_ids, attention_mask, token_type_ids and position_ids as the graph declares them, and
    a decoder's KV-cache inputs (past_key_values.*) with an empty cache (past length 0). Raises
    CalibrationError naming any other input, since text alone cannot fill it.
    """
    texts = list(texts) if texts is not None else calibration_text()
    unknown = [
        v.name for v in model.graph.inputs if v.name not in TEXT_INPUTS and not v.name.startswith(PAST_PREFIX)
    ]
    if unknown:
        raise CalibrationError(f"cannot build calibration inputs from text for graph inputs {unknown}")
    if getattr(tokenizer, "pad_token", "") is None:
        # Decoder tokenizers often have no pad token (SmolLM2, GPT-2): the texts are packed into
        # sequences of equal length instead, so no pad rows enter the Hessians (packed_token_ids).
        rows_per_batch = min(batch_size, max(1, PACKED_BATCH_TOKENS // max_length))
        encodings = [
            {"input_ids": rows, "attention_mask": np.ones_like(rows)}
            for rows in packed_token_ids(tokenizer, texts, max_length, rows_per_batch)
        ]
    else:
        encodings = [
            tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="np")
            for start in range(0, len(texts), batch_size)
        ]
    return Calibration(tuple(_text_batch(model, enc) for enc in encodings), damping=TEXT_DAMPING)


def packed_token_ids(tokenizer: Any, texts: Sequence[str], length: int, batch_size: int) -> list[np.ndarray]:
    """The texts' tokens (each text up to ``length`` tokens, ended by a newline) run together and cut
    into sequences of ``length``, ``batch_size`` a batch: [rows, length] arrays, the last one shorter.

    Packing, as GPTQ cuts its calibration corpus into segments, fills every position up to ``length``
    whatever the texts' lengths, and one batch runs many texts: short texts one at a time cost one
    run of the model per text.
    """
    pieces = [
        np.asarray(tokenizer([text + "\n"], padding=False, truncation=True, max_length=length, return_tensors="np")[
            "input_ids"
        ]).reshape(-1)
        for text in texts
    ]
    ids = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)
    if ids.size == 0:
        raise CalibrationError("the calibration texts hold no tokens")
    full = ids.size // length
    sequences = [ids[i * length : (i + 1) * length] for i in range(full)]
    batches = [np.stack(sequences[i : i + batch_size]) for i in range(0, full, batch_size)]
    if ids.size > full * length:
        batches.append(ids[full * length :].reshape(1, -1))
    return batches


def _text_batch(model: ir.Model, enc: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's inputs for one tokenized batch (input_ids, attention_mask [, token_type_ids])."""
    batch, seq = enc["input_ids"].shape
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        if value.name.startswith(PAST_PREFIX):
            feeds[value.name] = _empty_cache(value, batch)
            continue
        if value.name == "position_ids":
            feeds["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif value.name == "token_type_ids" and "token_type_ids" not in enc:
            feeds[value.name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        else:
            feeds[value.name] = np.asarray(enc[value.name])
        if value.dtype == ir.DataType.INT32:
            feeds[value.name] = feeds[value.name].astype(np.int32)
        else:
            feeds[value.name] = feeds[value.name].astype(np.int64)
    return feeds


def _empty_cache(value: ir.Value, batch: int) -> np.ndarray:
    """A KV-cache input with ``batch`` rows and no past: symbolic dimensions after the batch are 0."""
    dims = list(value.shape) if value.shape is not None else []
    shape = [batch, *(dim if isinstance(dim, int) else 0 for dim in dims[1:])]
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    return np.zeros(shape, dtype=dtype)


def constant_weight_matmuls(model: ir.Model) -> dict[MatMulKey, int]:
    """(activation name, weight name) -> K for MatMuls whose second input is a constant 2-D float weight.

    A weight reached through Transpose(perm=[1, 0]) of a constant [N, K] (a tied embedding table used
    as the output projection) is keyed by that constant's name, as QuantizeMatMulPass keys it.
    """
    found: dict[MatMulKey, int] = {}
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        act, weight = node.inputs
        if act is None or weight is None:
            continue
        k_axis = 0
        if weight.const_value is None:
            weight, k_axis = _transposed_constant(weight), 1
            if weight is None:
                continue
        assert weight.const_value is not None
        shape = weight.const_value.shape
        if len(shape) != 2 or weight.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        found[(act.name or "", weight.name or "")] = int(shape[k_axis])
    return found


def _transposed_constant(value: ir.Value) -> ir.Value | None:
    """The constant 2-D value behind Transpose(perm=[1, 0]) (or no perm), else None."""
    producer = value.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    perm = producer.attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    inner = producer.inputs[0]
    if inner is None or inner.const_value is None or inner.is_graph_input():
        return None
    return inner


def model_session(model: ir.Model, providers: Iterable[str] = ("CPUExecutionProvider",)) -> Any:
    """An ONNX Runtime session of an in-memory model of any size, opened from any working directory.

    The model is saved to a temporary file with external data first (onnx_ir reads a model's own
    external tensors from their folder, never from the working directory). An already partly
    compressed model needs our ops; a float model runs without the library.
    """
    with_library = any(node.domain == ops.DOMAIN for node in model.graph)
    with tempfile.TemporaryDirectory(prefix="bct_onnx_session_") as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir.save(model, path, external_data="model.onnx.data")
        return runtime.session(path, list(providers), with_library=with_library, quiet=True)


# A calibration session holds at most about this many bytes of weights, or one node's weights when
# that is larger: the float model runs in segments (consecutive nodes in topological order).
SEGMENT_BYTES = 64 << 20


class HessianStore(Mapping[MatMulKey, np.ndarray]):
    """Hessians written to a temporary folder as they are finished, read back one at a time on access.

    A decoder's Hessians together can outweigh its weights (SmolLM2-135M: 0.4 GB of float32 [K, K]
    arrays for a 0.54 GB model); on disk they cost no memory until QuantizeMatMulPass asks for one.
    While a background collection runs (collect_hessians(background=True)), asking for a Hessian still
    to come waits for it, so GPTQ rounds the first layers while the float model runs the last ones.
    close() stops a collection still running and removes the folder.
    """

    def __init__(self, targets: Mapping[MatMulKey, int] | None = None) -> None:
        """targets: (activation, weight) -> K of the MatMuls whose Hessians will be added (bound
        to their activation's Hessian when it is added and is [K, K]); others are bound by bind()."""
        self._folder = tempfile.TemporaryDirectory(prefix="bct_onnx_hessians_")
        self._files: dict[str, Path] = {}  # activation name -> its Hessian's .npy file
        self._keys: dict[MatMulKey, str] = {}
        self._last: tuple[Path, np.ndarray] | None = None  # the Hessian read last
        self._targets: dict[str, list[tuple[MatMulKey, int]]] = {}
        for key, k in (targets or {}).items():
            self._targets.setdefault(key[0], []).append((key, k))
        self._changed = threading.Condition()
        self._running = False  # a background collection adds Hessians
        self._cancelled = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.seconds = 0.0  # wall time of the collection

    def add(self, activation: str, hessian: np.ndarray) -> None:
        path = Path(self._folder.name) / f"{len(self._files)}.npy"
        np.save(path, hessian)
        with self._changed:
            self._files[activation] = path
            for key, k in self._targets.get(activation, ()):
                if hessian.shape == (k, k):
                    self._keys[key] = activation
            self._changed.notify_all()

    def has(self, activation: str) -> bool:
        return activation in self._files

    def retarget(self, targets: Mapping[MatMulKey, int]) -> str | None:
        """Hand out Hessians to the MatMuls of a model derived from the measured one instead (its
        canonical form, whose passes keep the meaning of every value they keep); None when done, else
        why not (an activation not measured here, or measured with another K): the store is unchanged.

        The Hessian depends on the activation alone, so (activation, weight) keys whose weight was
        renamed or folded still find it by the activation's name.
        """
        measured = {activation: k for activation, keys in self._targets.items() for _, k in keys}
        for (activation, _), k in targets.items():
            if activation not in measured:
                return f"activation {activation!r} was not measured"
            if measured[activation] != k:
                return f"activation {activation!r} was measured with K={measured[activation]}, not {k}"
        with self._changed:
            self._targets = {}
            for key, k in targets.items():
                self._targets.setdefault(key[0], []).append((key, k))
            self._keys = {}
            for activation, path in self._files.items():
                for key, k in self._targets.get(activation, ()):
                    if _npy_shape(path) == (k, k):
                        self._keys[key] = activation
            self._changed.notify_all()
        return None

    def bind(self, key: MatMulKey, k: int) -> None:
        """Make key (activation, weight) read its activation's Hessian when that is [k, k]."""
        path = self._files.get(key[0])
        if path is not None and _npy_shape(path) == (k, k):
            self._keys[key] = key[0]

    def __getitem__(self, key: MatMulKey) -> np.ndarray:
        with self._changed:  # a Hessian still to come: wait for it (or for the collection's end)
            while self._running and key[0] in self._targets and key[0] not in self._files:
                self._changed.wait()
            self._raise_error()
            path = self._files[self._keys[key]]
        # MatMuls reading one activation get the same array object, one after the other, and GPTQ
        # factors it once (gptq._FactorOfLastHessian); read-only, since it is shared.
        if self._last is None or self._last[0] != path:
            self._last = None  # drop the previous Hessian before reading the next
            array = np.load(path)
            array.flags.writeable = False
            self._last = (path, array)
        return self._last[1]

    def __iter__(self) -> Iterator[MatMulKey]:
        self.wait()
        return iter(self._keys)

    def __len__(self) -> int:
        self.wait()
        return len(self._keys)

    def wait(self) -> float:
        """Wait for a background collection to end; raise its error, if any. The collection's seconds."""
        with self._changed:
            while self._running:
                self._changed.wait()
            self._raise_error()
        return self.seconds

    def _raise_error(self) -> None:
        if self._error is not None:
            raise CalibrationError(f"calibration failed: {self._error}") from self._error

    def _start(self, collect: Callable[[], None]) -> None:
        """Run collect() on a thread of its own; Hessians asked for meanwhile are waited for."""
        self._running = True
        self._thread = threading.Thread(target=self._collect, args=(collect,), name="bct_onnx_hessians", daemon=True)
        self._thread.start()

    def _collect(self, collect: Callable[[], None]) -> None:
        from bct_onnx.gptq import CORE_SHARING

        start = time.perf_counter()
        try:
            with CORE_SHARING.busy():  # GPTQ, rounding the Hessians handed out meanwhile, takes one thread
                collect()
        except _Cancelled:
            pass
        except Exception as error:  # noqa: BLE001  (handed to the thread that asks for a Hessian)
            self._error = error
        finally:
            with self._changed:
                self.seconds = time.perf_counter() - start
                self._running = False
                self._changed.notify_all()

    def _check_cancelled(self) -> None:
        if self._cancelled:
            raise _Cancelled

    def close(self) -> None:
        self._cancelled = True
        if self._thread is not None:
            self._thread.join()
        self._last = None
        self._folder.cleanup()


class _Cancelled(Exception):
    """The store was closed while its background collection ran."""


def _npy_shape(path: Path) -> tuple[int, ...]:
    return tuple(np.load(path, mmap_mode="r").shape)  # the header only: no data is read


def collect_hessians(
    model: ir.Model,
    calibration: Calibration,
    providers: Iterable[str] = ("CPUExecutionProvider",),
    segment_bytes: int = SEGMENT_BYTES,
    background: bool = False,
    model_file: str | os.PathLike[str] | None = None,
) -> HessianStore:
    """Sum of x^T x over all calibration rows x of each constant-weight MatMul's activation input.

    The model is saved once to a temporary file with external data and run segment by segment:
    consecutive nodes (topological order) holding at most ``segment_bytes`` of weights (or one node's
    weights when they are more) form one ONNX Runtime session, run on every calibration batch; the values
    crossing into later segments are kept (for all batches) until their last reader has run, and
    the Hessians of the segment's MatMuls are finished and written to disk before the next segment
    loads. So memory holds one segment's weights, its Hessians and the activations between
    segments, never the whole float model. Each batch adds its rows to the float32 Hessians with one
    symmetric rank-k update (BLAS syrk) on one BLAS thread (see gptq.py), on a worker thread while ONNX
    Runtime runs the next batch. MatMuls reading the same activation share one Hessian.

    background: return once the model is saved and run the segments on a thread: the store hands
    out each Hessian as soon as its segment has finished (HessianStore.wait() waits for the end).
    The model may be changed meanwhile; its saved copy is what runs.
    model_file: the file model was loaded from, unchanged since (model_io.load): its graph is read from
    the file and the sessions map its weights from there, so nothing is saved (a 0.5 GB model is not
    written again before the first batch can run).
    """
    targets = constant_weight_matmuls(model)
    store = HessianStore(targets)
    if not targets:
        return store
    folder = tempfile.TemporaryDirectory(prefix="bct_onnx_calib_")
    try:
        if model_file is not None:
            proto, data_folder = _file_graph(Path(model_file)), str(Path(model_file).absolute().parent)
        else:
            path = os.path.join(folder.name, "model.onnx")
            ir.save(model, path, external_data="model.onnx.data", max_workers=1, max_in_flight_bytes=1 << 26)
            proto, data_folder = onnx.load(path, load_external_data=False), folder.name
    except BaseException:
        folder.cleanup()
        store.close()
        raise

    try:
        # Planned here, not on the collection's thread: this Python work would contend for the GIL with
        # the caller's (canonicalization) and delay the first session.
        plan = _plan_segments(
            proto, data_folder, {activation for activation, _ in targets}, segment_bytes, _longest_axis(calibration)
        )
    except BaseException:
        folder.cleanup()
        store.close()
        raise

    def collect() -> None:
        try:
            _run_segments(proto, data_folder, plan, calibration, list(providers), store, _forward_threads(background))
        finally:
            folder.cleanup()
        logger.info("calibration: Hessians for %d MatMul weights from %d batches", len(store._keys), len(calibration.feeds))

    if background:
        store._start(collect)
        return store
    start = time.perf_counter()
    try:
        collect()
    except BaseException:
        store.close()
        raise
    store.seconds = time.perf_counter() - start
    return store


def _forward_threads(background: bool) -> int | None:
    """ONNX Runtime's intra-op threads for the calibration forward: in the background, one core fewer
    than the machine has (GPTQ rounds on the calling thread meanwhile), else its default (every core).

    A second ONNX Runtime thread on a 2-core machine whose other core GPTQ and the Hessian updates keep
    busy is woken and put to sleep for every op of thousands per run: SmolLM2's compile, alternating
    on a loaded machine, 46.4 against 51.6 s of CPU and 47.0 against 50.0 s wall with one thread.
    """
    return max(1, (os.cpu_count() or 1) - 1) if background else None


def _file_graph(model_file: Path) -> onnx.ModelProto:
    """The model in model_file, its large inline weights as references into the file (not read)."""
    detached = model_io.model_bytes_without_weights(model_file)
    if detached is None:
        return onnx.load(str(model_file), load_external_data=False)
    return onnx.ModelProto.FromString(detached)


def _node_names(node: onnx.NodeProto) -> tuple[list[str], list[str]]:
    """(names the node reads, names it writes); empty optional inputs left out."""
    return [name for name in node.input if name], [name for name in node.output if name]


# (reads, writes) of every node of a graph, by index (_node_names of each): the planning walks the nodes
# a dozen times (SmolLM2: 7365 nodes, 95k calls of _node_names).
_NodeIO = list[tuple[list[str], list[str]]]


def _graph_io(graph: onnx.GraphProto) -> _NodeIO:
    return [_node_names(node) for node in graph.node]


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node for attr in node.attribute)


def _topological_order(graph: onnx.GraphProto, io: _NodeIO | None = None) -> list[int]:
    """Node indices in a topological order that keeps the file's order where it already is one."""
    io = _graph_io(graph) if io is None else io
    producer = {name: i for i, (_, writes) in enumerate(io) for name in writes}
    waiting = [sum(1 for name in set(reads) if name in producer) for reads, _ in io]
    readers: dict[int, list[int]] = {}
    for i, (reads, _) in enumerate(io):
        for name in set(reads):
            if name in producer:
                readers.setdefault(producer[name], []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for reader in readers.get(i, ()):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(graph.node):
        raise CalibrationError("the float model's graph has a cycle; it cannot be run for calibration")
    return order


def _needed_nodes(graph: onnx.GraphProto, order: list[int], wanted: set[str], io: _NodeIO | None = None) -> list[int]:
    """The nodes of order (topological) that the values in wanted depend on, in that order.

    ONNX Runtime runs every node of a session, also those whose outputs nobody reads: a decoder's
    output projection (49152 x 576 for SmolLM2, a sixth of the forward's FLOPs and a logits tensor
    of 0.2 GB per 1024 tokens) would run for nothing, since no Hessian needs the logits.
    """
    io = _graph_io(graph) if io is None else io
    needed_values = set(wanted)
    kept = []
    for i in reversed(order):
        reads, writes = io[i]
        if any(name in needed_values for name in writes):
            kept.append(i)
            needed_values.update(reads)
    return kept[::-1]


def _segments(graph: onnx.GraphProto, segment_bytes: int, wanted: set[str], io: _NodeIO | None = None) -> list[list[int]]:
    """The nodes the values in wanted depend on, cut into runs of consecutive nodes (topological
    order) holding at most segment_limit(...) of weights, or one node's weights when they are more."""
    io = _graph_io(graph) if io is None else io
    sizes = {tensor.name: _tensor_bytes(tensor) for tensor in graph.initializer}
    if _has_subgraphs(graph):  # subgraphs read outer values implicitly: run the model whole
        return [_topological_order(graph, io)]
    order = _needed_nodes(graph, _topological_order(graph, io), wanted, io)
    # The forward's work per node, as the weight bytes of its MatMuls (a Gather's table costs no FLOPs).
    work = [
        0 if graph.node[i].op_type == "Gather" else sum(sizes[name] for name in set(io[i][0]) if name in sizes)
        for i in order
    ]
    segments: list[list[int]] = [[]]
    held: set[str] = set()
    done, current = 0, 0  # work in the segments closed, and in the current one
    limit = segment_limit(done, sum(work), segment_bytes)
    for i, node_work in zip(order, work):
        weights = {name for name in io[i][0] if name in sizes} - held
        # A node whose own weights are more than the limit (an embedding table) gets a segment of its own.
        if segments[-1] and sum(sizes[name] for name in held | weights) > limit:
            done, current = done + current, 0
            limit = segment_limit(done, sum(work) - done, segment_bytes)
            segments.append([])
            held = set()
        segments[-1].append(i)
        held |= {name for name in io[i][0] if name in sizes}
        current += node_work
    return segments


# The smallest segment limit: about one decoder layer of a small model (SmolLM2-135M's: 14 MB).
SMALLEST_SEGMENT_BYTES = 16 << 20


def segment_limit(done: int, rest: int, segment_bytes: int = SEGMENT_BYTES) -> int:
    """The weight bytes the next segment may hold, with done bytes of MatMul weights run in the
    segments before it and rest still to run (it included): segment_bytes at most, and no more than
    done (nor than half of rest) once above SMALLEST_SEGMENT_BYTES.

    A segment's Hessians are finished only when it has run on every batch: small first segments let
    GPTQ start on the first layers soon after the forward does, and small last segments leave it
    little to round once the forward has ended. The middle segments are large: each one is a session
    to create.
    """
    return min(segment_bytes, max(SMALLEST_SEGMENT_BYTES, min(done, rest // 2)))


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return tensor.ByteSize()


@dataclasses.dataclass(frozen=True)
class _Segment:
    """One calibration session's part of the graph, and what crosses its borders."""

    nodes: list[int]
    inputs: list[str]  # values it reads that graph inputs or earlier segments give
    outputs: list[str]  # values later segments read, and the activations of its Hessians it computes
    later: set[str]  # its values that later segments read: kept for every batch
    acts: list[str]  # the activations whose Hessians it finishes
    guards: _NanGuards
    checks: list[str]  # outputs inspected for NaN, besides outputs (guards.checks)
    causal: tuple[_CausalAttention, ...] = ()  # attentions its session computes in causal blocks
    masks: list[str] = dataclasses.field(default_factory=list)  # their masks, inspected on every batch


@dataclasses.dataclass(frozen=True)
class _SegmentPlan:
    segments: list[_Segment]  # up to the last one that finishes a Hessian
    graph_inputs: set[str]
    last_reader: dict[str, int]  # value name -> index of the last segment reading it


def _plan_segments(
    proto: onnx.ModelProto, folder: str, wanted: set[str], segment_bytes: int, longest: int = 0
) -> _SegmentPlan:
    """Cut the graph into segments (_segments) and work out what each one reads, keeps and finishes;
    longest: the longest axis of the calibration inputs (_longest_axis), for causal blocks."""
    graph = proto.graph
    io = _graph_io(graph)
    scalars = _ScalarTensors(graph, folder)
    node_sets = _segments(graph, segment_bytes, wanted, io)
    initializers = {tensor.name for tensor in graph.initializer}
    graph_inputs = {value.name for value in graph.input} - initializers
    # The last segment that reads each value: a kept value is dropped after it.
    last_reader: dict[str, int] = {}
    # The activations whose Hessians each segment finishes: those it computes (graph inputs: the first).
    targets_in: list[set[str]] = [set() for _ in node_sets]
    targets_in[0] = wanted & graph_inputs
    for index, nodes in enumerate(node_sets):
        for i in nodes:
            reads, writes = io[i]
            for name in reads:
                last_reader[name] = index
            targets_in[index].update(wanted.intersection(writes))
    last_segment = max((i for i, acts in enumerate(targets_in) if acts), default=-1)
    readers: dict[str, list[int]] = {}
    for i, (reads, _) in enumerate(io):
        for name in set(reads):
            readers.setdefault(name, []).append(i)
    segments = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    for index, nodes in enumerate(node_sets[: last_segment + 1]):
        produced = {name for i in nodes for name in io[i][1]}
        read = [name for i in nodes for name in io[i][0]]
        inputs = sorted({name for name in read if name not in produced and name not in initializers})
        later = {name for name in produced if last_reader.get(name, -1) > index}
        acts = sorted(targets_in[index])
        outputs = sorted(later | (set(acts) & produced))
        guards = _softmax_nan_guards(graph, nodes, readers, set(outputs) | wanted, folder, io, scalars)
        checks = [name for name in guards.checks if name not in outputs]
        causal = _causal_attentions(
            graph, nodes, readers, set(outputs) | wanted, folder, guards, longest if opset >= 13 else 0, io, scalars
        )
        masks = list(dict.fromkeys(c.mask for c in causal if c.mask not in outputs and c.mask not in checks))
        segments.append(_Segment(nodes, inputs, outputs, later, acts, guards, checks, causal, masks))
    return _SegmentPlan(segments, graph_inputs, last_reader)


def _run_segments(
    proto: onnx.ModelProto,
    folder: str,
    plan: _SegmentPlan,
    calibration: Calibration,
    providers: list[str],
    store: HessianStore,
    threads: int | None = None,
) -> None:
    """Run the float model segment by segment (plan) on every batch, adding finished Hessians to store;
    folder holds the data files of proto's external tensors; threads: ONNX Runtime's intra-op threads
    (None: its default, every core)."""
    import onnxruntime as ort

    from bct_onnx.gptq import blas_controller

    graph = proto.graph
    options = ort.SessionOptions()
    # Calibration batches are short: spinning worker threads would burn CPU waiting for work.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    # The arena reuses a run's large intermediates (a decoder's attention scores) from node to node and
    # from batch to batch; without it each is a fresh mmap whose pages the kernel zeroes on first touch
    # (SmolLM2 on 7k tokens: about a third more CPU time, most of it in the kernel).
    options.enable_cpu_mem_arena = True
    # No memory pattern (one block planned for all of a run's intermediates): the arena alone reuses
    # them, and a segment's peak is about a sixth lower (SmolLM2: 0.58 against 0.70 GB).
    options.enable_mem_pattern = False
    # Sessions are opened from bytes: their weights are mapped from the data files in this folder.
    options.add_session_config_entry(model_io.EXTERNAL_DATA_FOLDER_KEY, folder)
    # One arena for every segment's session (registered once on ONNX Runtime's environment): each new
    # session would otherwise grow an arena of its own and fault in its pages again (SmolLM2: about
    # 0.8 s of system time over 12 segments). The last run hands what it no longer uses back.
    _register_shared_arena(ort)
    options.add_session_config_entry("session.use_env_allocators", "1")
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    with_library = any(node.domain == ops.DOMAIN for node in graph.node)
    kept: dict[str, list[np.ndarray]] = {}  # value name -> one array per batch
    feeds = [dict(batch) for batch in calibration.feeds]
    graph_inputs, last_reader = plan.graph_inputs, plan.last_reader
    causal_ok = True  # no batch has shown an attention mask that is not causal (_CausalAttention)
    def open_session(index: int, causal_ok: bool, kept: dict[str, list[np.ndarray]]) -> tuple[Any, tuple[Any, ...], list[str]]:
        """The session of segment index (None when it need not run), its causal attentions, its output names."""
        part = plan.segments[index]
        causal = part.causal if causal_ok and part.outputs else ()
        shown = [name for attention in causal for name in attention.shapes]
        shown += [name for name in part.masks if name not in part.inputs] if causal else []
        names = part.outputs + part.checks + shown
        # No outputs needed: the segment's Hessians (if any) are of its inputs, nothing need run.
        session = (
            _segment_session(
                proto, index, part.nodes, part.inputs, names, kept, options, providers, with_library, part.guards,
                causal,
            )
            if part.outputs
            else None
        )
        return session, causal, names

    # The next segment's session is opened on a thread of its own once this segment's last batch has run (ONNX
    # Runtime builds it without the GIL), while this thread waits for the last batch's Hessian updates and
    # finishes the segment's Hessians: it then goes on to the next segment without waiting for a session.
    opening: tuple[int, bool, Future[tuple[Any, tuple[Any, ...], list[str]]]] | None = None
    with blas_controller().limit(limits=1, user_api="blas"), ThreadPoolExecutor(1) as accumulator, \
            ThreadPoolExecutor(1) as opener:
        for index, part in enumerate(plan.segments):
            segment, inputs, outputs, later, acts = part.nodes, part.inputs, part.outputs, part.later, part.acts
            guards = part.guards
            if opening is not None and opening[:2] == (index, causal_ok):
                session, causal, names = opening[2].result()
            else:  # not opened ahead, or opened before a batch showed a mask that is not causal
                if opening is not None:
                    opening[2].cancel()  # dropped (if it runs already, it ends on the opener's thread)
                session, causal, names = open_session(index, causal_ok, kept)
            opening = None
            exact_session = None  # the segment as the model has it, for a batch whose softmax gave NaN
            sums = _HessianSums()
            # One batch's rank-k updates run on the worker while ONNX Runtime runs the next batch:
            # the one worker takes them in order, so the sums are those of a serial loop.
            adding: Future[None] | None = None
            for b, batch in enumerate(feeds):
                store._check_cancelled()
                run_feeds = {name: (batch[name] if name in graph_inputs else kept[name][b]) for name in inputs}
                try:
                    last_run = index == len(plan.segments) - 1 and b == len(feeds) - 1
                    exact = session is None
                    values = {}
                    if session is not None:
                        try:
                            values = dict(zip(names, session.run(names, run_feeds, shrink if last_run else None)))
                        except Exception:  # a mask the blocks cannot slice: run the model's segment
                            if not causal:
                                raise
                            values, exact = {}, True
                    if causal and not exact and not all(
                        _causal_mask(values.get(a.mask, run_feeds.get(a.mask)), values.get(a.shapes[0]),
                                     values.get(a.shapes[1]))
                        for a in causal
                    ):
                        exact = True
                    if causal and exact:
                        # Not causal: this batch and the rest (of every later segment too) run as the model has it.
                        logger.info("calibration: an attention mask is not causal; attention computed in full")
                        causal_ok, session, causal = False, None, ()
                    exact = exact or any(np.isnan(values[name]).any() for name in guards.checks)
                    if exact and outputs:
                        if exact_session is None:
                            exact_session = _segment_session(
                                proto, index, segment, inputs, outputs, kept, options, providers, with_library
                            )
                        values = dict(zip(outputs, exact_session.run(outputs, run_feeds)))
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise CalibrationError(f"running the float model on calibration inputs failed: {exc}") from exc
                if adding is not None:
                    adding.result()  # at most one batch's activations wait for the worker
                adding = accumulator.submit(
                    sums.add_all, [(name, values[name] if name in values else batch[name]) for name in acts]
                )
                for name in later:
                    # A copy: ONNX Runtime's outputs may live in the session's arena and would keep all of
                    # it (hundreds of MB for a decoder's segment) after the session is gone.
                    kept.setdefault(name, []).append(np.array(values[name], copy=True))
                del values, run_feeds
                if b == len(feeds) - 1 and index + 1 < len(plan.segments):
                    # This segment's sessions are done: the next one is opened while the last batch's updates
                    # and the segment's Hessians are finished here (never two segments' sessions at once).
                    session = exact_session = None
                    reads = {name: kept[name][:1] for name in plan.segments[index + 1].inputs if name in kept}
                    opening = (index + 1, causal_ok, opener.submit(open_session, index + 1, causal_ok, reads))
            if adding is not None:
                adding.result()
            del session, exact_session, adding
            for name, hessian in sums.finished():
                if not store.has(name):
                    store.add(name, hessian)
            del sums
            for name in [name for name in kept if last_reader.get(name, -1) <= index]:
                del kept[name]
            release_freed_memory()


_ARENA_LOCK = threading.Lock()
_ARENA_REGISTERED: list[bool] = []  # one entry once registered


def _register_shared_arena(ort: Any) -> None:
    """Register a CPU arena on ONNX Runtime's environment (once per process) for the calibration
    sessions (session.use_env_allocators); it grows by what is asked (no power-of-two rounding)."""
    with _ARENA_LOCK:
        if _ARENA_REGISTERED:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        except Exception as error:  # noqa: BLE001  (one registered before, by the caller: the sessions use it)
            logger.debug("ONNX Runtime's shared CPU allocator not registered: %s", error)
        _ARENA_REGISTERED.append(True)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A session's weights and a segment's Hessians are large malloc blocks; once freed, glibc keeps
    them in the heap, so without this every segment would raise the process's RSS a little more.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


@dataclasses.dataclass(frozen=True)
class _NanGuards:
    """Where(IsNaN(p), 0, p) guards on Softmax outputs p that a segment's session leaves out.

    A softmax row is NaN only when every score in it is masked (-inf) or a score is NaN; exporters zero
    such rows (transformers' SDPA path), at the cost of two passes over every score matrix (a decoder's
    9 x 1024 x 1024 per layer: an eighth of the calibration forward). Without the guard a NaN row would
    reach its MatMul's output (NaN times anything is NaN), so those outputs (checks) are inspected on
    every batch and a batch that shows one is run again on the segment as the model has it: the
    Hessians are the model's either way.
    """

    rewired: dict[str, str]  # the guard's output -> the Softmax output it passes through
    dropped: frozenset[int]  # node indices (the Where nodes, and IsNaN nodes read by nothing else)
    checks: tuple[str, ...]  # outputs of the MatMuls that read a guard's output


_NO_GUARDS = _NanGuards({}, frozenset(), ())


def _softmax_nan_guards(
    graph: onnx.GraphProto, segment: list[int], readers: Mapping[str, list[int]], kept_names: set[str], folder: str,
    io: _NodeIO | None = None, scalars: _ScalarTensors | None = None,
) -> _NanGuards:
    """The guards of segment that can be left out: Where(IsNaN(p), 0, p) with p a Softmax output computed
    in the segment, read only by MatMuls of the segment and by no other segment or output (kept_names)."""
    in_segment = set(segment)
    io = _graph_io(graph) if io is None else io
    scalars = _ScalarTensors(graph, folder) if scalars is None else scalars
    producer = {name: i for i in segment for name in io[i][1]}
    rewired: dict[str, str] = {}
    dropped: set[int] = set()
    checks: list[str] = []
    for i in segment:
        node = graph.node[i]
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        condition, fill, probabilities = node.input
        output = node.output[0]
        test = graph.node[producer[condition]] if condition in producer else None
        softmax = graph.node[producer[probabilities]] if probabilities in producer else None
        if test is None or test.op_type != "IsNaN" or test.domain not in ("", "ai.onnx") or list(test.input) != [probabilities]:
            continue
        if softmax is None or softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
            continue
        matmuls = readers.get(output, [])
        if output in kept_names or not matmuls or not all(
            j in in_segment and graph.node[j].op_type == "MatMul" and graph.node[j].domain in ("", "ai.onnx")
            for j in matmuls
        ):
            continue
        if scalars.value(fill) != 0:
            continue
        rewired[output] = probabilities
        dropped.add(i)
        if readers.get(condition, []) == [i] and condition not in kept_names:
            dropped.add(producer[condition])
        checks += [graph.node[j].output[0] for j in matmuls]
    if not rewired:
        return _NO_GUARDS
    return _NanGuards(rewired, frozenset(dropped), tuple(dict.fromkeys(checks)))


class _ScalarTensors:
    """The value of a graph's scalar (an initializer, or a Constant node's output, holding one number; else
    None) by name: the initializers and Constant nodes indexed once, each value read once (the planning
    asks about the same few scalars of every layer; a scan per question took 0.7 s of SmolLM2's plan)."""

    def __init__(self, graph: onnx.GraphProto, folder: str) -> None:
        self._graph, self._folder = graph, folder
        self._values: dict[str, float | None] = {}
        self._tensors: dict[str, onnx.TensorProto | None] | None = None

    def value(self, name: str) -> float | None:
        if name not in self._values:
            if self._tensors is None:
                self._tensors = _named_tensors(self._graph)
            self._values[name] = _scalar_of(self._tensors.get(name), self._folder)
        return self._values[name]


def _named_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | None]:
    """Initializers by name, then the tensors of Constant nodes (value attribute, one output) by output
    name where no initializer has it: what a scan of the graph finds first."""
    tensors: dict[str, onnx.TensorProto | None] = {}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1 and node.output[0] not in tensors:
            attribute = next((a for a in node.attribute if a.name == "value"), None)
            ok = attribute is not None and attribute.type == onnx.AttributeProto.TENSOR
            tensors[node.output[0]] = attribute.t if ok and attribute is not None else None
    for tensor in reversed(graph.initializer):  # the first of equal names wins, as next() finds it
        tensors[tensor.name] = tensor
    return tensors


def _scalar_of(tensor: onnx.TensorProto | None, folder: str) -> float | None:
    if tensor is None or int(np.prod(tensor.dims, dtype=np.int64)) != 1:
        return None
    value = onnx.numpy_helper.to_array(tensor, base_dir=folder).reshape(-1)[0]
    return float(value) if np.issubdtype(value.dtype, np.number) else None


# Query rows per block of a causal attention computed in blocks (_CausalAttention): each block's scores
# (heads x 128 x keys up to the block's end) stay in cache through the mask, Softmax and x V.
CAUSAL_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class _CausalAttention:
    """MatMul(Softmax(MatMul(q, kt) + Where(mask, 0, -inf)), v) (Softmax on the last axis; a NaN guard
    between Softmax and MatMul left out as _NanGuards says) that a segment's session computes in blocks
    of CAUSAL_BLOCK query rows, each against the keys up to its last row only.

    A decoder's attention mask is causal: a query row never sees a later key, whose score is -inf and
    whose probability exactly 0, so the blocks leave out only terms that are 0 and the result is the
    model's up to float rounding, for about half the products and the score matrices in cache instead of
    a pass over rows x keys x heads floats per op (SmolLM2 on rows of 1024 tokens: 57 against 22 ms per
    layer). Whether the mask is causal is checked on every batch (_causal_mask): the session outputs the
    mask and the shapes of q and kt, and a batch whose mask is not is run again on the model's segment.
    """

    q: str
    kt: str
    v: str
    mask: str  # bool, True where a query row sees a key
    zero: str
    ninf: str
    output: str  # the last MatMul's output
    nodes: frozenset[int]  # the nodes the blocks replace
    last: int  # the last MatMul's index: the blocks go there
    blocks: int  # the last block takes every row after the others

    @property
    def shapes(self) -> tuple[str, str]:
        """The names of q's and kt's shapes, outputs of the blocked session for _causal_mask."""
        return f"bct_causal_shape_{self.output}_q", f"bct_causal_shape_{self.output}_kt"


def _longest_axis(calibration: Calibration) -> int:
    """The longest axis after the first (the batch) of any calibration input: the longest sequence."""
    return max((max(np.shape(array)[1:], default=0) for batch in calibration.feeds for array in batch.values()), default=0)


def _causal_attentions(
    graph: onnx.GraphProto, segment: list[int], readers: Mapping[str, list[int]], kept_names: set[str], folder: str,
    guards: _NanGuards, longest: int, io: _NodeIO | None = None,
    scalars: _ScalarTensors | None = None,
) -> tuple[_CausalAttention, ...]:
    """The attentions of segment to compute in causal blocks: every value they compute inside, except the
    last MatMul's output, is read by nothing else (and by no other segment or output: kept_names)."""
    blocks = -(-longest // CAUSAL_BLOCK)
    if blocks < 2:
        return ()
    in_segment = set(segment)
    io = _graph_io(graph) if io is None else io
    scalars = _ScalarTensors(graph, folder) if scalars is None else scalars
    producer = {name: i for i in segment for name in io[i][1]}

    def node_of(name: str, op_type: str) -> int | None:
        i = producer.get(name)
        if i is None:
            return None
        node = graph.node[i]
        return i if node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def only_reader(name: str, i: int) -> bool:
        return name not in kept_names and readers.get(name, []) == [i]

    found = []
    for i in segment:
        softmax = graph.node[i]
        if softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx") or len(softmax.input) != 1:
            continue
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), None)
        if axis != -1:
            continue
        add = node_of(softmax.input[0], "Add")
        if add is None or not only_reader(softmax.input[0], i) or len(graph.node[add].input) != 2:
            continue
        match = None
        for scores, bias in (tuple(graph.node[add].input), tuple(graph.node[add].input)[::-1]):
            matmul, where = node_of(scores, "MatMul"), node_of(bias, "Where")
            if matmul is None or where is None or not only_reader(scores, add) or len(graph.node[where].input) != 3:
                continue
            mask, zero, ninf = graph.node[where].input
            if scalars.value(zero) == 0 and scalars.value(ninf) == -np.inf:
                match = matmul, where, bias, mask, zero, ninf
                break
        if match is None:
            continue
        matmul, where, bias, mask, zero, ninf = match
        probabilities = softmax.output[0]
        names = {probabilities} | {g for g, p in guards.rewired.items() if p == probabilities}
        if names & kept_names:
            continue
        reading = {j for name in names for j in readers.get(name, []) if j not in guards.dropped}
        if len(reading) != 1:
            continue
        (last,) = reading
        final = graph.node[last]
        if (last not in in_segment or final.op_type != "MatMul" or final.domain not in ("", "ai.onnx")
                or len(final.input) != 2 or final.input[0] not in names or final.input[1] in names):
            continue
        q, kt = graph.node[matmul].input
        nodes = {matmul, add, i, last} | ({where} if only_reader(bias, add) else set())
        found.append(_CausalAttention(q, kt, final.input[1], mask, zero, ninf, final.output[0], frozenset(nodes), last, blocks))
    return tuple(found)


def _causal_blocks(attention: _CausalAttention, tag: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (and their constant inputs) computing attention in causal blocks, its output last."""
    make = onnx.helper.make_node

    def ints(name: str, values: list[int]) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(np.array(values, np.int64), name)

    a = attention
    rows, keys, both, start = f"{tag}rows", f"{tag}keys", f"{tag}both", f"{tag}start"
    tensors = [ints(rows, [-2]), ints(keys, [-1]), ints(both, [-2, -1]), ints(start, [0])]
    nodes = [make("Shape", [a.q], [a.shapes[0]]), make("Shape", [a.kt], [a.shapes[1]])]
    outputs = []
    for b in range(a.blocks):
        first = b * CAUSAL_BLOCK
        end = (b + 1) * CAUSAL_BLOCK if b + 1 < a.blocks else np.iinfo(np.int64).max
        t = f"{tag}{b}_"
        tensors += [ints(t + "first", [first]), ints(t + "end", [end]), ints(t + "mask_first", [first, 0]),
                    ints(t + "mask_end", [end, end])]
        whole = b + 1 == a.blocks  # the last block sees every key: kt and v as they are, no copy
        kt, v = (a.kt, a.v) if whole else (t + "kt", t + "v")
        if not whole:
            nodes += [make("Slice", [a.kt, start, t + "end", keys], [kt]), make("Slice", [a.v, start, t + "end", rows], [v])]
        nodes += [
            make("Slice", [a.q, t + "first", t + "end", rows], [t + "q"]),
            make("Slice", [a.mask, t + "mask_first", t + "mask_end", both], [t + "mask"]),
            make("MatMul", [t + "q", kt], [t + "scores"]),
            make("Where", [t + "mask", a.zero, a.ninf], [t + "bias"]),
            make("Add", [t + "scores", t + "bias"], [t + "sum"]),
            make("Softmax", [t + "sum"], [t + "p"], axis=-1),
            make("MatMul", [t + "p", v], [t + "out"]),
        ]
        outputs.append(t + "out")
    nodes.append(make("Concat", outputs, [a.output], axis=-2))
    return nodes, tensors


def _causal_mask(mask: np.ndarray | None, q_shape: np.ndarray | None, kt_shape: np.ndarray | None) -> bool:
    """Whether a batch's attention mask lets no query row see a later key, and has the scores' shape
    [..., rows, keys] with as many keys as rows (no past): then the causal blocks are exact."""
    if mask is None or q_shape is None or kt_shape is None or len(q_shape) < 2 or len(kt_shape) < 2:
        return False
    rows, keys = int(q_shape[-2]), int(kt_shape[-1])
    if mask.dtype != np.bool_ or mask.ndim < 2 or mask.shape[-2:] != (rows, keys) or rows != keys:
        return False
    return not np.logical_and(mask, _strictly_upper(rows)).any()


@functools.lru_cache(maxsize=4)
def _strictly_upper(n: int) -> np.ndarray:
    """[n, n] bool, True above the diagonal (np.triu's pattern, kept: 10x faster than np.triu per mask)."""
    upper = np.triu(np.ones((n, n), np.bool_), 1)
    upper.flags.writeable = False
    return upper


def _segment_session(
    proto: onnx.ModelProto, index: int, segment: list[int], inputs: list[str], outputs: list[str],
    kept: dict[str, list[np.ndarray]], options: Any, providers: list[str], with_library: bool,
    guards: _NanGuards = _NO_GUARDS, causal: tuple[_CausalAttention, ...] = (),
) -> Any:
    """An ONNX Runtime session of the nodes in segment (weights mapped from the data files in the folder
    that options names), the NaN guards given left out, the attentions given computed in causal blocks."""
    graph = proto.graph
    nodes = []
    replaced = {i for attention in causal for i in attention.nodes}
    blocks = {attention.last: (attention, j) for j, attention in enumerate(causal)}
    tensors: list[onnx.TensorProto] = []
    for i in segment:
        if i in blocks:
            block_nodes, block_tensors = _causal_blocks(blocks[i][0], f"bct_causal{blocks[i][1]}_")
            nodes += block_nodes
            tensors += block_tensors
        if i in guards.dropped or i in replaced:
            continue
        node = graph.node[i]
        if any(name in guards.rewired for name in node.input):
            node = onnx.NodeProto()
            node.CopyFrom(graph.node[i])
            node.input[:] = [guards.rewired.get(name, name) for name in node.input]
        nodes.append(node)
    used = {name for node in nodes for name in node.input}
    part = onnx.ModelProto()
    part.ir_version = proto.ir_version
    part.opset_import.extend(proto.opset_import)
    part.functions.extend(proto.functions)
    part.graph.name = f"{graph.name}_segment{index}"
    part.graph.node.extend(nodes)
    part.graph.initializer.extend(t for t in graph.initializer if t.name in used)
    part.graph.initializer.extend(tensors)
    declared = {value.name: value for value in graph.input}
    for name in inputs:
        if name in declared:
            part.graph.input.append(declared[name])
        else:
            array = kept[name][0]
            elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            part.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, None))
    for name in outputs:
        part.graph.output.append(onnx.ValueInfoProto(name=name))
    data = part.SerializeToString()
    del part
    try:
        return runtime.session(data, providers, options, with_library=with_library, quiet=True)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CalibrationError(f"ONNX Runtime cannot load the float model for calibration: {exc}") from exc


# Rows of one activation gathered over batches before one rank-k update of its Hessian: a batch of a
# few dozen tokens would make syrk read and write the whole [K, K] matrix for a handful of rows.
PENDING_ROW_BYTES = 2 << 20


class _HessianSums:
    """Upper triangles of x^T x per activation, updated with one syrk per PENDING_ROW_BYTES of rows."""

    def __init__(self) -> None:
        self.totals: dict[str, np.ndarray] = {}
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_bytes: dict[str, int] = {}

    def add_all(self, values: list[tuple[str, np.ndarray]]) -> None:
        for name, value in values:
            self.add(name, value)

    def add(self, name: str, value: np.ndarray) -> None:
        rows = np.asarray(value, dtype=np.float32).reshape(-1, value.shape[-1])
        self._pending.setdefault(name, []).append(rows)
        self._pending_bytes[name] = self._pending_bytes.get(name, 0) + rows.nbytes
        if self._pending_bytes[name] >= PENDING_ROW_BYTES:
            self._flush(name)

    def finished(self) -> Iterator[tuple[str, np.ndarray]]:
        """(activation, full symmetric sum) with every pending row included, each sum dropped as it goes."""
        for name in list(self._pending):
            self._flush(name)
        for name in list(self.totals):
            yield name, _symmetric_from_upper(self.totals.pop(name))

    def _flush(self, name: str) -> None:
        import scipy.linalg

        parts = self._pending.pop(name, [])
        self._pending_bytes.pop(name, None)
        if not parts:
            return
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        total = self.totals.get(name)
        if total is None:  # Fortran order: syrk updates it in place
            total = self.totals[name] = np.zeros((rows.shape[1], rows.shape[1]), np.float32, order="F")
        # upper triangle of total += rows^T rows (rows.T is a Fortran-ordered view: no copy)
        if not ssyrk_upper(rows, total):
            scipy.linalg.blas.ssyrk(1.0, rows.T, beta=1.0, c=total, trans=0, overwrite_c=1)


@functools.cache
def _ssyrk_routine() -> Callable[..., None] | None:
    """scipy's BLAS ssyrk (the routine of its OpenBLAS that scipy.linalg.blas.ssyrk calls, taken from
    scipy.linalg.cython_blas) as a ctypes function, which releases the GIL while it runs; None when
    scipy does not export it."""
    from bct_onnx.gptq import _capsule_function

    try:
        from scipy.linalg import cython_blas

        # void ssyrk(char *uplo, char *trans, int *n, int *k, float *alpha, float *a, int *lda, float *beta,
        #            float *c, int *ldc)
        routine = _capsule_function(cython_blas.__pyx_capi__["ssyrk"])  # type: ignore[attr-defined]
    except Exception as error:  # noqa: BLE001  (another scipy: its f2py wrapper is used)
        logger.debug("scipy's cython_blas ssyrk not found: %s", error)
        return None
    return routine


_UPPER, _NO_TRANSPOSE = ctypes.c_char(b"U"), ctypes.c_char(b"N")
_ONE = ctypes.c_float(1.0)


def ssyrk_upper(rows: np.ndarray, total: np.ndarray) -> bool:
    """The upper triangle of total [K, K] (float32, Fortran order) += rows^T rows for rows [M, K] (float32,
    C order), by the BLAS ssyrk that scipy.linalg.blas.ssyrk(1.0, rows.T, beta=1.0, c=total, trans=0,
    overwrite_c=1) runs (the same routine and arguments, so the same bits), without holding the GIL:
    GPTQ's Python on the main thread and the forward's go on meanwhile (scipy's wrapper holds the GIL
    for the whole update, ~7 s of SmolLM2's calibration). False (nothing done) when it cannot be called
    so; the caller then uses scipy's wrapper."""
    routine = _ssyrk_routine()
    m, k = rows.shape
    if (
        routine is None or rows.dtype != np.float32 or total.dtype != np.float32 or total.shape != (k, k)
        or not rows.flags.c_contiguous or not total.flags.f_contiguous or not total.flags.writeable
        or m == 0 or k == 0 or max(m, k) >= 2**31
    ):
        return False
    n_, k_ = ctypes.c_int(k), ctypes.c_int(m)
    routine(
        ctypes.byref(_UPPER), ctypes.byref(_NO_TRANSPOSE), ctypes.byref(n_), ctypes.byref(k_), ctypes.byref(_ONE),
        rows.ctypes.data, ctypes.byref(n_), ctypes.byref(_ONE), total.ctypes.data, ctypes.byref(n_),
    )
    return True


# Rows and columns of the tiles _symmetric_from_upper mirrors at once.
_MIRROR_TILE = 64


def _symmetric_from_upper(upper: np.ndarray) -> np.ndarray:
    """The full symmetric matrix whose upper triangle is given (C order).

    Tile by tile: an upper tile is copied and mirrored below the diagonal while both stay in cache (the
    Fortran-ordered syrk sum is read across its order; np.triu on the whole matrix took 45 ms for
    K = 1536 on the calibration forward's thread, the tiles 3 ms). The values of np.triu(upper) +
    np.triu(upper, 1).T.
    """
    n = upper.shape[0]
    full = np.empty((n, n), dtype=upper.dtype)
    tile = _MIRROR_TILE
    for i in range(0, n, tile):
        diagonal = upper[i : i + tile, i : i + tile]
        full[i : i + tile, i : i + tile] = np.triu(diagonal) + np.triu(diagonal, 1).T
        for j in range(i + tile, n, tile):
            block = upper[i : i + tile, j : j + tile]
            full[i : i + tile, j : j + tile] = block
            full[j : j + tile, i : i + tile] = block.T
    return full
