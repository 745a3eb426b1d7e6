"""`bct-onnx compress` and `bct_onnx.compress` on a small model built here (embedding + 2-layer MLP).

Covers the happy path (in a subprocess and in-process): exact report fields, exact rewrite
counts, the output running under bct_onnx.session and agreeing with FP32 within a stated tolerance;
and bad inputs, each with the message the user gets and the exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bct_onnx
from bct_onnx import cli
from bct_onnx.config import DEFAULT_OPS

VOCAB, HIDDEN, FFN, OUT = 100, 64, 128, 32

# Relative L2 error of the compressed output against FP32 (||y - y_fp32|| / ||y_fp32||), per
# setting. Measured on this model (fixed seeds): 8-bit weights and int8 activations 0.011, 4-bit
# weights and embeddings (weight-only) 0.134. The bounds leave 1.5-3x headroom and still catch a
# wrong scale, a transposed weight or swapped outputs (all of which give errors near 1 or above).
REL_TOL_W8A8 = 0.03
REL_TOL_W4 = 0.2


def build_mlp(path: Path, seed: int = 0, opset: int = 17) -> Path:
    """ids [batch, seq] -> Gather(E) -> MatMul(W1) + b1 -> Relu -> MatMul(W2) -> [batch, seq, OUT]."""
    rng = np.random.default_rng(seed)
    init = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embedding"),
        numpy_helper.from_array(
            (rng.standard_normal((HIDDEN, FFN)) / np.sqrt(HIDDEN)).astype(np.float32), "w1"
        ),
        numpy_helper.from_array((0.1 * rng.standard_normal(FFN)).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((FFN, OUT)) / np.sqrt(FFN)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", OUT])],
        initializer=init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def mlp(tmp_path: Path) -> Path:
    return build_mlp(tmp_path / "mlp.onnx")


def ids() -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, size=(3, 7), dtype=np.int64)


def run_fp32(path: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids()})[0]


def run_compressed(path: Path) -> np.ndarray:
    sess = bct_onnx.session(path)
    return sess.run(None, {"ids": ids()})[0]


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def custom_op_types(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)  # debug snapshots leave weights out
    return sorted(n.op_type for n in model.graph.node if n.domain == bct_onnx.DOMAIN)


def cli_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter (the installed entry point's module)."""
    return subprocess.run(
        [sys.executable, "-m", "bct_onnx.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """cli.main in-process; argparse errors (SystemExit) become an exit code too."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = int(exc.code) if exc.code is not None else 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compress_subprocess_w8a8_report_and_numerics(mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "mlp.bct.onnx"
    report_path = tmp_path / "report.json"
    proc = cli_subprocess(
        "compress",
        str(mlp),
        "-o",
        str(out),
        "--weight-bits",
        "8",
        "--act-bits",
        "8",
        "--block-size",
        "32",
        "--ops",
        "MatMul,Gather",
        "--report",
        str(report_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    report = json.loads(report_path.read_text())
    for key in (
        "input_bytes",
        "output_bytes",
        "compression_ratio",
        "rewritten",
        "skipped",
        "config",
        "timings",
    ):
        assert key in report, key
    assert report["input_bytes"] == mlp.stat().st_size
    assert report["output_bytes"] == out.stat().st_size
    assert report["compression_ratio"] == pytest.approx(
        report["input_bytes"] / report["output_bytes"], rel=1e-3
    )
    assert report["rewritten"] == {"Gather": 1, "MatMul": 2}
    assert report["skipped"] == []
    assert report["config"]["weight_bits"] == 8
    assert report["config"]["act_bits"] == 8
    assert report["config"]["block_size"] == 32
    assert report["config"]["ops"] == ["Gather", "MatMul"]
    assert {"load", "compress", "save"} <= set(report["timings"])
    assert all(seconds >= 0 for seconds in report["timings"].values())
    # The human summary on stdout carries the same figures.
    assert f"{report['compression_ratio']:.2f}x smaller" in proc.stdout
    assert "rewritten: Gather 1, MatMul 2" in proc.stdout

    assert custom_op_types(out) == ["BlockGather", "BlockMatMul", "BlockMatMul"]
    assert rel_error(run_compressed(out), run_fp32(mlp)) <= REL_TOL_W8A8
    assert sorted(p.name for p in out.parent.iterdir()) == ["mlp.bct.onnx"]  # no temp files left


def test_compress_in_process_weight_only_4bit(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w4.onnx"
    report_path = tmp_path / "w4.json"
    code, stdout, stderr = run_main(
        capsys,
        "compress",
        str(mlp),
        "-o",
        str(out),
        "--weight-bits",
        "4",
        "--act-bits",
        "none",
        "--report",
        str(report_path),
    )
    assert code == 0, stderr
    report = json.loads(report_path.read_text())
    assert report["config"]["act_bits"] is None
    assert report["config"]["weight_bits"] == 4
    assert report["config"]["ops"] == sorted(DEFAULT_OPS)  # no --ops: the defaults
    assert report["rewritten"] == {"Gather": 1, "MatMul": 2}
    # 4-bit codes + one float16 scale per 32 values: well over 4x smaller for these fp32 tables.
    assert report["compression_ratio"] > 4.0
    assert "smaller" in stdout
    assert rel_error(run_compressed(out), run_fp32(mlp)) <= REL_TOL_W4


def test_compress_target_ratio_flag_plans_bits_per_tensor(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "budget.onnx"
    report_path = tmp_path / "budget.json"
    code, stdout, stderr = run_main(
        capsys, "compress", str(mlp), "-o", str(out), "--target-ratio", "5", "--act-bits", "none",
        "--calibration", "none", "--report", str(report_path),
    )
    assert code == 0, stderr
    report = json.loads(report_path.read_text())
    assert report["config"]["target_ratio"] == 5.0 and not report["config"]["budget_floor"]
    assert report["compression_ratio"] >= 5.0
    units = report["budget"]["units"]
    assert units and all(2 <= unit["bits"] <= 8 for unit in units)
    assert "budget:" in stdout
    args = cli.build_parser().parse_args(["compress", "in.onnx", "-o", "o.onnx", "--target-ratio", "none"])
    from bct_onnx.cli.flags import config_from_flags

    assert not config_from_flags(args, args.subparser).budgeted
    code, _, stderr = run_main(capsys, "compress", str(mlp), "-o", str(out), "--target-ratio", "0.5")
    assert code == 2 and "--target-ratio" in stderr


def test_compress_float_offsets_flag(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--asymmetric --zero-points float: weights and tables store float16 offsets; ORT runs the model."""
    out = tmp_path / "f.onnx"
    report_path = tmp_path / "f.json"
    code, _, stderr = run_main(
        capsys,
        "compress",
        str(mlp),
        "-o",
        str(out),
        "--asymmetric",
        "--zero-points",
        "float",
        "--act-bits",
        "none",
        "--report",
        str(report_path),
    )
    assert code == 0, stderr
    assert json.loads(report_path.read_text())["config"]["zero_points"] == "float"
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [n.input[3] for n in model.graph.node if n.op_type in ("BlockMatMul", "BlockGather")]
    assert len(zero_points) == 3
    assert all(inits[name].data_type == onnx.TensorProto.FLOAT16 for name in zero_points)
    assert rel_error(run_compressed(out), run_fp32(mlp)) <= REL_TOL_W4
    code, _, stderr = run_main(
        capsys, "compress", str(mlp), "-o", str(tmp_path / "g.onnx"), "--zero-points", "float"
    )
    assert code == 2 and "applies to asymmetric weights" in stderr
    code, _, stderr = run_main(
        capsys, "compress", str(mlp), "-o", str(tmp_path / "g.onnx"), "--zero-points", "half"
    )
    assert code == 2 and "invalid choice: 'half'" in stderr


def test_compress_only_matmul_leaves_gather(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mm.onnx"
    report_path = tmp_path / "mm.json"
    code, _, stderr = run_main(
        capsys, "compress", str(mlp), "-o", str(out), "--ops", "MatMul", "--report", str(report_path)
    )
    assert code == 0, stderr
    assert json.loads(report_path.read_text())["rewritten"] == {"MatMul": 2}
    assert custom_op_types(out) == ["BlockMatMul", "BlockMatMul"]
    assert "Gather" in [n.op_type for n in onnx.load(str(out)).graph.node]


def test_python_api_on_in_memory_model(mlp: Path) -> None:
    proto = onnx.load(str(mlp))
    model, report = bct_onnx.compress(proto, weight_bits=8, act_bits=8)
    assert report.rewritten == {"Gather": 1, "MatMul": 2}
    assert report.output is None
    assert report.sizes_measured_on == {"input": "serialized", "output": "serialized"}
    assert report.input_bytes == pytest.approx(mlp.stat().st_size, rel=0.01)
    assert report.compression_ratio > 3.0
    assert sorted(n.op_type for n in model.graph if n.domain == bct_onnx.DOMAIN) == [
        "BlockGather",
        "BlockMatMul",
        "BlockMatMul",
    ]


def test_python_api_leaves_an_onnx_ir_input_unchanged(mlp: Path) -> None:
    import onnx_ir as ir

    model = ir.load(mlp)
    before = [(n.op_type, n.domain) for n in model.graph]
    result = bct_onnx.compress(model, weight_bits=4)
    assert result.model is not model
    assert [(n.op_type, n.domain) for n in model.graph] == before


def test_debug_dir_keeps_input_snapshots_and_output(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    debug = tmp_path / "debug"
    code, _, stderr = run_main(
        capsys, "compress", str(mlp), "-o", str(tmp_path / "o.onnx"), "--debug-dir", str(debug)
    )
    assert code == 0, stderr
    names = sorted(p.name for p in debug.iterdir())
    assert names[0] == "00_input.onnx" and names[-1] == "99_output.onnx"
    assert any("QuantizeMatMulPass" in name for name in names)  # the pipeline's per-pass snapshots
    assert custom_op_types(debug / "99_output.onnx") == custom_op_types(tmp_path / "o.onnx")


def test_python_api_input_with_external_data(mlp: Path, tmp_path: Path) -> None:
    """input_bytes counts the external data file; the input's files are left as they were."""
    from bct_onnx import model_io

    src = tmp_path / "ext" / "m.onnx"
    model_io.save(model_io.load(mlp), src, external_data=True, size_threshold_bytes=0)
    data = tmp_path / "ext" / "m.onnx.data"
    before = (src.read_bytes(), data.read_bytes())
    out = tmp_path / "o.onnx"
    _, report = bct_onnx.compress(src, out, weight_bits=8, act_bits=8)
    assert report.input_bytes == src.stat().st_size + data.stat().st_size
    assert report.output_bytes == out.stat().st_size
    assert (src.read_bytes(), data.read_bytes()) == before
    assert rel_error(run_compressed(out), run_fp32(mlp)) <= REL_TOL_W8A8


def test_python_api_rejects_unknown_override(mlp: Path) -> None:
    with pytest.raises(TypeError, match="unknown config option.*weight_bitz"):
        bct_onnx.compress(mlp, weight_bitz=4)


# ---------------------------------------------------------------- bad inputs


def test_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_main(
        capsys, "compress", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")
    )
    assert code == 1
    assert stderr.strip() == f"bct-onnx: error: input not found: {tmp_path / 'nope.onnx'}"
    assert not (tmp_path / "o.onnx").exists()


def test_not_an_onnx_file_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are my notes, not a model\n")
    proc = cli_subprocess("compress", str(bad), "-o", str(tmp_path / "o.onnx"), cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert lines[0].startswith(f"bct-onnx: error: {bad} is not an ONNX model")
    assert not (tmp_path / "o.onnx").exists()


def test_verbose_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    code, _, stderr = run_main(capsys, "compress", str(bad), "-o", str(tmp_path / "o.onnx"), "--verbose")
    assert code == 1
    assert "Traceback" in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"bct-onnx: error: {bad} is not an ONNX model")


@pytest.mark.parametrize("spelling", ["same", "dotdot", "hardlink"])
def test_output_equal_to_input_is_refused(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    original = mlp.read_bytes()
    if spelling == "same":
        output = mlp
    elif spelling == "dotdot":
        (tmp_path / "sub").mkdir()
        output = tmp_path / "sub" / ".." / mlp.name
    else:
        output = tmp_path / "alias.onnx"
        os.link(mlp, output)
    code, _, stderr = run_main(capsys, "compress", str(mlp), "-o", str(output))
    assert code == 1
    assert stderr.startswith("bct-onnx: error: refusing to overwrite the input")
    assert mlp.read_bytes() == original  # byte-identical
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_directory_without_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    code, _, stderr = run_main(capsys, "compress", str(empty), "-o", str(tmp_path / "o.onnx"))
    assert code == 1
    assert stderr.strip() == (
        f"bct-onnx: error: directory {empty} contains no .onnx model and is not a Hugging Face model "
        "directory (no config.json naming a model_type)"
    )


def test_hf_directory_of_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    code, _, stderr = run_main(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o.onnx"))
    assert code == 1
    assert stderr.startswith("bct-onnx: error: ")
    assert "model_type='no-such-architecture' is not supported by optimum's ONNX exporter" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "o.onnx").exists()


def test_model_the_passes_cannot_take_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = build_mlp(tmp_path / "opset10.onnx", opset=10)
    code, _, stderr = run_main(capsys, "compress", str(old), "-o", str(tmp_path / "o.onnx"))
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bct-onnx: error: ")
    assert "opset 10" in lines[0]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        (
            "--act-bits",
            "bogus",
            "argument --act-bits: expected an integer in 2..8 or 'none' (weight-only), got 'bogus'",
        ),
        ("--block-size", "0", "argument --block-size: expected a positive integer, got 0"),
        ("--block-size", "x", "argument --block-size: expected a positive integer, got 'x'"),
        ("--weight-bits", "9", "argument --weight-bits: expected an integer in 2..8, got 9"),
        ("--weight-bits", "1", "argument --weight-bits: expected an integer in 2..8, got 1"),
        ("--ops", "MatMul,Conv", "argument --ops: unsupported op type(s) Conv; supported: "),
        ("--scale-kind", "int8", "argument --scale-kind: invalid choice: 'int8'"),
    ],
)
def test_bad_flag_values_are_argparse_errors(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    code, _, stderr = run_main(capsys, "compress", str(mlp), "-o", str(tmp_path / "o.onnx"), flag, value)
    assert code == 2
    assert message in stderr
    assert "usage: bct-onnx compress" in stderr
    assert not (tmp_path / "o.onnx").exists()


def test_missing_output_flag(mlp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_main(capsys, "compress", str(mlp))
    assert code == 2
    assert "the following arguments are required: -o/--output" in stderr


def test_console_script_is_installed(tmp_path: Path) -> None:
    """`pip install .` puts the `bct-onnx` command next to this interpreter's scripts."""
    import shutil
    import sysconfig

    script = Path(sysconfig.get_path("scripts")) / "bct-onnx"
    found = str(script) if script.is_file() else shutil.which("bct-onnx")
    assert found, f"bct-onnx command not found in {script.parent} or on PATH"
    proc = subprocess.run(
        [found, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"bct-onnx {bct_onnx.__version__}"


@pytest.mark.parametrize(
    "command",
    [["compress", "in.onnx", "-o", "out.onnx"], ["demo"], ["eval", "m.onnx"], ["generate", "m.onnx", "--prompt", "x"]],
)
def test_every_command_reads_the_same_compression_flags(command: list[str]) -> None:
    from bct_onnx.api import make_config
    from bct_onnx.cli.flags import config_from_flags
    from bct_onnx.config_file import apply_controls

    flags = ["--weight-bits", "8", "--act-bits", "none", "--asymmetric", "--op-bits", "Gelu=off"]
    args = cli.build_parser().parse_args([*command, *flags])
    expected = apply_controls(make_config(weight_bits=8, act_bits=None, symmetric=False), ["Gelu=off"])
    assert config_from_flags(args, args.subparser) == expected


def test_cli_docstring_lists_every_command() -> None:
    import argparse

    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"compress", "inspect", "demo", "eval", "generate"}
    for name in commands.choices:
        assert f"\n  {name} " in (cli.__doc__ or "")


def test_rotate_flag_switches_the_rotation_on() -> None:
    from bct_onnx.cli.flags import config_from_flags

    args = cli.build_parser().parse_args(["compress", "in.onnx", "-o", "out.onnx", "--rotate"])
    assert config_from_flags(args, args.subparser).rotation is True
    args = cli.build_parser().parse_args(["compress", "in.onnx", "-o", "out.onnx"])
    assert config_from_flags(args, args.subparser).rotation is False


def test_debug_dir_holds_graphs_not_weights_unless_asked(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def debug_bytes(*extra: str) -> int:
        debug = tmp_path / f"debug{len(extra)}"
        code, _, stderr = run_main(
            capsys, "compress", str(mlp), "-o", str(tmp_path / "o.onnx"), "--debug-dir", str(debug), *extra
        )
        assert code == 0, stderr
        return sum(p.stat().st_size for p in debug.iterdir())

    bounded, full = debug_bytes(), debug_bytes("--debug-weights")
    assert bounded * 4 < full  # the MLP's weights dominate every snapshot


def test_explicit_tokenizer_that_cannot_load_is_an_error(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{")
    out = tmp_path / "o.onnx"
    code, _, stderr = run_main(capsys, "compress", str(mlp), "-o", str(out), "--tokenizer", str(broken))
    assert code == 1 and stderr.count("\n") == 1
    assert f"cannot load the tokenizer in {broken}" in stderr and not out.exists()
    code, _, stderr = run_main(capsys, "compress", str(mlp), "-o", str(out), "--tokenizer", str(tmp_path / "nope"))
    assert code == 1 and "no such directory" in stderr and not out.exists()


def test_override_that_matches_no_node_is_an_error(
    mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.onnx"
    code, _, stderr = run_main(
        capsys, "compress", str(mlp), "-o", str(out), "--override", "no_such_layer*:weight_bits=8"
    )
    assert code == 1 and "override pattern 'no_such_layer*' matches no node" in stderr and not out.exists()


def test_task_on_an_onnx_input_is_an_error(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_main(capsys, "compress", str(mlp), "-o", str(tmp_path / "o.onnx"), "--task", "fill-mask")
    assert code == 1 and "--task fill-mask" in stderr and "already an ONNX model" in stderr


def test_progress_moves_inside_a_pass_per_node(mlp: Path) -> None:
    from bct_onnx.passes import compress_model
    from bct_onnx.passes.framework import NODE_PROGRESS

    seen: list[tuple[str, int, int]] = []
    model = bct_onnx.model_io.load(mlp)
    compress_model(model, bct_onnx.CompressConfig(), node_progress=lambda *event: seen.append(event))
    matmul = [(done, total) for name, done, total in seen if name == "QuantizeMatMulPass"]
    assert matmul and matmul[0][0] == 0 and all(total == matmul[0][1] for _, total in matmul)
    assert [done for done, _ in matmul] == list(range(matmul[0][1]))
    assert NODE_PROGRESS.get() is None  # reset after the pipeline


def test_console_script_leaves_its_objects_to_the_os_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as the process's command line (argv None: the console script, python -m bct_onnx), the command
    freezes the objects alive at its end (gc.freeze), so the interpreter's final collections skip them (a
    compressed model's graph: ~0.5 s of SmolLM2's compile); called with arguments (in-process use), not."""
    import gc

    import bct_onnx.cli.app

    monkeypatch.setattr(bct_onnx.cli.app, "main", lambda argv: 0)
    gc.unfreeze()
    try:
        assert cli.main(["compress"]) == 0 and gc.get_freeze_count() == 0
        assert cli.main() == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
