"""bct_onnx.model_io: atomic saves, external data, refusing to overwrite the input, clear errors."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bct_onnx import model_io
from bct_onnx.errors import ModelFileError, OverwriteInputError


def _matmul_model(k: int = 64, n: int = 32, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"),
            helper.make_node("Add", ["H", "B"], ["Y"], name="add"),
        ],
        "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", n])],
        initializer=[weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _write(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def _initializer_arrays(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: value.const_value.numpy()
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
    }


def test_load_save_round_trip_single_file(tmp_path: Path) -> None:
    src = _write(_matmul_model(), tmp_path / "in.onnx")
    model = model_io.load(src)
    written = model_io.save(model, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx"]
    assert not (tmp_path / "out.onnx.data").exists()
    again = model_io.load(tmp_path / "out.onnx")
    expected = _initializer_arrays(model_io.load(src))
    got = _initializer_arrays(again)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert model_io.file_bytes(tmp_path / "out.onnx") == (tmp_path / "out.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_external_data_round_trip_with_forced_small_threshold(tmp_path: Path) -> None:
    src = _write(_matmul_model(), tmp_path / "in.onnx")
    model = model_io.load(src)
    weight_bytes = 64 * 32 * 4
    out = tmp_path / "sub" / "big.onnx"
    written = model_io.save(model, out, large_model_bytes=1000, size_threshold_bytes=200)
    data = tmp_path / "sub" / "big.onnx.data"
    assert written == [out, data]
    # W (8192 bytes) goes to the data file, the bias (128 bytes, below the threshold) stays inline.
    assert data.stat().st_size == weight_bytes
    assert model_io.file_bytes(out) == out.stat().st_size + weight_bytes
    proto = onnx.load(str(out), load_external_data=False)
    locations = {t.name: t.data_location for t in proto.graph.initializer}
    assert locations == {"W": TensorProto.EXTERNAL, "B": TensorProto.DEFAULT}
    loaded = model_io.load(out)
    assert model_io.external_data_files(loaded) == {data.absolute()}
    expected = _initializer_arrays(model_io.load(src))
    got = _initializer_arrays(loaded)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    # Saving the externally-stored model again as a small model inlines everything.
    small = tmp_path / "small.onnx"
    model_io.save(loaded, small)
    inlined = onnx.load(str(small), load_external_data=False)
    assert {t.data_location for t in inlined.graph.initializer} == {TensorProto.DEFAULT}
    # Loading reads its weights in place: the .onnx file is then their only data file.
    assert model_io.external_data_files(model_io.load(small)) <= {small.absolute()}
    # ...and the model object still points at its own data file afterwards.
    assert model_io.external_data_files(loaded) == {data.absolute()}
    # No temporary files are left anywhere.
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["big.onnx", "big.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "small.onnx", "sub"]


def test_auto_external_data_only_above_large_model_bytes(tmp_path: Path) -> None:
    model = model_io.load(_write(_matmul_model(), tmp_path / "in.onnx"))
    model_io.save(model, tmp_path / "a.onnx", large_model_bytes=10**9)
    assert not (tmp_path / "a.onnx.data").exists()
    model_io.save(model, tmp_path / "b.onnx", large_model_bytes=100)
    assert (tmp_path / "b.onnx.data").exists()


def _failing_ir_save(model: ir.Model, path: os.PathLike[str], **kwargs: object) -> None:
    """Writes part of the model, then fails, as a full disk or a kill would."""
    Path(path).write_bytes(b"partial model")
    if kwargs.get("external_data"):
        (Path(path).parent / str(kwargs["external_data"])).write_bytes(b"partial data")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("external", [False, True])
def test_failing_save_leaves_no_partial_output_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    model = model_io.load(_write(_matmul_model(), tmp_path / "in.onnx"))
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(model_io.ir, "save", _failing_ir_save)
    monkeypatch.setattr(model_io, "write_inline", _failing_ir_save)  # the single-file writer
    with pytest.raises(OSError, match="No space left"):
        model_io.save(model, tmp_path / "out.onnx", external_data=external, size_threshold_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_failing_save_keeps_the_previous_output_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_io.load(_write(_matmul_model(), tmp_path / "in.onnx"))
    out = tmp_path / "out.onnx"
    model_io.save(model, out)
    previous = out.read_bytes()
    monkeypatch.setattr(model_io, "write_inline", _failing_ir_save)  # the single-file writer
    with pytest.raises(OSError):
        model_io.save(model, out)
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_save_refuses_to_overwrite_protected_input(tmp_path: Path) -> None:
    src = _write(_matmul_model(), tmp_path / "in.onnx")
    original = src.read_bytes()
    model = model_io.load(src)
    with pytest.raises(OverwriteInputError, match="refusing to overwrite the input"):
        model_io.save(model, src, protected=[src])
    # The same file reached through another path (a hard link) is refused too.
    link = tmp_path / "alias.onnx"
    os.link(src, link)
    with pytest.raises(OverwriteInputError, match="refusing to overwrite the input"):
        model_io.save(model, link, protected=[src])
    assert src.read_bytes() == original


def test_output_whose_data_file_is_the_input_data_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    model_io.save(model_io.from_proto(_matmul_model()), src, external_data=True, size_threshold_bytes=0)
    data = tmp_path / "in.onnx.data"
    # Output "in.onnx" elsewhere is fine; output whose data file would be in.onnx.data is not.
    with pytest.raises(OverwriteInputError, match="external data file in.onnx.data"):
        model_io.check_output_path(tmp_path / "in.onnx", protected=[data])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"input not found: .*nope\.onnx"):
        model_io.load(tmp_path / "nope.onnx")


@pytest.mark.parametrize("content", [b"hello, this is not an ONNX model\n", os.urandom(512)])
def test_not_an_onnx_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"bad\.onnx is not an ONNX model"):
        model_io.load(bad)


def test_empty_file_is_not_a_model(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"empty\.onnx is not an ONNX model"):
        model_io.load(empty)


def test_directory_without_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(ModelFileError, match="contains no .onnx model"):
        model_io.load(tmp_path)


def test_directory_with_one_model_loads_it(tmp_path: Path) -> None:
    _write(_matmul_model(), tmp_path / "whatever.onnx")
    assert model_io.resolve_model_file(tmp_path) == tmp_path / "whatever.onnx"
    assert len(model_io.load(tmp_path).graph) == 2


def test_directory_with_several_models_asks_which(tmp_path: Path) -> None:
    _write(_matmul_model(), tmp_path / "a.onnx")
    _write(_matmul_model(), tmp_path / "b.onnx")
    with pytest.raises(ModelFileError, match=r"several \.onnx models \(a\.onnx, b\.onnx\)"):
        model_io.load(tmp_path)


def test_missing_external_data_file_is_named(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    model_io.save(model_io.from_proto(_matmul_model()), src, external_data=True, size_threshold_bytes=0)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelFileError, match=r"external data files that do not exist: .*m\.onnx\.data"):
        model_io.load(src)


def test_single_file_over_the_protobuf_limit_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The single-file writer counts the bytes before writing (a 2.2 GB model is too slow for a test:
    the limit is lowered instead)."""
    from bct_onnx import inline_data

    model = model_io.load(_write(_matmul_model(), tmp_path / "in.onnx"))
    monkeypatch.setattr(inline_data, "PROTOBUF_LIMIT", 4096)
    with pytest.raises(ModelFileError, match=r"exceed protobuf's 2 GB limit\): save it with external data"):
        model_io.save(model, tmp_path / "out.onnx", external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


# ---- issue 11: special files, stale temporary directories, SIGTERM, one map per data file --------------

def test_fifo_output_and_report_are_refused_and_left_alone(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model = model_io.from_proto(_matmul_model())
    with pytest.raises(ModelFileError, match=r"output .*fifo is a FIFO, not a regular file; refusing to replace it"):
        model_io.save(model, fifo)
    with pytest.raises(ModelFileError, match=r"report .*fifo is a FIFO"):
        model_io.check_target(fifo, [], "report")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


@pytest.mark.parametrize("what", ["output", "report"])
def test_device_node_is_refused_before_any_write(what: str) -> None:
    """Only the check runs: nothing is ever written to a system path."""
    with pytest.raises(ModelFileError, match=rf"{what} /dev/null is a device, not a regular file"):
        if what == "output":
            model_io.check_output_path("/dev/null", [])
        else:
            model_io.check_target("/dev/null", [], what)


def test_output_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ModelFileError, match=r"output .*plain/sub/out.onnx cannot be written: .*plain is a file"):
        model_io.save(model_io.from_proto(_matmul_model()), tmp_path / "plain" / "sub" / "out.onnx")


def test_debug_dir_that_is_a_file_or_holds_the_input_is_refused(tmp_path: Path) -> None:
    src = _write(_matmul_model(), tmp_path / "00_input.onnx")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFileError, match="--debug-dir .*file exists and is not a directory"):
        model_io.check_debug_dir(tmp_path / "file", [src])
    with pytest.raises(OverwriteInputError, match="it holds the input file 00_input.onnx"):
        model_io.check_debug_dir(tmp_path, [src])
    model_io.check_debug_dir(tmp_path / "debug", [src])  # a new folder is fine


def test_stale_temp_dirs_of_killed_saves_are_removed_live_and_unknown_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out.onnx"
    stale, live, unknown = (tmp_path / f".out.onnx.{tag}.tmp" for tag in ("dead0001", "live0001", "old00001"))
    for folder in (stale, live, unknown):
        folder.mkdir()
        (folder / "out.onnx").write_bytes(b"partial")
    (stale / model_io.TEMP_LOCK_NAME).touch()
    (live / model_io.TEMP_LOCK_NAME).touch()
    held = os.open(live / model_io.TEMP_LOCK_NAME, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another save in progress
    try:
        with caplog.at_level("WARNING", logger="bct_onnx.model_io"):
            model_io.save(model_io.from_proto(_matmul_model()), out)
    finally:
        os.close(held)
    assert not stale.exists()
    assert live.is_dir() and unknown.is_dir()
    assert f"removed {stale}" in caplog.text
    assert f"{unknown} is a temporary directory left by an interrupted save" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["out.onnx"]


_SIGTERM_DURING_SAVE = """
import os, signal, sys
from bct_onnx import model_io
model = model_io.load(sys.argv[1])
def callback(tensor, info):
    os.kill(os.getpid(), signal.SIGTERM)
model_io.save(model, sys.argv[2], external_data=True, size_threshold_bytes=0, callback=callback)
"""


def test_sigterm_during_save_removes_the_temporary_directory(tmp_path: Path) -> None:
    src = _write(_matmul_model(), tmp_path / "in.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _SIGTERM_DURING_SAVE, str(src), str(out_dir / "out.onnx")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "TerminatedError: terminated by signal 15" in done.stderr
    assert list(out_dir.iterdir()) == []


def test_external_data_is_read_without_mapping_the_file(tmp_path: Path) -> None:
    """onnx-ir maps the whole file once per tensor (9 GB of address space for a 90 MB model) and keeps
    what it read; weights are read with pread instead, and nothing stays mapped."""
    proto = _matmul_model()
    for i in range(20):
        proto.graph.initializer.append(numpy_helper.from_array(np.full((64, 16), i, np.float32), f"extra{i}"))
    src = tmp_path / "in.onnx"
    onnx.save_model(proto, str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    model = model_io.load(src)
    arrays = _initializer_arrays(model)
    assert all(float(arrays[f"extra{i}"][0, 0]) == i for i in range(20))
    data_path = str((tmp_path / "in.onnx.data").resolve())
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(data_path)]
    assert maps == []
