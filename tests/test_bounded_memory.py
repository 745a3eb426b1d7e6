"""Compile memory stays bounded: weights are read in place, calibration runs segment by segment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from bct_onnx.models.synthetic_llama import LlamaShape, build
from onnx import TensorProto, helper, numpy_helper

from bct_onnx import calibration, model_io
from bct_onnx.calibration import Calibration, collect_hessians
from bct_onnx.external_data import StreamedTensor


def _inline_model(path, rng):
    """A single-file model with a large raw_data weight, a small one and one stored as float_data."""
    big = rng.standard_normal((64, 48)).astype(np.float32)
    small = rng.standard_normal((2,)).astype(np.float32)
    as_floats = helper.make_tensor("floats", TensorProto.FLOAT, [48], rng.standard_normal(48).astype(np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "big"], ["y"]),
            helper.make_node("Add", ["y", "floats"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 48])],
        initializer=[numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small"), as_floats],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    return {"big": big, "small": small, "floats": numpy_helper.to_array(as_floats)}


def test_inline_weights_are_read_from_the_file_on_demand(tmp_path):
    path = tmp_path / "model.onnx"
    expected = _inline_model(path, np.random.default_rng(0))
    model = model_io.load(path)
    tensors = {name: value.const_value for name, value in model.graph.initializers.items()}
    big = tensors["big"]
    assert isinstance(big, StreamedTensor)
    assert os.path.samefile(big.path, path)  # the .onnx file is its own external data
    assert not isinstance(tensors["small"], StreamedTensor)  # under 1 KB: stays in the message
    for name, array in expected.items():
        np.testing.assert_array_equal(tensors[name].numpy(), array)
    first, second = big.numpy(), big.numpy()
    assert first is not second and not np.shares_memory(first, second)  # nothing kept between reads
    assert big.raw is None
    assert big.tobytes() == expected["big"].tobytes()
    assert model_io.file_bytes(path) == path.stat().st_size  # inline data is not counted twice


def test_inline_model_saves_and_runs_the_same(tmp_path):
    path = tmp_path / "model.onnx"
    expected = _inline_model(path, np.random.default_rng(1))
    for external in (False, True):
        out = tmp_path / f"copy_{external}.onnx"
        model_io.save(model_io.load(path), out, external_data=external)
        copy = onnx.load(out)
        got = {t.name: numpy_helper.to_array(t) for t in copy.graph.initializer}
        for name, array in expected.items():
            np.testing.assert_array_equal(got[name], array)


def test_not_an_onnx_file_still_gets_the_parsers_error(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff\xff\xff\xff not protobuf")
    with pytest.raises(model_io.ModelFileError, match="is not an ONNX model"):
        model_io.load(path)


TINY = LlamaShape(hidden=64, intermediate=96, layers=3, heads=4, vocab=128)


def test_segmented_hessians_equal_the_whole_model_run(tmp_path, monkeypatch):
    path = build(tmp_path / "model.onnx", TINY)
    model = model_io.load(path)
    rng = np.random.default_rng(0)
    calib = Calibration(tuple({"input_ids": rng.integers(0, TINY.vocab, (1, n))} for n in (5, 9, 17)))
    opened = []
    session = calibration.runtime.session
    monkeypatch.setattr(calibration.runtime, "session", lambda *a, **k: opened.append(a[0]) or session(*a, **k))
    whole = collect_hessians(model, calib, segment_bytes=1 << 40)
    assert len(opened) == 1
    opened.clear()
    parts = collect_hessians(model, calib, segment_bytes=0)  # each segment: one node with weights (and the nodes without)
    assert len(opened) > TINY.layers  # several sessions: the model never ran whole
    assert set(parts) == set(whole) and len(whole) == 7 * TINY.layers + 1  # every MatMul weight
    for key in whole:
        expected = whole[key]
        np.testing.assert_allclose(parts[key], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # The Hessians live on disk until asked for, and the folder goes when the store is closed.
    folder = parts._folder.name
    assert os.listdir(folder)
    parts.close()
    whole.close()
    assert not os.path.exists(folder)


# Peak RSS growth a compile may have on top of the imports whatever the model's size (the quantizers
# work on chunks of a few million values, ONNX Runtime's calibration sessions start threads).
FIXED_MB = 100

# In a child process: peak RSS (VmHWM) of bct_onnx.compress on the synthetic decoder, and the RSS
# after importing everything (the fixed overhead), in MB.
_MEASURE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import bct_onnx, onnxruntime, scipy.linalg
    from bct_onnx.calibration import Calibration

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

    base = status("VmRSS")
    rng = np.random.default_rng(0)
    calib = Calibration(tuple({"input_ids": rng.integers(0, %(vocab)d, (1, 48))} for _ in range(4)))
    bct_onnx.compress(sys.argv[1], sys.argv[2], calibration=calib if sys.argv[3] == "gptq" else "none")
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "gptq"])
def test_compile_peak_memory_is_bounded_by_a_layer_group_not_the_model(tmp_path, calibrated):
    """A 340 MB float model (24 layers of 13 MB, two 16 MB vocabulary tables) compresses with a peak
    RSS of the fixed overhead (imports, then ~100 MB of quantizer temporaries, whatever the model)
    plus at most half the model (233 MB of growth measured with GPTQ). Before weights were streamed,
    RSS grew by the whole model and more."""
    shape = LlamaShape(layers=24)
    path = build(tmp_path / "model.onnx", shape)
    model_mb = shape.total_bytes() / 2**20
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE % {"vocab": shape.vocab})
    result = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "out.onnx"), "gptq" if calibrated else "none"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["base"]
    assert growth < FIXED_MB + 0.5 * model_mb, f"peak {measured['peak']:.0f} MB, base {measured['base']:.0f} MB, model {model_mb:.0f} MB"


def test_the_report_times_the_calibration_statistics(tmp_path):
    from bct_onnx.passes import compress_model
    from bct_onnx.passes.pipeline import CALIBRATION_RECORD

    from bct_onnx.config import CompressConfig

    model = model_io.load(build(tmp_path / "model.onnx", TINY))
    calib = Calibration(({"input_ids": np.arange(12).reshape(1, 12) % TINY.vocab},))
    result = compress_model(model, CompressConfig(ops=frozenset({"MatMul"})), calibration=calib)
    records = {record.name: record for record in result.passes}
    assert records[CALIBRATION_RECORD].seconds > 0
    assert result.rewritten["MatMul weight rounded by GPTQ (calibrated)"] == 7 * TINY.layers + 1


def test_compile_memory_benchmark_smoke(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compile_memory.py")
    result = subprocess.run(
        [sys.executable, script, "--synthetic", "64,96,2,4,128", "--workdir", str(tmp_path), "--calibration", "none"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.strip().splitlines()[-1].split("|")
    assert row[4].strip() == "none" and float(row[5]) > 0 and row[6].strip().endswith("x")
