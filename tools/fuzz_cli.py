"""Model-mutation fuzzer over `bct-onnx compress`: malformed models and hostile paths, one subprocess each.

Every case builds a small model (or mutates one), runs the CLI in its own process with a timeout and
an address-space limit, and classifies what happened:

  ok            exit 0 and an output that loads, runs and is finite where the input is
  clean-error   exit 1 (or argparse's 2) with one `bct-onnx: error: ...` line and nothing else
  traceback     a Python traceback on stderr without --verbose
  crash         killed by a signal, or an exit status the CLI never uses
  hang          still running at the timeout
  input-touched a file that existed before the run (the input, its data, a FIFO, ...) changed
  partial       a failed run left an output, a report or a `.<name>.XXXX.tmp/` directory behind
  bad-output    exit 0 but the output does not load or run, computes NaN/Inf where the input does
                not, or is larger than the input
  accepted      exit 0 on an input the CLI must refuse (already quantized or compressed ...)

Usage:
  python tools/fuzz_cli.py                      # the fixed seed set (the CI set), table on stdout
  python tools/fuzz_cli.py --random 300         # plus 300 random mutations (seeds 0..299)
  python tools/fuzz_cli.py --minilm             # also mutate the real all-MiniLM-L6-v2 export
  python tools/fuzz_cli.py --json results.json  # every case's outcome and stderr tail
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from fuzz_common import limit_memory, run_threaded
from fuzz_common import table as outcome_table
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, FFN = 64, 32, 64
TIMEOUT_SECONDS = 120  # generous: a loaded 2-core CI machine takes 20 s for a case that needs 3
# A compressed output whose relative L2 error to the input model's output exceeds this is wrong, not
# just coarse: 3-bit weights give about 0.1 on the base model, a NaN scale or a dropped block ~1.
WRONG_ERROR = 0.5
OUTCOMES = (
    "ok", "clean-error", "traceback", "crash", "hang", "input-touched", "partial", "bad-output", "accepted",
)
FAILURES = ("traceback", "crash", "hang", "input-touched", "partial", "bad-output", "accepted")


def base_model(scale: float = 1.0, table_scale: float = 1.0) -> onnx.ModelProto:
    """ids -> Gather -> LayerNorm -> MatMul+Add -> Relu -> MatMul (output o) -> Softmax (output y), opset 17."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array((table_scale * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32), "embedding"),
        numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta"),
        numpy_helper.from_array((scale * rng.standard_normal((HIDDEN, FFN)) / 6).astype(np.float32), "w1"),
        numpy_helper.from_array((0.1 * rng.standard_normal(FFN)).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((FFN, HIDDEN)) / 8).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["emb"], name="embed"),
        helper.make_node("LayerNormalization", ["emb", "gamma", "beta"], ["ln"], name="norm", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "w2"], ["o"], name="fc2"),
        helper.make_node("Softmax", ["o"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "fuzz_base",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
        ],
        initializer=init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds_for(path: Path) -> dict[str, np.ndarray]:
    """Inputs for a model whose graph inputs are token ids (int) or float tensors, batch 2 x 5."""
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(3)
    feeds = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and 0 <= d.dim_value <= 64 else 5 for d in value.type.tensor_type.shape.dim]
        dims[:1] = [2] if dims else []
        elem = value.type.tensor_type.elem_type
        if elem in (TensorProto.INT64, TensorProto.INT32):
            dtype = np.int64 if elem == TensorProto.INT64 else np.int32
            feeds[value.name] = rng.integers(0, VOCAB if value.name != "attention_mask" else 2, size=dims).astype(dtype)
            if value.name == "attention_mask":
                feeds[value.name][:] = 1
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


# ---- cases -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One fuzz case: ``setup(work)`` writes the input files into ``work`` and returns the CLI args
    after ``compress`` (the output is always ``work/out/out.onnx`` unless the args give another -o)."""

    name: str
    setup: Callable[[Path], list[str]]
    expect_error: bool = False  # exit 0 is "accepted": the CLI must refuse this input
    check_output: bool = True


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def _save_external(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=256)
    return path


def _inited(proto: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def _node(proto: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.name == name)


def _model_case(name: str, mutate: Callable[[onnx.ModelProto], object], *args: str, expect_error: bool = False,
                external: bool = False, check_output: bool = True) -> Case:
    def setup(work: Path) -> list[str]:
        proto = base_model()
        mutate(proto)
        path = work / "in.onnx"
        (_save_external if external else _save)(proto, path)
        return [str(path), *args]
    return Case(name, setup, expect_error, check_output)


def _setup_plain(work: Path, *args: str, external: bool = False, proto: onnx.ModelProto | None = None) -> list[str]:
    path = work / "in.onnx"
    (_save_external if external else _save)(proto or base_model(), path)
    return [str(path), *args]


def _dangling(proto: onnx.ModelProto) -> None:
    _node(proto, "fc2").input[0] = "nowhere"


def _cycle(proto: onnx.ModelProto) -> None:
    _node(proto, "fc1").input[0] = "act"


def _drop_initializer(proto: onnx.ModelProto) -> None:
    proto.graph.initializer.remove(_inited(proto, "w1"))


def _short_initializer(proto: onnx.ModelProto) -> None:
    tensor = _inited(proto, "w1")
    tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]


def _bad_utf8_name(proto: onnx.ModelProto) -> None:
    raw = bytearray(proto.SerializeToString())
    marker = b"fc1_bias"
    at = raw.index(marker)
    raw[at : at + 2] = b"\xff\xfe"
    proto.ParseFromString(bytes(raw))


def _negative_dim(proto: onnx.ModelProto) -> None:
    proto.graph.input[0].type.tensor_type.shape.dim[1].Clear()
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -5


def _negative_epsilon(proto: onnx.ModelProto) -> None:
    for attr in _node(proto, "norm").attribute:
        if attr.name == "epsilon":
            attr.f = -1e-5


def _bogus_value_info(proto: onnx.ModelProto) -> None:
    proto.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [7, 3, 11]))
    proto.graph.value_info.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, [5]))


def _unknown_op(proto: onnx.ModelProto) -> None:
    _node(proto, "relu").op_type = "Relux"


def _wrong_dtype(proto: onnx.ModelProto) -> None:
    tensor = _inited(proto, "w2")
    tensor.data_type = TensorProto.DOUBLE
    tensor.raw_data = np.frombuffer(tensor.raw_data, np.float32).astype(np.float64).tobytes()


def _ext_location(location: Callable[[Path], str], offset: int | None = None) -> Callable[[Path], list[str]]:
    """An external-data model whose w1 entry points at ``location(work)`` (and ``offset``)."""
    def setup(work: Path) -> list[str]:
        (work / "outside").mkdir()
        (work / "outside" / "secret.bin").write_bytes(os.urandom(HIDDEN * FFN * 4))
        (work / "model").mkdir()
        path = _save_external(base_model(), work / "model" / "in.onnx")
        proto = onnx.load(str(path), load_external_data=False)
        tensor = _inited(proto, "w1")
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location(work)
            if entry.key == "offset" and offset is not None:
                entry.value = str(offset)
        _save(proto, path)
        return [str(path)]
    return setup


def _symlink_location(work: Path) -> str:
    os.symlink(work / "outside" / "secret.bin", work / "model" / "link.bin")
    return "link.bin"


def _quantize_dynamic(work: Path) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _save(base_model(), work / "fp32.onnx")
    logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger
    try:
        quantize_dynamic(str(src), str(work / "in.onnx"), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    src.unlink()
    return [str(work / "in.onnx")]


def _dq_matmul(work: Path) -> list[str]:
    proto = base_model()
    w = numpy_helper.to_array(_inited(proto, "w2"))
    scale = np.float32(np.abs(w).max() / 127)
    proto.graph.initializer.remove(_inited(proto, "w2"))
    proto.graph.initializer.extend([
        numpy_helper.from_array(np.round(w / scale).astype(np.int8), "w2_q"),
        numpy_helper.from_array(np.array(scale, np.float32), "w2_scale"),
    ])
    proto.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w2_q", "w2_scale"], ["w2"], name="w2_dq"))
    return _setup_plain(work, proto=proto)


def _matmulnbits(work: Path) -> list[str]:
    proto = base_model()
    node = _node(proto, "fc2")
    k, n, block = FFN, HIDDEN, 32
    proto.graph.initializer.extend([
        numpy_helper.from_array(np.full((n, k // block, block // 2), 0x88, np.uint8), "w2_nbits"),
        numpy_helper.from_array(np.full((n * (k // block),), 0.01, np.float32), "w2_nbits_scales"),
    ])
    node.op_type, node.domain = "MatMulNBits", "com.microsoft"
    node.input[1:] = ["w2_nbits", "w2_nbits_scales"]
    node.attribute.extend([helper.make_attribute(a, v) for a, v in (("K", k), ("N", n), ("bits", 4), ("block_size", block))])
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return _setup_plain(work, proto=proto)


def _compressed_twice(work: Path) -> list[str]:
    src = _save(base_model(), work / "fp32.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "bct_onnx", "compress", str(src), "-o", str(work / "in.onnx"), "-q",
         "--weight-bits", "8"], check=False, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
        cwd=work,  # never a checkout's root: `-m` would import its source bct_onnx, not the installed one
    )
    if done.returncode != 0:
        raise RuntimeError(f"first compress failed: {done.stderr.strip()[-300:]}")
    src.unlink()
    return [str(work / "in.onnx"), "--weight-bits", "3"]


def _report_is_input(work: Path) -> list[str]:
    return _setup_plain(work, "--report", str(work / "in.onnx"))


def _report_is_input_data(work: Path) -> list[str]:
    return _setup_plain(work, "--report", str(work / "in.onnx.data"), external=True)


def _debug_dir_holds_input(work: Path) -> list[str]:
    path = _save(base_model(), work / "00_input.onnx")
    return [str(path), "--debug-dir", str(work)]


def _debug_dir_is_file(work: Path) -> list[str]:
    (work / "debug").write_text("not a directory\n")
    return _setup_plain(work, "--debug-dir", str(work / "debug"))


def _output_fifo(work: Path) -> list[str]:
    os.mkfifo(work / "fifo")
    return _setup_plain(work, "-o", str(work / "fifo"))


def _report_fifo(work: Path) -> list[str]:
    os.mkfifo(work / "fifo")
    return _setup_plain(work, "--report", str(work / "fifo"))


def _output_is_input_data(work: Path) -> list[str]:
    return _setup_plain(work, "-o", str(work / "in.onnx.data"), external=True)


def _output_under_a_file(work: Path) -> list[str]:
    (work / "plain").write_text("a file, not a folder\n")
    return _setup_plain(work, "-o", str(work / "plain" / "out.onnx"))


def _stale_temp_dir(work: Path) -> list[str]:
    stale = work / "out" / ".out.onnx.k3j9x2.tmp"
    stale.mkdir(parents=True)
    (stale / "out.onnx").write_bytes(b"partial")
    return _setup_plain(work)


def _stale_locked_temp_dir(work: Path) -> list[str]:
    """A temporary directory of a killed save (its lock file is free): the next save removes it."""
    stale = work / "out" / ".out.onnx.x81nd0qa.tmp"
    stale.mkdir(parents=True)
    (stale / ".bct_onnx.lock").touch()
    (stale / "out.onnx").write_bytes(b"partial")
    return _setup_plain(work)


def _huge_weights(work: Path) -> list[str]:
    return _setup_plain(work, "--weight-bits", "4", proto=base_model(scale=5e5 * 6))


def _huge_table(work: Path) -> list[str]:
    return _setup_plain(work, proto=base_model(table_scale=1e6))


def _truncated_file(work: Path) -> list[str]:
    data = base_model().SerializeToString()
    (work / "in.onnx").write_bytes(data[: len(data) // 2])
    return [str(work / "in.onnx")]


def _text_calibration_ort_rejects(work: Path) -> list[str]:
    """Checker-valid but ONNX Runtime cannot run it (an op in a domain ORT does not know)."""
    proto = base_model()
    proto.graph.input[0].name = "input_ids"
    _node(proto, "embed").input[1] = "input_ids"
    relu = _node(proto, "relu")
    relu.domain = "example.unknown"
    proto.opset_import.append(helper.make_opsetid("example.unknown", 1))
    tokenizer = _tokenizer_dir(work)
    return _setup_plain(work, "--calibration", "text", "--tokenizer", str(tokenizer), proto=proto)


def _tokenizer_dir(work: Path) -> Path:
    """A tiny WordPiece tokenizer (vocab.txt) written here: no model package needed."""
    folder = work / "tokenizer"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[chr(c) for c in range(97, 97 + 26)]]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return folder


def named_cases() -> list[Case]:
    """The hand-written cases: one per finding of issue 11 that a CLI run can show."""
    return [
        Case("baseline", lambda w: _setup_plain(w)),
        Case("baseline-external-data", lambda w: _setup_plain(w, external=True)),
        Case("report-is-input", _report_is_input, expect_error=True),
        Case("report-is-input-data", _report_is_input_data, expect_error=True),
        Case("debug-dir-holds-input", _debug_dir_holds_input, expect_error=True),
        Case("debug-dir-is-a-file", _debug_dir_is_file, expect_error=True),
        Case("output-is-fifo", _output_fifo, expect_error=True),
        Case("report-is-fifo", _report_fifo, expect_error=True),
        Case("output-is-input-data", _output_is_input_data, expect_error=True),
        Case("output-under-a-file", _output_under_a_file, expect_error=True),
        Case("stale-temp-dir", _stale_temp_dir),
        Case("stale-temp-dir-of-killed-save", _stale_locked_temp_dir),
        Case("huge-weights-4bit", _huge_weights),
        Case("huge-embedding-table", _huge_table),
        Case("quantize-dynamic-int8", _quantize_dynamic, expect_error=True),
        Case("dequantize-linear-matmul", _dq_matmul, expect_error=True),
        Case("matmulnbits", _matmulnbits, expect_error=True),
        Case("already-compressed", _compressed_twice, expect_error=True),
        _model_case("dangling-input", _dangling, expect_error=True),
        _model_case("cycle", _cycle, expect_error=True),
        _model_case("dropped-initializer", _drop_initializer, expect_error=True),
        _model_case("short-initializer", _short_initializer, expect_error=True),
        _model_case("invalid-utf8-node-name", _bad_utf8_name, expect_error=True),
        _model_case("unknown-op", _unknown_op, expect_error=True),
        _model_case("initializer-dtype-mismatch", _wrong_dtype, expect_error=True),
        _model_case("negative-input-dim", _negative_dim),
        _model_case("negative-layernorm-epsilon", _negative_epsilon),
        _model_case("bogus-value-info", _bogus_value_info),
        Case("external-data-escapes-folder", _ext_location(lambda w: "../outside/secret.bin"), expect_error=True),
        Case("external-data-absolute", _ext_location(lambda w: str(w / "outside" / "secret.bin")), expect_error=True),
        Case("external-data-symlink", _ext_location(_symlink_location), expect_error=True),
        Case("external-data-past-end", _ext_location(lambda w: "in.onnx.data", offset=1 << 20), expect_error=True),
        Case("truncated-file", _truncated_file, expect_error=True),
        Case("text-calibration-ort-rejects", _text_calibration_ort_rejects, expect_error=True),
    ]


# ---- random mutations --------------------------------------------------------------------------------

def _mutate_random(proto: onnx.ModelProto, rng: random.Random) -> str:
    """Apply one random structural mutation; return its description."""
    graph = proto.graph
    kind = rng.choice([
        "attr", "dim", "drop-node", "swap-inputs", "dtype", "truncate-init", "rename-output", "value-info",
        "init-dims", "opset", "empty-name", "duplicate-output",
    ])
    node = rng.choice(list(graph.node))
    if kind == "attr" and node.attribute:
        attr = rng.choice(list(node.attribute))
        if attr.type == onnx.AttributeProto.INT:
            attr.i = rng.choice([-9, -1, 0, 1, 7, 1 << 40])
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = rng.choice([-1.0, 0.0, float("nan"), float("inf"), 1e30])
        return f"attr {node.name}.{attr.name}"
    if kind == "dim":
        dim = graph.input[0].type.tensor_type.shape.dim[rng.randrange(2)]
        dim.Clear()
        dim.dim_value = rng.choice([-3, 0, 1, 1 << 33])
        return f"input dim -> {dim.dim_value}"
    if kind == "drop-node":
        graph.node.remove(node)
        return f"drop node {node.name}"
    if kind == "swap-inputs" and len(node.input) >= 2:
        node.input[0], node.input[1] = node.input[1], node.input[0]
        return f"swap inputs of {node.name}"
    if kind == "dtype":
        tensor = rng.choice(list(graph.initializer))
        tensor.data_type = rng.choice([TensorProto.FLOAT16, TensorProto.INT8, TensorProto.BFLOAT16, TensorProto.STRING, 99])
        return f"dtype of {tensor.name} -> {tensor.data_type}"
    if kind == "truncate-init":
        tensor = rng.choice(list(graph.initializer))
        tensor.raw_data = tensor.raw_data[: rng.randrange(max(1, len(tensor.raw_data)))]
        return f"truncate {tensor.name}"
    if kind == "rename-output":
        node.output[0] = node.output[0] + "_renamed"
        return f"rename output of {node.name}"
    if kind == "value-info":
        name = rng.choice([o for n in graph.node for o in n.output])
        dims = [rng.choice([1, 3, 17, -2, 0]) for _ in range(rng.randrange(0, 5))]
        graph.value_info.append(helper.make_tensor_value_info(name, rng.choice([TensorProto.FLOAT, TensorProto.INT64]), dims))
        return f"value_info {name} {dims}"
    if kind == "init-dims":
        tensor = rng.choice(list(graph.initializer))
        tensor.dims[:] = [rng.choice([0, 1, 2, 3, 64, 1 << 20]) for _ in range(rng.randrange(1, 4))]
        return f"dims of {tensor.name} -> {list(tensor.dims)}"
    if kind == "opset":
        proto.opset_import[0].version = rng.choice([1, 6, 11, 26, 1000])
        return f"opset -> {proto.opset_import[0].version}"
    if kind == "empty-name":
        node.input[0] = ""
        return f"empty first input of {node.name}"
    if kind == "duplicate-output":
        other = rng.choice(list(graph.node))
        node.output[0] = other.output[0]
        return f"{node.name} writes {other.output[0]}"
    return "none"


def random_case(seed: int) -> Case:
    rng = random.Random(seed)

    def setup(work: Path) -> list[str]:
        proto = base_model()
        external = rng.random() < 0.25
        for _ in range(rng.choice([1, 1, 2])):
            _mutate_random(proto, rng)
        path = work / "in.onnx"
        if rng.random() < 0.2:  # byte-level damage of the serialized file
            data = bytearray(proto.SerializeToString())
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data))
        else:
            try:
                (_save_external if external else _save)(proto, path)
            except Exception:  # noqa: BLE001  # a mutation onnx cannot save with external data: save it inline
                _save(proto, path)
        return [str(path), *rng.choice([[], ["--weight-bits", "3"], ["--act-bits", "none"], ["--block-size", "16"]])]

    return Case(f"random-{seed}", setup)


def minilm_cases() -> list[Case]:
    """Mutations of the real all-MiniLM-L6-v2 export (slow: about 20 s a case)."""
    from bct_onnx.models import minilm

    cache = Path(tempfile.mkdtemp(prefix="fuzz_minilm_"))
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    exported = minilm.export(cache)

    def plain(work: Path) -> list[str]:
        shutil.copy(exported, work / "in.onnx")
        return [str(work / "in.onnx")]

    def mutated(mutate: Callable[[onnx.ModelProto], object]) -> Callable[[Path], list[str]]:
        def setup(work: Path) -> list[str]:
            proto = onnx.load(str(exported))
            mutate(proto)
            return [str(_save(proto, work / "in.onnx"))]
        return setup

    def drop_first_init(proto: onnx.ModelProto) -> None:
        proto.graph.initializer.remove(proto.graph.initializer[0])

    def scale_tables(proto: onnx.ModelProto) -> None:
        # Embedding tables x1e6: the LayerNorm after them keeps FP32's output as it was, while
        # float16 / float8 block scales of the tables overflow. (Scaling every weight makes FP32 itself
        # a one-hot attention whose argmax any rounding flips: no fair test.)
        for tensor in proto.graph.initializer:
            if tensor.name.endswith("_embeddings.weight") and tensor.data_type == TensorProto.FLOAT:
                tensor.raw_data = (numpy_helper.to_array(tensor) * 1e6).astype(np.float32).tobytes()

    return [
        Case("minilm", plain),
        Case("minilm-dropped-initializer", mutated(drop_first_init), expect_error=True),
        Case("minilm-tables-x1e6", mutated(scale_tables)),
    ]


# ---- running and classifying ----------------------------------------------------------------------------

def _snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under root: kind, size and content hash (regular files), never following FIFOs."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                found[str(path)] = ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[str(path)] = (stat.filemode(info.st_mode)[0], 0, "")
    return found


_CHECK_OUTPUT = r"""
import sys, numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[3])
from fuzz_cli import feeds_for
from pathlib import Path
import bct_onnx.runtime as rt
inp, out = Path(sys.argv[1]), Path(sys.argv[2])
WRONG_ERROR = float(sys.argv[4])
feeds = feeds_for(out)
try:
    ref = ort.InferenceSession(str(inp), providers=["CPUExecutionProvider"]).run(None, feeds)
except Exception:
    ref = None
session = rt.session(str(out))
if ref is None:  # the input model cannot run on these inputs either: loading the output is enough
    sys.exit(0)
got = session.run(None, feeds)
for i, y in enumerate(got):
    if not np.isfinite(ref[i]).all():
        continue
    if not np.isfinite(y).all():
        print(f"output {i} is not finite where the input model's is"); sys.exit(3)
    error = float(np.linalg.norm(y - ref[i]) / max(float(np.linalg.norm(ref[i])), 1e-30))
    if i == 0 and error > WRONG_ERROR:  # the first output; a softmax of large logits magnifies any error
        print(f"output {i} is wrong: relative error {error:.3g} to the input model's"); sys.exit(3)
"""


def _check_output(input_path: Path, output: Path) -> str | None:
    """None when the output loads, runs and is finite where the input is; else why not."""
    done = subprocess.run(
        [sys.executable, "-c", _CHECK_OUTPUT, str(input_path), str(output), str(Path(__file__).parent), str(WRONG_ERROR)],
        check=False, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, preexec_fn=limit_memory,
        cwd=output.parent,  # `-c` puts the working directory first on sys.path: keep it out of a checkout
    )
    if done.returncode != 0:
        return (done.stdout + done.stderr).strip().splitlines()[-1][:300] if (done.stdout + done.stderr).strip() else f"exit {done.returncode}"
    return None


def _input_size(args: list[str]) -> int:
    path = Path(args[0])
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def run_case(case: Case, keep: Path | None = None) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix=f"fuzz_{case.name}_"))
    try:
        try:
            args = case.setup(work)
        except Exception as exc:  # noqa: BLE001  # the case could not be built: not a finding about the CLI
            return {"case": case.name, "outcome": "skipped", "detail": f"setup failed: {exc}"}
        if "-o" not in args:
            args += ["-o", str(work / "out" / "out.onnx")]
        output = Path(args[args.index("-o") + 1])
        before = _snapshot(work)
        command = [sys.executable, "-m", "bct_onnx", "compress", *args, "-q"]
        start = time.monotonic()
        try:
            done = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, preexec_fn=limit_memory,
                cwd=work, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return {"case": case.name, "outcome": "hang", "detail": f"no exit after {TIMEOUT_SECONDS} s", "args": args}
        seconds = time.monotonic() - start
        after = _snapshot(work)
        # An existing regular output may be replaced; anything else that existed must stay as it was.
        # A stale temporary directory the run removed and named in a warning is no loss either.
        removed_stale = [p for p in before if p.endswith(".tmp") and p not in after and Path(p).name in done.stderr]
        touched = sorted(
            p for p, entry in before.items()
            if after.get(p) != entry
            and not (p == str(output) and entry[0] == "file")
            and not any(p == d or p.startswith(d + os.sep) for d in removed_stale)
        )
        stderr = done.stderr.strip()
        result: dict[str, object] = {
            "case": case.name, "args": args, "exit": done.returncode, "seconds": round(seconds, 2),
            "stderr": stderr[-600:],
        }
        if done.returncode < 0 or done.returncode not in (0, 1, 2, 130):
            outcome = "crash"
        elif touched:
            outcome, result["detail"] = "input-touched", ", ".join(Path(p).name for p in touched)
        elif "Traceback" in stderr:
            outcome = "traceback"
        elif done.returncode != 0:
            leftovers = [p for p in after if p not in before and (p.endswith(".tmp") or Path(p) == output)]
            reports = [p for p in after if p not in before and p.endswith(".json")]
            outcome = "partial" if leftovers or reports else "clean-error"
            if outcome == "partial":
                result["detail"] = ", ".join(Path(p).name for p in leftovers + reports)
            elif len(stderr.splitlines()) != 1 or not stderr.startswith(("bct-onnx: error:", "usage:")):
                outcome = "traceback" if stderr.count("\n") > 3 else "clean-error"
        elif case.expect_error:
            outcome = "accepted"
        else:
            # A temporary directory of an earlier run may stay when the run names it in a warning.
            leftovers = [p for p in after if p.endswith(".tmp") and not (p in before and Path(p).name in stderr)]
            problem = None
            if leftovers:
                problem = f"temporary directories left: {', '.join(Path(p).name for p in leftovers)}"
            elif case.check_output and output.is_file():
                try:
                    problem = _check_output(Path(args[0]), output)
                except subprocess.TimeoutExpired:
                    problem = "the output hangs in ONNX Runtime"
                if problem is None and _output_bytes(output) > _input_size(args):
                    problem = "the output is larger than the input"
            outcome = "bad-output" if problem else "ok"
            if problem:
                result["detail"] = problem
        result["outcome"] = outcome
        return result
    finally:
        if keep is not None and keep.is_dir():
            shutil.copytree(work, keep / work.name, symlinks=True, ignore_dangling_symlinks=True)
        _remove(work)


def _output_bytes(output: Path) -> int:
    return sum(p.stat().st_size for p in output.parent.glob(output.name + "*") if p.is_file())


def _remove(work: Path) -> None:
    for dirpath, dirnames, _ in os.walk(work):  # a case may have made folders read-only
        for name in dirnames:
            os.chmod(Path(dirpath) / name, 0o755)
    shutil.rmtree(work, ignore_errors=True)


def run_cases(cases: list[Case], keep: Path | None = None, jobs: int = 2, echo: bool = False) -> list[dict[str, object]]:
    """Run the cases, ``jobs`` at a time (each is a subprocess); results in the order of ``cases``."""

    def run_one(case: Case) -> dict[str, object]:
        result = run_case(case, keep)
        if echo:
            detail = f" ({result['detail']})" if result.get("detail") else ""
            tail = str(result.get("stderr", "")).splitlines()[-1:] if result["outcome"] != "ok" else []
            print(f"{case.name:34s} {result['outcome']:14s}{detail} {tail[0][:160] if tail else ''}", flush=True)
        return result

    return run_threaded(run_one, cases, jobs)


def ci_cases() -> list[Case]:
    """The fixed set CI runs: every named case and a few seeded random mutations."""
    return named_cases() + [random_case(seed) for seed in range(8)]


def table(results: list[dict[str, object]]) -> str:
    return outcome_table(results, (*OUTCOMES, "skipped"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=0, metavar="N", help="random mutations, seeds 0..N-1 (beyond the CI set)")
    parser.add_argument("--first-seed", type=int, default=8, metavar="S", help="first random seed (default: 8)")
    parser.add_argument("--minilm", action="store_true", help="also mutate the real all-MiniLM-L6-v2 export")
    parser.add_argument("--only", metavar="NAME", help="run only the cases whose name contains NAME")
    parser.add_argument("--json", metavar="PATH", help="write every case's result here")
    parser.add_argument("--keep", metavar="DIR", help="copy each case's work directory here")
    parser.add_argument("--jobs", type=int, default=2, metavar="N", help="cases run at once (default: 2)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like ^C: the cases running finish and remove their work directories.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cases = ci_cases() + [random_case(seed) for seed in range(args.first_seed, args.first_seed + args.random)]
    if args.minilm:
        cases += minilm_cases()
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    keep = Path(args.keep) if args.keep else None
    results = run_cases(cases, keep, args.jobs, echo=True)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["outcome"] in FAILURES for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
