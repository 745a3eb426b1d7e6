"""Hugging Face in and out: Hub ids resolved offline from a hub cache built here, calibration text
from JSONL and datasets files, and output directories that optimum's ORTModelFor... classes load
as they are (with bct_onnx.session_options() registering the library)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import bct_onnx
from bct_onnx.calibration import CalibrationError, calibration_texts
from bct_onnx.hub import HubInputError, parse_hub_id

pytest.importorskip("transformers", reason="the [hf] extra (transformers, optimum-onnx) is not installed")
pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed")

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files_from: Path) -> Path:
    """A huggingface_hub cache holding ``files_from`` as snapshot ``SNAPSHOT`` of ``repo_id`` (refs/main)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(p for p in files_from.iterdir() if p.is_file())):
        blob = blobs / f"blob{i:04d}"  # the cache's layout: snapshot entries are symlinks to blobs
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return root


@pytest.fixture()
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_parse_hub_id() -> None:
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("model.onnx") is None
    assert parse_hub_id("./org/name") is None
    assert parse_hub_id("/abs/path") is None
    assert parse_hub_id("a/b/c") is None


def test_hub_id_input_resolved_from_the_offline_cache(tmp_path: Path, offline_hub: Path) -> None:
    from bct_onnx.models.families import build_tiny
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    hub_cache(offline_hub, "tiny-org/tiny-bert", build_tiny("bert", tmp_path / "bert"))
    result = bct_onnx.compress("tiny-org/tiny-bert", f"{tmp_path}/out/", calibration="none")
    out = tmp_path / "out"
    assert result.report.output == str(out / "model.onnx")
    assert result.report.exported_from == str(offline_hub / "models--tiny-org--tiny-bert" / "snapshots" / SNAPSHOT)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx"]

    ids = np.array([[5, 17, 200, 3, 9, 1]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    direct = bct_onnx.session(out / "model.onnx").run(["last_hidden_state"], feeds)[0]
    model = ORTModelForFeatureExtraction.from_pretrained(
        out, session_options=bct_onnx.session_options(), provider="CPUExecutionProvider"
    )
    np.testing.assert_array_equal(np.asarray(model(**feeds).last_hidden_state), direct)


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path: Path, offline_hub: Path) -> None:
    with pytest.raises(HubInputError) as caught:
        bct_onnx.compress("tiny-org/not-cached", tmp_path / "out.onnx", calibration="none")
    assert str(caught.value) == (
        f"'tiny-org/not-cached' is neither a local path nor cached in the Hugging Face cache {offline_hub} "
        "(HF_HUB_OFFLINE is set, so nothing is downloaded)"
    )


def test_output_directory_needs_its_parent(tmp_path: Path, mlp_path: Path) -> None:
    with pytest.raises(bct_onnx.errors.ModelFileError, match="its parent .*missing.* does not exist"):
        bct_onnx.compress(mlp_path, f"{tmp_path}/missing/out/", calibration="none")


def test_output_directory_for_an_onnx_input(tmp_path: Path, mlp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()  # an existing directory without the trailing slash is a directory too
    result = bct_onnx.compress(mlp_path, out, calibration="none")
    assert result.report.output == str(out / "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_jsonl_calibration_records(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    records = [{"text": f"sentence number {i} about the sea", "id": i} for i in range(100)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    texts, _, description = calibration_texts(str(path))
    assert len(texts) == 64 and texts[0] == "sentence number 0 about the sea" and texts[-1].startswith("sentence number 99")
    assert description == f"64 records of {path}"

    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match=rf'^{path}:2: a record needs a string field "text"$'):
        calibration_texts(str(path))
    path.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match=rf"^{path}:2: not a JSON object"):
        calibration_texts(str(path))


def test_datasets_file_calibration(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is not installed: only .txt / .jsonl calibration files")
    rows = {"text": [f"line {i} of the corpus" for i in range(10)], "label": list(range(10))}
    dataset = datasets.Dataset.from_dict(rows)
    dataset.to_parquet(str(tmp_path / "calib.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "calib.parquet", tmp_path / "saved"):
        texts, _, description = calibration_texts(str(source))
        assert texts == rows["text"], source
        assert description == f"10 records of {source}"
    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(CalibrationError, match=r'has no "text" column \(columns: body\)'):
        calibration_texts(str(tmp_path / "bad.parquet"))


def test_minilm_output_directory_loads_in_optimum(tmp_path: Path) -> None:
    """A plain-transformers copy of all-MiniLM-L6-v2 (its weights and tokenizer, without the
    sentence-transformers pooling modules) -> DIR/ -> ORTModelForFeatureExtraction."""
    from bct_onnx.models import minilm
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    source = tmp_path / "minilm"
    source.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (source / name).symlink_to(minilm.model_dir() / name)
    out = tmp_path / "minilm-bct"
    bct_onnx.compress(source, f"{out}/", calibration="none")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.onnx", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"
    ]
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = ORTModelForFeatureExtraction.from_pretrained(
        out, session_options=bct_onnx.session_options(), provider="CPUExecutionProvider"
    )
    sentences = ["The compressed encoder still reads.", "A second, longer sentence pads the first one out."]
    feeds = dict(tokenizer(sentences, padding=True, return_tensors="np"))
    hidden = np.asarray(model(**feeds).last_hidden_state)
    session = bct_onnx.session(out / "model.onnx")
    direct = session.run(["last_hidden_state"], {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    assert hidden.shape == (2, feeds["input_ids"].shape[1], 384)
    np.testing.assert_array_equal(hidden, direct)


def test_sentence_transformers_folder_loads_in_its_onnx_backend(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 as shipped (a sentence-transformers folder: pooling module, modules.json)
    -> DIR/ -> SentenceTransformer(DIR, backend="onnx"), whose embeddings are the compressed model's."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from bct_onnx.models import minilm

    out = tmp_path / "minilm-st"
    bct_onnx.compress(minilm.model_dir(), f"{out}/", calibration="none")
    names = {p.name for p in out.iterdir()}
    assert {"modules.json", "sentence_bert_config.json", "1_Pooling", "model.onnx"} <= names
    model = sentence_transformers.SentenceTransformer(
        str(out), backend="onnx", model_kwargs={"session_options": bct_onnx.session_options()}
    )
    sentences = ["The compressed encoder still reads.", "A second, longer sentence pads the first one out."]
    embedded = model.encode(sentences)
    tokenizer_feeds = model.tokenize(sentences)
    session = bct_onnx.session(out / "model.onnx")
    feeds = {i.name: np.asarray(tokenizer_feeds[i.name]) for i in session.get_inputs()}
    direct = session.run(["sentence_embedding"], feeds)[0]  # the export's own pooling, in the graph
    cosine = (embedded * direct).sum(1) / np.linalg.norm(embedded, axis=1) / np.linalg.norm(direct, axis=1)
    assert embedded.shape == (2, 384) and cosine.min() > 0.9999, cosine


def test_tiny_llama_generates_with_kv_cache_in_optimum(tmp_path: Path) -> None:
    from bct_onnx.models.families import build_tiny
    from optimum.onnxruntime import ORTModelForCausalLM

    source = build_tiny("llama", tmp_path / "llama")
    out = tmp_path / "llama-bct"
    bct_onnx.compress(source, f"{out}/", task="text-generation-with-past", calibration="none")
    assert {"config.json", "generation_config.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    model = ORTModelForCausalLM.from_pretrained(
        out, session_options=bct_onnx.session_options(), provider="CPUExecutionProvider", use_cache=True
    )
    assert model.use_cache
    prompt = np.array([[11, 42, 7, 99, 3]], dtype=np.int64)
    import torch

    generated = model.generate(torch.from_numpy(prompt), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new_tokens = generated[0, prompt.shape[1]:].numpy()
    assert new_tokens.shape == (6,)

    # The first new token is the argmax of the compressed model's own logits, run directly.
    session = bct_onnx.session(out / "model.onnx")
    feeds: dict[str, np.ndarray] = {"input_ids": prompt, "attention_mask": np.ones_like(prompt),
                                    "position_ids": np.arange(prompt.shape[1], dtype=np.int64)[None]}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            heads, head_dim = value.shape[1], value.shape[3]
            feeds[value.name] = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
    logits = session.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0]
    assert new_tokens[0] == int(np.argmax(logits[0, -1]))


@pytest.mark.slow  # compression and generation of the 135M decoder
def test_smollm2_generates_text_in_optimum_and_a_pipeline(tmp_path: Path, smollm2_past_export: Path) -> None:
    """optimum's export folder of the real decoder (shared with other tests; the export inside compress
    of an HF directory is the tiny Llama's test above) -> DIR/ -> optimum and a transformers pipeline."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer, pipeline

    out = tmp_path / "smollm2-bct"
    bct_onnx.compress(smollm2_past_export.parent, f"{out}/", calibration="none")
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = ORTModelForCausalLM.from_pretrained(
        out, session_options=bct_onnx.session_options(), provider="CPUExecutionProvider"
    )
    assert model.use_cache
    prompt = "The capital of France is"
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape[1] == encoded["input_ids"].shape[1] + 8
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    assert text.startswith(prompt) and any(ch.isalpha() for ch in text[len(prompt):]), text

    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    story = generate("Once upon a time", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert story.startswith("Once upon a time") and len(story) > len("Once upon a time")
