"""bct_onnx.tokenizer: the light tokenizer calibration uses encodes as transformers does."""

from __future__ import annotations

import numpy as np
import pytest


def _tokenizer_dirs():
    from bct_onnx.models import minilm, smollm2
    from bct_onnx.models.cache import cache_dir

    dirs = []
    try:
        dirs.append(pytest.param(minilm.model_dir(), id="minilm"))
    except minilm.MiniLMNotInstalledError:
        pass
    smollm2_dir = cache_dir() / smollm2.HF_DIR_NAME  # only when already built: building it takes minutes
    if (smollm2_dir / "tokenizer.json").is_file():
        dirs.append(pytest.param(smollm2_dir, id="smollm2"))
    return dirs or [pytest.param(None, marks=pytest.mark.skip(reason="no real tokenizer installed"))]


@pytest.mark.parametrize("folder", _tokenizer_dirs())
def test_text_tokenizer_encodes_as_transformers(folder):
    """Calibration reads tokenizer.json without transformers; the encodings are transformers' own."""
    from transformers import AutoTokenizer

    from bct_onnx.calibration import calibration_text
    from bct_onnx.tokenizer import TextTokenizer, load_text_tokenizer

    light = load_text_tokenizer(folder)
    assert isinstance(light, TextTokenizer)
    reference = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert light.pad_token == reference.pad_token
    batch = 8 if reference.pad_token is not None else 1
    texts = calibration_text()
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        got = light(chunk, padding=batch > 1, truncation=True, max_length=48, return_tensors="np")
        want = reference(chunk, padding=batch > 1, truncation=True, max_length=48, return_tensors="np")
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} of texts {start}..")
