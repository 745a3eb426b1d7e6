"""Smoke tests of the benchmark scripts (benchmarks/ is not a package: load the files by path)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_compare_minilm_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One bct-onnx row against FP32, one timed round: the table, the JSON, nothing written to the CWD."""
    pytest.importorskip("optimum")
    from bct_onnx.models import minilm

    try:
        minilm.model_dir()
    except minilm.MiniLMNotInstalledError as err:
        pytest.skip(str(err))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "result.json"
    compare = _load("compare_minilm")
    assert (
        compare.main(
            # No GPTQ: it is most of the time of a row; the full run uses the default ("auto").
            ["--only", "bct-w4", "--calibration", "none", "--runs", "1", "--warmup", "1", "--json", str(out)]
        )
        == 0
    )
    assert os.listdir(cwd) == []
    table = capsys.readouterr().out
    assert "| FP32 (optimum export) |" in table and "bct-onnx `ops=MatMul,Gather`" in table
    results = {row["key"]: row for row in json.loads(out.read_text())["results"]}
    assert set(results) == {"fp32", "bct-w4"}
    row = results["bct-w4"]
    assert row["error"] is None
    assert row["ratio"] > 6.5 and row["mean_cosine"] > 0.95  # 0.97+ with GPTQ
    assert row["batch_ms"] > 0 and row["single_ms"] > 0


def test_fidelity_minilm_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain .onnx (no tokenizer beside it) compressed with fixed widths, scored on a few task sentences."""
    pytest.importorskip("optimum")
    from bct_onnx.models import minilm
    from bct_onnx.models.text_data import TextDataUnavailable, austen_lines

    try:
        minilm.model_dir()
        austen_lines("emma")
    except (minilm.MiniLMNotInstalledError, TextDataUnavailable) as err:
        pytest.skip(str(err))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "rows.json"
    fidelity = _load("fidelity_minilm")
    args = ["--variants", "fixed-4bit", "--train-per-novel", "6", "--test-per-novel", "2", "--json", str(out)]
    assert fidelity.main(args) == 0
    assert os.listdir(cwd) == []
    assert "| fixed widths: weight_bits=4" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    # No tokenizer next to the plain file: MiniLM, an encoder, gets data-free GPTQ on made-up ids.
    assert row["error"] is None and row["calibration"] == "gptq"
    assert 6.5 < row["ratio"] < 8.0 and row["mean_cosine"] > 0.9
    assert 0.0 <= row["accuracy"] <= 1.0 and row["drop_points"] == pytest.approx(
        100 * (row["fp32_accuracy"] - row["accuracy"])
    )


def test_compare_speed_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny models, one round: every asked column timed or saying why, the GEMV line, the marked
    section of the results file replaced (text around it kept), nothing written to the CWD."""
    pytest.importorskip("optimum")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    results = tmp_path / "results.md"
    compare = _load("compare_speed")
    results.write_text(f"# before\n\n{compare.BEGIN_MARK}\nold table\n{compare.END_MARK}\n\n# after\n")
    out = tmp_path / "speed.json"
    argv = [
        "--tiny",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--only",
        "minilm,smollm2",
        "--variants",
        "fp32,ort-int8,genai-int4,bct-default",
        "--genai-venv",
        str(tmp_path / "no-venv"),
        "--results",
        str(results),
        "--json",
        str(out),
    ]
    assert compare.main(argv) == 0
    assert os.listdir(cwd) == []
    text = results.read_text()
    assert text.startswith("# before\n") and text.rstrip().endswith("# after") and "old table" not in text
    assert text.count(compare.BEGIN_MARK) == 1 and "| bct default (every component) |" in text
    payload = json.loads(out.read_text())
    assert len(payload["table"]) == 3  # the encoder case and the two decoder cases
    for case, cells in payload["table"].items():
        for key in ("fp32", "ort-int8", "bct-default"):
            assert cells[key]["error"] is None and cells[key]["ms"] > 0, (case, key, cells[key])
        reason = cells["genai-int4"]["error"]
        assert ("decoders" in reason) if "BERT" in case else ("no onnxruntime-genai venv" in reason), reason
    assert any("GB/s of weights" in line for line in payload["gemv"])
    for case, cells in payload["table"].items():
        low, high = cells["bct-default"]["spread"]
        assert low <= cells["bct-default"]["ms"] <= high, (case, cells["bct-default"])
    assert any(
        "bct default (every component) / ORT int8 dynamic per interleaved round" in line
        for line in payload["paired_ratios"]
    )


def test_compare_speed_bound_run_gives_the_outputs_of_run() -> None:
    """bound_run binds the feeds and outputs once: each call recomputes into the bound outputs (the
    feeds' buffers are read at every call), and interleaved_times times either form."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    compare = _load("compare_speed")
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["product"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("sum", "product")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.full((2, 3), 3.0, np.float32)}
    run = compare.bound_run(session, feeds)
    outputs = [value.numpy() for value in run.values[len(feeds) :]]
    for out in outputs:
        out[...] = -1.0
    feeds["b"][...] = 2.0  # bound by reference: the next call reads the new values
    run()
    np.testing.assert_array_equal(outputs[0], feeds["a"] + 2.0)
    np.testing.assert_array_equal(outputs[1], feeds["a"] * 2.0)
    for bind in (False, True):
        times = compare.interleaved_times([(session, feeds)], rounds=3, warmup=1, bind=bind)
        assert len(times) == 1 and len(times[0]) == 3 and all(t > 0 for t in times[0])


def test_compare_speed_paired_ratio_is_per_round() -> None:
    """The decode ratio is taken round by round (a slow round slows both), then its median and quartiles."""
    compare = _load("compare_speed")
    times = {"bct-default": [10.0, 20.0, 30.0, 12.0, 11.0], "genai-int4": [20.0, 40.0, 60.0, 24.0, 11.0]}
    note = compare.paired_ratio_note("decode", times, "bct-default", "genai-int4")
    assert note is not None and "median 0.50x" in note and "5 rounds" in note
    assert compare.quartiles([0.5, 0.5, 0.5, 0.5, 1.0]) == (0.5, 0.75)
    assert compare.quartiles([3.0]) == (3.0, 3.0)
    assert compare.paired_ratio_note("decode", times, "bct-default", "ort-int8") is None


def test_compare_speed_isa_line_names_the_path_the_library_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks' ISA line follows the library's dispatch rule (cpu/isa.cc: best of amx, avx512vnni,
    avxvnni, avx2; BCT_ONNX_ISA forces one), from the CPU flags."""
    compare = _load("compare_speed")
    monkeypatch.delenv("BCT_ONNX_ISA", raising=False)
    avx512 = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"]
    assert "BlockMatMul: amx (" in compare.isa_paths([*avx512, "amx_tile", "amx_int8"])
    assert "MLAS): AMX-INT8" in compare.isa_paths([*avx512, "amx_tile", "amx_int8"])
    assert "BlockMatMul: avx512vnni;" in compare.isa_paths(avx512)
    assert "BlockMatMul: avx2;" in compare.isa_paths(["avx2", "fma"])
    monkeypatch.setenv("BCT_ONNX_ISA", "amx")
    monkeypatch.setenv("BCT_ONNX_AMX_EMULATE", "1")
    assert "amx (BCT_ONNX_ISA) with emulated tiles" in compare.isa_paths(avx512)


def test_bench_matmul_forced_isa_sets_and_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """--compare-isa creates its sessions with the path forced (amx-emulated: amx with emulated tiles) and
    leaves the environment as it found it."""
    bench = _load("bench_matmul")
    monkeypatch.setenv("BCT_ONNX_ISA", "scalar")
    monkeypatch.delenv("BCT_ONNX_AMX_EMULATE", raising=False)
    with bench._forced_isa("amx-emulated"):
        assert os.environ["BCT_ONNX_ISA"] == "amx" and os.environ["BCT_ONNX_AMX_EMULATE"] == "1"
    assert os.environ["BCT_ONNX_ISA"] == "scalar" and "BCT_ONNX_AMX_EMULATE" not in os.environ
    with bench._forced_isa("avx512vnni"):
        assert os.environ["BCT_ONNX_ISA"] == "avx512vnni" and "BCT_ONNX_AMX_EMULATE" not in os.environ


def test_entropy_coding_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/entropy_coding.py on a tiny compressed encoder: bits a value, sizes, identical outputs."""
    import numpy as np
    import onnx
    import onnx.parser

    import bct_onnx

    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (int64[N, S] input_ids) => (float[N, S, 64] y) {\n  e = Gather(table, input_ids)\n  y = MatMul(e, w)\n}"
    )
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.standard_normal((1000, 64)).astype(np.float32), "table"),
            onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w"),
        ]
    )
    fp32, compressed = tmp_path / "fp32.onnx", tmp_path / "bct.onnx"
    onnx.save(proto, fp32)
    bct_onnx.compress(fp32, compressed, calibration="none", weight_bits=4)
    assert _load("entropy_coding").main([str(compressed), "--fp32", str(fp32), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "coded tensors: 2," in out and "outputs identical on random token ids: True" in out
    assert "4.000 ->" in out and "session creation, median of 1 interleaved" in out


def test_bench_matmul_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One small GEMM shape against ORT int8 and a small bandwidth chain, one timed run each: the CPU
    model and ISA lines, every case row, the JSON, nothing written to the CWD."""
    from bct_onnx import runtime

    try:
        runtime.library_path()
    except runtime.LibraryNotFoundError as err:
        pytest.skip(str(err))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "matmul.json"
    bench = _load("bench_matmul")
    argv = ["--shapes", "16x64x48", "--repeat", "1", "--warmup", "0", "--rounds", "1", "--clock", "cpu"]
    argv += ["--gemv-rows", "1,2", "--gemv-layers", "2", "--gemv-k", "256", "--json", str(out)]
    argv += ["--gemv-shapes", "64x48x5a", "--gemv-set-mb", "1"]
    assert bench.main(argv) == 0
    assert os.listdir(cwd) == []
    text = capsys.readouterr().out
    assert "CPU: " in text and "ISA paths: bct-onnx BlockMatMul: " in text
    payload = json.loads(out.read_text())
    assert {row["case"] for row in payload["results"]} == {case.label for case in bench.CASES}
    assert all(row["median_ms"] > 0 for row in payload["results"])
    cases = [row["case"] for row in payload["gemv"]]
    assert (
        cases[0] == "STREAM-like read, 1 thr" and "M=2 256x256 1 thr BCT BlockMatMul 4b b32 act int8" in cases
    )
    assert "M=1 64x48 5b asym 1 thr BCT" in cases
    assert all(row["gbps"] > 0 for row in payload["gemv"])


def test_stream_read_reads_every_part_on_each_call_and_ends_its_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """StreamRead: a call returns only once every thread has read its part (each part once a call, the
    parts covering the array); one thread reads on the caller; close() ends the threads."""
    import contextlib
    import threading
    import time

    compare = _load("compare_speed")
    seen: list[tuple[int, int]] = []
    real_max = compare.np.max

    def slow_max(part):  # the read of a part takes a while: an early return would miss it
        time.sleep(0.02)
        seen.append((part.ctypes.data, part.size))
        return real_max(part)

    monkeypatch.setattr(compare.np, "max", slow_max)
    before = threading.active_count()
    with contextlib.closing(compare.StreamRead(1, 1)) as read:
        assert threading.active_count() == before
        read()
        assert seen == [(read.data.ctypes.data, 1 << 20)]
    read = compare.StreamRead(2, 2)
    assert read.nbytes == 2 << 20 and threading.active_count() == before + 2
    for call in range(1, 4):
        seen.clear()
        read()
        assert sorted(seen) == [
            (read.data.ctypes.data, 1 << 20),
            (read.data.ctypes.data + (1 << 20), 1 << 20),
        ], call
    read.close()
    assert threading.active_count() == before


def test_decoder_fake_quant_default_plan_is_the_decoder_default() -> None:
    """The plan the benchmark calls the decoder default gives each SmolLM2 weight what bct-onnx gives it."""
    from bct_onnx.config import (
        DECODER_SCALE_KIND,
        DECODER_TIED_TABLE_EXTRA_BITS,
        DECODER_TIED_TABLE_ZERO_POINTS,
        DECODER_WIDER_WEIGHTS,
        CompressConfig,
    )

    bench = _load("decoder_fake_quant")
    format_of = bench.plan_function("t5a-v6")
    base = CompressConfig().weight_bits
    table = format_of("model.embed_tokens.weight")
    assert (table.bits, table.scale_kind) == (base + DECODER_TIED_TABLE_EXTRA_BITS, DECODER_SCALE_KIND)
    assert (table.symmetric, table.zero_point_kind) == (False, DECODER_TIED_TABLE_ZERO_POINTS)
    v_proj = format_of("model.layers.3.self_attn.v_proj.weight")
    q_proj = format_of("model.layers.3.self_attn.q_proj.weight")
    assert (q_proj.bits, q_proj.scale_kind, q_proj.symmetric) == (base, DECODER_SCALE_KIND, True)
    assert v_proj.bits == base + dict(DECODER_WIDER_WEIGHTS)["/v_proj/"]
    assert bench.plan_function("8bit:down_proj")("model.layers.0.mlp.down_proj.weight").bits == 8


def test_profile_ops_shares_add_up_to_the_profiled_node_time(tmp_path: Path) -> None:
    """op_shares sums ORT's per-node kernel times by op type over the runs after the warm-up."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, save

    profile_ops = _load("profile_ops")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
    )
    model = tmp_path / "m.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, {"x": np.ones((64, 64), np.float32)})
    profile = Path(session.end_profiling())
    times, calls, runs = profile_ops.op_shares(profile, skip_runs=2)
    assert runs == 3
    assert set(times) == {"Relu", "Add"} and calls == {"Relu": 3, "Add": 3}
    assert all(t > 0 for t in times.values())
    with pytest.raises(SystemExit, match="5 runs profiled, need more than 5"):
        profile_ops.op_shares(profile, skip_runs=5)
    nodes, walls = profile_ops.node_times(profile, skip_runs=2)
    assert len(walls) == 3 and all(w > 0 for w in walls)
    assert {op for _, op in nodes} == {"Relu", "Add"} and all(count == 3 for _, count in nodes.values())
    assert sum(us for us, _ in nodes.values()) == pytest.approx(sum(times.values()))
    fastest, _ = profile_ops.node_times(profile, skip_runs=2, fastest=True)
    assert fastest.keys() == nodes.keys()
    assert all(0 < fastest[key][0] <= nodes[key][0] and fastest[key][1] == 3 for key in nodes)
    breakdown = profile_ops.run_breakdown(profile, skip_runs=2)
    assert [wall for wall, _, _ in breakdown] == walls
    assert sum(busy for _, busy, _ in breakdown) == pytest.approx(sum(us for us, _ in nodes.values()))
    assert all(busy > 0 and between == pytest.approx(wall - busy) for wall, busy, between in breakdown)


def test_profile_ops_names_weight_shapes() -> None:
    """Matrix products are grouped by their K x N weight (and bits when the node says)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    profile_ops = _load("profile_ops")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="float_mm"),
            helper.make_node(
                "BlockMatMul", ["y", "c", "s"], ["z"], name="block_mm", domain="ai.bct_onnx", K=8, N=3, bits=5
            ),
            helper.make_node("Relu", ["z"], ["r"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 3])],
        initializer=[numpy_helper.from_array(np.ones((4, 8), np.float32), "w")],
    )
    assert profile_ops.weight_shapes(helper.make_model(graph)) == {"float_mm": "4x8", "block_mm": "8x3 b5"}


def test_interleaved_calls_each_start_after_the_settle_pause() -> None:
    """Each timed call starts settle seconds after the previous one ended, so the previous session's
    spinning pool workers have blocked (back to back they held a core and doubled the next variant's time)."""
    compare = _load("compare_speed")
    ends: list[float] = []
    starts: list[float] = []

    def call() -> None:
        starts.append(time.perf_counter())
        ends.append(time.perf_counter())

    times = compare.interleaved_call_times([call, call], rounds=3, warmup=0, settle=0.02)
    assert [len(t) for t in times] == [3, 3]
    gaps = [start - end for end, start in zip(ends, starts[1:])]
    assert len(gaps) == 5 and min(gaps) >= 0.02
