"""Every seed family: tiny random-weight model built offline, exported, run in ORT, checked against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from bct_onnx.models.families import FAMILIES, VOCAB, dummy_inputs, export_tiny, get_family, run_dummy

# ORT vs torch on the same FP32 weights: only summation order differs. Tiny random models give
# logits of order 0.1-1, so 1e-4 absolute is about 1e-4 relative and still catches a wrong mask,
# position offset or cache layout (those move logits by 1e-2 or more).
ATOL = 1e-4

CASES = [
    (name, with_past)
    for name, family in FAMILIES.items()
    for with_past in (False, True)
    if family.supports_past or not with_past
]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_model(root: Path, auto_class: str) -> torch.nn.Module:
    import transformers

    return getattr(transformers, auto_class).from_pretrained(str(root / "hf")).eval()


def _ids(length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(1, length), dtype=np.int64)


def _feeds(
    session: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray], **extra: np.ndarray
) -> dict:
    """Feeds for a decoder step: ids, mask over past+new, positions after the past, the past itself."""
    names = {i.name for i in session.get_inputs()}
    past_len = next(iter(past.values())).shape[-2] if past else 0
    total = past_len + ids.shape[1]
    feeds = {"input_ids": ids, **past, **extra}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None, :]
    return {k: v for k, v in feeds.items() if k in names}


def _empty_past(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    past: dict[str, np.ndarray] = {}
    for declared in session.get_inputs():
        if declared.name.startswith("past_key_values"):
            shape = [d if isinstance(d, int) else (1 if "batch" in d else 0) for d in declared.shape]
            past[declared.name] = np.zeros(shape, dtype=np.float32)
    return past


@pytest.mark.parametrize(
    ("name", "with_past"), CASES, ids=[f"{n}-{'past' if p else 'nopast'}" for n, p in CASES]
)
def test_family_exports_and_runs(name: str, with_past: bool, tmp_path: Path) -> None:
    family = get_family(name)
    files = export_tiny(name, tmp_path, with_past=with_past)
    names = sorted(p.name for p in files)
    if family.kind == "encoder-decoder":
        expected = ["decoder_model.onnx", "encoder_model.onnx"]
        if with_past:
            expected = [
                "decoder_model.onnx",
                "decoder_model_merged.onnx",
                "decoder_with_past_model.onnx",
                "encoder_model.onnx",
            ]
        assert names == expected
    else:
        assert names == ["model.onnx"]
    for path in files:
        session = _session(path)
        declared = {i.name for i in session.get_inputs()}
        has_past = any(n.startswith("past_key_values") for n in declared)
        assert has_past == (
            with_past and path.name != "encoder_model.onnx" and path.name != "decoder_model.onnx"
        ), path.name
        outputs = run_dummy(path)
        for output_name, value in outputs.items():
            assert np.isfinite(value).all(), f"{path.name}:{output_name} has non-finite values"


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.kind == "decoder"])
def test_decoder_logits_match_torch(name: str, tmp_path: Path) -> None:
    family = get_family(name)
    (path,) = export_tiny(name, tmp_path / "nopast", with_past=False)
    (past_path,) = export_tiny(name, tmp_path / "past", with_past=True)
    model = _torch_model(tmp_path / "nopast", family.auto_class)
    ids = _ids(12)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()

    session = _session(path)
    (logits,) = session.run(["logits"], _feeds(session, ids, {}))
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)

    # KV-cache graph: prefill 11 tokens from an empty cache, then one step with the returned cache.
    session = _session(past_path)
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    present_names = [n.replace("past_key_values", "present") for n in past_names]
    first = session.run(["logits", *present_names], _feeds(session, ids[:, :11], _empty_past(session)))
    np.testing.assert_allclose(first[0], expected[:, :11], atol=ATOL, rtol=0)
    cache = dict(zip(past_names, first[1:], strict=True))
    (step_logits,) = session.run(["logits"], _feeds(session, ids[:, 11:], cache))
    np.testing.assert_allclose(step_logits[:, -1], expected[:, -1], atol=ATOL, rtol=0)


def test_bert_hidden_states_match_torch(tmp_path: Path) -> None:
    (path,) = export_tiny("bert", tmp_path, with_past=False)
    model = _torch_model(tmp_path, "AutoModel")
    ids = _ids(10)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    session = _session(path)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    (hidden,) = session.run(["last_hidden_state"], {i.name: feeds[i.name] for i in session.get_inputs()})
    np.testing.assert_allclose(hidden, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.kind == "encoder-decoder"])
def test_seq2seq_logits_match_torch(name: str, tmp_path: Path) -> None:
    family = get_family(name)
    files = {p.name: p for p in export_tiny(name, tmp_path, with_past=False)}
    model = _torch_model(tmp_path, family.auto_class)
    source, target = _ids(9, seed=2), _ids(5, seed=3)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(source), decoder_input_ids=torch.from_numpy(target))
    encoder = _session(files["encoder_model.onnx"])
    (hidden,) = encoder.run(
        ["last_hidden_state"], {"input_ids": source, "attention_mask": np.ones_like(source)}
    )
    np.testing.assert_allclose(hidden, out.encoder_last_hidden_state.numpy(), atol=ATOL, rtol=0)
    decoder = _session(files["decoder_model.onnx"])
    (logits,) = decoder.run(
        ["logits"],
        {
            "input_ids": target,
            "encoder_hidden_states": hidden,
            "encoder_attention_mask": np.ones_like(source),
        },
    )
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=ATOL, rtol=0)


def test_dummy_inputs_follow_declared_dims(tmp_path: Path) -> None:
    (path,) = export_tiny("gpt2", tmp_path, with_past=True)
    feeds = dummy_inputs(path, batch_size=2, sequence_length=3, past_length=5)
    assert feeds["input_ids"].shape == (2, 3)
    assert feeds["input_ids"].max() < VOCAB
    assert feeds["attention_mask"].shape == (2, 8)
    assert feeds["past_key_values.0.key"].shape == (2, 4, 5, 16)
    np.testing.assert_array_equal(feeds["position_ids"], [[5, 6, 7], [5, 6, 7]])


def test_encoder_has_no_past_and_unknown_family_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'bert' is an encoder; it has no KV-cache export"):
        export_tiny("bert", tmp_path, with_past=True)
    with pytest.raises(KeyError, match=r"unknown model family 'gpt5'; known: bert, gpt2"):
        get_family("gpt5")
