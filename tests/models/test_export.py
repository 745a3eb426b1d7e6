"""export_hf_directory / is_hf_model_dir: the errors a user gets, offline mode, the model dir left alone."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from bct_onnx.models.export import (
    ExportError,
    ModelDirError,
    export_hf_directory,
    export_hf_files,
    hub_offline,
    infer_task,
    is_hf_model_dir,
)
from bct_onnx.models.families import build_tiny


def test_is_hf_model_dir(tmp_path: Path) -> None:
    assert not is_hf_model_dir(tmp_path)
    assert not is_hf_model_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    assert not is_hf_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    assert is_hf_model_dir(tmp_path)
    assert not is_hf_model_dir(tmp_path / "config.json")


def test_dir_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        ModelDirError,
        match=rf"{re.escape(str(tmp_path))} is not a Hugging Face model directory: no readable config.json",
    ):
        export_hf_directory(tmp_path, tmp_path.parent / "out")


def test_missing_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match=rf"{re.escape(str(tmp_path / 'nope'))} is not a directory"):
        export_hf_directory(tmp_path / "nope", tmp_path / "out")


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    model_dir = tmp_path / "weird"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}), encoding="utf-8")
    with pytest.raises(
        ModelDirError,
        match=rf"{re.escape(str(model_dir))}: architecture model_type='no_such_arch' is not supported",
    ):
        export_hf_directory(model_dir, tmp_path / "out")


def test_config_without_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}), encoding="utf-8")
    with pytest.raises(ModelDirError, match=r"config.json has no 'model_type'"):
        export_hf_directory(tmp_path, tmp_path.parent / "out")


def test_unsupported_task_lists_supported(tmp_path: Path) -> None:
    model_dir = build_tiny("bert", tmp_path / "bert")
    with pytest.raises(
        ModelDirError,
        match=r"task 'text-generation' is not supported for model_type='bert'; supported: "
        r"feature-extraction",
    ):
        export_hf_directory(model_dir, tmp_path / "out", task="text-generation")


def test_output_inside_model_dir_is_refused(tmp_path: Path) -> None:
    model_dir = build_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(ModelDirError, match=r"inside the model directory"):
        export_hf_directory(model_dir, model_dir / "onnx")
    with pytest.raises(ModelDirError, match=r"inside the model directory"):
        export_hf_directory(model_dir, model_dir)


def test_missing_optimum_onnx_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = build_tiny("gpt2", tmp_path / "gpt2")
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # import now raises ImportError
    with pytest.raises(
        ExportError,
        match=rf"exporting {re.escape(str(model_dir))} needs optimum's ONNX exporter: "
        r"pip install optimum-onnx",
    ):
        export_hf_directory(model_dir, tmp_path / "out")


def test_infer_task_from_head_class(tmp_path: Path) -> None:
    assert infer_task(build_tiny("gpt2", tmp_path / "gpt2")) == "text-generation-with-past"
    assert infer_task(build_tiny("bert", tmp_path / "bert")) == "feature-extraction"
    assert infer_task(build_tiny("flan-t5", tmp_path / "t5")) == "text2text-generation-with-past"


def test_export_leaves_model_dir_untouched_and_returns_graph(tmp_path: Path) -> None:
    model_dir = build_tiny("gpt2", tmp_path / "gpt2")
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    path = export_hf_directory(model_dir, tmp_path / "out", task="text-generation")
    assert path == (tmp_path / "out" / "model.onnx").resolve()
    assert path.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_multi_graph_export_names_the_graphs(tmp_path: Path) -> None:
    model_dir = build_tiny("bart", tmp_path / "bart")
    with pytest.raises(
        ExportError, match=r"produced 2 graphs \(decoder_model.onnx, encoder_model.onnx\); use "
    ):
        export_hf_directory(model_dir, tmp_path / "out", task="text2text-generation")
    files = export_hf_files(model_dir, tmp_path / "out2", task="text2text-generation")
    assert [p.name for p in files] == ["decoder_model.onnx", "encoder_model.onnx"]


def test_hub_offline_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        assert hub_constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert hub_constants.HF_HUB_OFFLINE is False
