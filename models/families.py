"""Seed architectures as tiny random-weight models, built offline and exported to ONNX.

Each ``Family`` is a recipe: a seeded transformers config (hidden 64, 2 layers, 4 heads, vocab
256), the auto class that builds it, and the optimum task that exports it. Tiny models exercise
every op pattern of the real architecture (GELU vs SwiGLU, LayerNorm vs RMSNorm, learned vs rotary
vs ALiBi vs relative positions, GQA, tied and untied heads) in seconds, without any download.
"""

from __future__ import annotations

import ast
import json
import logging
import operator
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from bct_onnx.models.export import DEFAULT_OPSET, export_hf_files

from bct_onnx import kv_cache, runtime

logger = logging.getLogger(__name__)

Kind = Literal["encoder", "decoder", "encoder-decoder"]

HIDDEN = 64
LAYERS = 2
HEADS = 4
VOCAB = 256
POSITIONS = 128
SEED = 0


@dataclass(frozen=True)
class Family:
    """How to build and export one architecture as a tiny random-weight model."""

    name: str
    model_type: str
    kind: Kind
    auto_class: str  # transformers auto class building the model from the config
    task: str  # optimum task without "-with-past"
    make_config: Callable[[], Any]
    notes: str = ""

    @property
    def supports_past(self) -> bool:
        """Whether a KV-cache ("-with-past") export exists for this family."""
        return self.kind != "encoder"


def _bert() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=POSITIONS,
    )


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS)


def _gpt_neo() -> Any:
    from transformers import GPTNeoConfig

    return GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        attention_types=[[["global", "local"], LAYERS // 2]],
        window_size=32,
        max_position_embeddings=POSITIONS,
    )


def _pythia() -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        rotary_pct=0.25,
        max_position_embeddings=POSITIONS,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )


def _opt() -> Any:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=4 * HIDDEN,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=POSITIONS,
    )


def _bloom() -> Any:
    from transformers import BloomConfig

    return BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)


def _bart() -> Any:
    from transformers import BartConfig

    return BartConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=2 * HIDDEN,
        decoder_ffn_dim=2 * HIDDEN,
        max_position_embeddings=POSITIONS,
    )


def _flan_t5() -> Any:
    from transformers import T5Config

    # Flan-T5 (T5 v1.1): gated GELU feed-forward, untied LM head, RMS layer norm, relative positions.
    return T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=2 * HIDDEN,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        max_position_embeddings=POSITIONS,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "bert",
            "bert",
            "encoder",
            "AutoModel",
            "feature-extraction",
            _bert,
            "post-LN, GELU, learned absolute positions",
        ),
        Family(
            "gpt2",
            "gpt2",
            "decoder",
            "AutoModelForCausalLM",
            "text-generation",
            _gpt2,
            "pre-LN, GELU(tanh), Conv1D weights, tied head",
        ),
        Family(
            "gpt-neo",
            "gpt_neo",
            "decoder",
            "AutoModelForCausalLM",
            "text-generation",
            _gpt_neo,
            "global + local (windowed) attention layers",
        ),
        Family(
            "pythia",
            "gpt_neox",
            "decoder",
            "AutoModelForCausalLM",
            "text-generation",
            _pythia,
            "GPT-NeoX: parallel residual, partial rotary, fused QKV",
        ),
        Family(
            "opt",
            "opt",
            "decoder",
            "AutoModelForCausalLM",
            "text-generation",
            _opt,
            "ReLU MLP, learned positions with offset 2",
        ),
        Family(
            "bloom",
            "bloom",
            "decoder",
            "AutoModelForCausalLM",
            "text-generation",
            _bloom,
            "ALiBi positions, embedding LayerNorm",
        ),
        Family(
            "bart",
            "bart",
            "encoder-decoder",
            "AutoModelForSeq2SeqLM",
            "text2text-generation",
            _bart,
            "post-LN encoder-decoder, GELU",
        ),
        Family(
            "flan-t5",
            "t5",
            "encoder-decoder",
            "AutoModelForSeq2SeqLM",
            "text2text-generation",
            _flan_t5,
            "T5 v1.1: RMSNorm, gated GELU, relative position buckets, untied head",
        ),
        Family(
            "llama",
            "llama",
            "decoder",
            "AutoModelForCausalLM",
            "text-generation",
            _llama,
            "RMSNorm, SwiGLU, rotary, grouped-query attention",
        ),
    )
}


def get_family(family: str | Family) -> Family:
    """The Family registered under ``family`` (or ``family`` itself); KeyError lists the known names."""
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}") from None


def build_tiny(family: str | Family, directory: str | os.PathLike[str], seed: int = SEED) -> Path:
    """Build the family's tiny random-weight model (seeded) and save it as a HF directory; return it."""
    import torch
    import transformers

    recipe = get_family(family)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    auto_class = getattr(transformers, recipe.auto_class)
    config = recipe.make_config()
    torch.manual_seed(seed)
    model = auto_class.from_config(config)
    model.eval()
    model.save_pretrained(out)
    logger.info(
        "built tiny %s (%d parameters) in %s", recipe.name, sum(p.numel() for p in model.parameters()), out
    )
    return out


def export_tiny(
    family: str | Family,
    out_dir: str | os.PathLike[str],
    with_past: bool,
    opset: int = DEFAULT_OPSET,
    seed: int = SEED,
) -> list[Path]:
    """Build the tiny model under ``out_dir``/hf and export it to ``out_dir``/onnx; return the graphs.

    Decoder-only families give one ``model.onnx`` (with ``past_key_values.*`` inputs and
    ``present.*`` outputs when ``with_past``). Encoder-decoder families give ``encoder_model.onnx``
    and ``decoder_model.onnx``, plus ``decoder_with_past_model.onnx`` and optimum's
    ``decoder_model_merged.onnx`` (an If over both decoders) when ``with_past``.
    """
    recipe = get_family(family)
    if with_past and not recipe.supports_past:
        raise ValueError(f"family {recipe.name!r} is an encoder; it has no KV-cache export (with_past=False)")
    root = Path(out_dir)
    hf_dir = build_tiny(recipe, root / "hf", seed=seed)
    task = recipe.task + ("-with-past" if with_past else "")
    return export_hf_files(hf_dir, root / "onnx", task=task, opset=opset)


# ---------------------------------------------------------------------------------------------
# Dummy feeds built from a graph's declared inputs.

_BINARY_OPS: Mapping[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
}


def _eval_dim(expression: str, symbols: Mapping[str, int]) -> int | None:
    """Value of a symbolic dimension like 'past_sequence_length + sequence_length', or None."""
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None

    def walk(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return symbols.get(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            return _BINARY_OPS[type(node.op)](left, right)
        return None

    return walk(tree)


def _vocab_size(path: Path, graph_outputs: list[Any]) -> int:
    """Token id bound: config.json next to the graph, else the last dim of a 'logits' output, else 32."""
    config_path = path.parent / "config.json"
    if config_path.is_file():
        vocab = json.loads(config_path.read_text(encoding="utf-8")).get("vocab_size")
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    for output in graph_outputs:
        if output.name == "logits" and output.shape and isinstance(output.shape[-1], int):
            return int(output.shape[-1])
    return 32


_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def dummy_inputs(
    path: str | os.PathLike[str],
    batch_size: int = 1,
    sequence_length: int = 8,
    past_length: int = 4,
    seed: int = SEED,
) -> dict[str, np.ndarray]:
    """Feeds for every input a graph declares, with consistent symbolic dimensions.

    Recognises optimum's names: ids (random tokens below the vocab size), attention masks (ones
    over past + current positions), position ids (continuing after the past), token type ids
    (zeros), ``past_key_values.*`` (small random floats, ``past_length`` long; a compressed cache
    gets those floats' codes and scales, bct_onnx.kv_cache), encoder hidden states (random floats)
    and ``use_cache_branch`` (True when ``past_length`` > 0).
    """
    model_path = Path(path)
    session = runtime.session(model_path, with_library=False)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    has_past = any(i.name.startswith("past_key_values") for i in inputs)
    past = past_length if has_past else 0
    symbols = {
        "batch_size": batch_size,
        "batch": batch_size,
        "sequence_length": sequence_length,
        "decoder_sequence_length": sequence_length,
        "encoder_sequence_length": sequence_length,
        "past_sequence_length": past,
        "past_decoder_sequence_length": past,
        "total_sequence_length": past + sequence_length,
    }
    vocab = _vocab_size(model_path, outputs)
    rng = np.random.default_rng(seed)
    cache_formats = kv_cache.session_formats(session)
    compressed_cache = {kv_cache.codes_name(n): n for n in cache_formats}
    compressed_cache.update({kv_cache.scales_name(n): n for n in cache_formats})
    feeds: dict[str, np.ndarray] = {}
    for declared in inputs:
        float_name = compressed_cache.get(declared.name)
        if float_name is not None:
            if declared.name == kv_cache.codes_name(float_name):
                fmt = cache_formats[float_name]
                float_shape = [batch_size, declared.shape[1], past, fmt.head_dim]
                past_values = (0.5 * rng.standard_normal(float_shape)).astype(np.float32)
                feeds.update(kv_cache.compress_feeds({float_name: past_values}, cache_formats))
            continue
        dtype = _NUMPY_TYPES.get(declared.type)
        if dtype is None:
            raise ValueError(f"{model_path}: input {declared.name!r} has unsupported type {declared.type}")
        shape: list[int] = []
        for dim in declared.shape:
            if isinstance(dim, int):
                shape.append(dim)
                continue
            value = _eval_dim(re.sub(r"[^\w+\-* ]", "_", dim), symbols) if isinstance(dim, str) else None
            if value is None:
                logger.warning(
                    "%s: input %s has unknown dim %r; using %d",
                    model_path,
                    declared.name,
                    dim,
                    sequence_length,
                )
                value = sequence_length
            shape.append(value)
        name = declared.name
        if name == "use_cache_branch":
            feeds[name] = np.full(shape, past > 0, dtype=np.bool_)
        elif "position_ids" in name or name == "cache_position":
            positions = np.arange(past, past + shape[-1], dtype=dtype)
            feeds[name] = np.broadcast_to(positions, shape).copy()
        elif "mask" in name:
            feeds[name] = np.ones(shape, dtype=dtype)
        elif "token_type_ids" in name:
            feeds[name] = np.zeros(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, vocab, size=shape, dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = (0.5 * rng.standard_normal(shape)).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def run_dummy(path: str | os.PathLike[str], **kwargs: Any) -> dict[str, np.ndarray]:
    """Run a graph on ``dummy_inputs(path, **kwargs)`` with ONNX Runtime (CPU); outputs by name."""
    session = runtime.session(path, with_library=False)
    feeds = dummy_inputs(path, **kwargs)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
