"""Calibration without user data: token sequences built from the model file alone.

A plain .onnx with no tokenizer beside it still says everything GPTQ needs to get started: the
vocabulary size (rows of the embedding table the ``input_ids`` Gather reads) and the input names.
Two sources of token ids:

- ``random``: ids drawn uniformly from the vocabulary (encoders; any text model);
- ``self-generated``: for a decoder (a graph output whose last axis is the vocabulary, e.g.
  ``logits``), sequences the FP32 model samples itself (LLM-QAT's data-free idea). Exact
  autoregressive sampling without a KV cache costs a forward pass per token, so the sequences are
  refined in parallel instead (Jacobi iterations): start from random ids, then, a few times, replace
  every position by a token sampled from the model's distribution given the current prefix. After
  round r the first r tokens are exactly self-generated and the rest follow the model's own local
  statistics, at the cost of ``rounds`` forward passes over the whole batch.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from bct_onnx.calibration import Calibration, CalibrationError, model_session

logger = logging.getLogger(__name__)

# Ops that pass token ids on unchanged in value (only their shape or integer type changes).
ID_RESHAPING_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Cast", "Identity"})
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# GPTQ damping for made-up inputs: they describe real inputs loosely, so their Hessians are trusted
# less than text's (0.01). Chosen by a sweep on all-MiniLM-L6-v2 (docs/results.md, data-free quality).
SYNTHETIC_DAMPING = 0.3
RANDOM = "random"
SELF_GENERATED = "self-generated"
METHODS = (RANDOM, SELF_GENERATED)


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
    """How many sequences of how many tokens, how they are drawn, and the random seed."""

    sequences: int = 32
    length: int = 32
    batch_size: int = 8
    rounds: int = 4  # Jacobi refinement rounds of self-generated sequences
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0


def vocabulary_size(model: ir.Model) -> int:
    """Rows of the constant table that a Gather reads with the graph input ``input_ids`` (maybe reshaped)."""
    ids = next((value for value in model.graph.inputs if value.name == "input_ids"), None)
    if ids is None:
        raise CalibrationError("the model has no graph input named input_ids: no token ids to make up")
    pending, seen = list(ids.uses()), set()
    while pending:
        use = pending.pop(0)
        node = use.node
        if node.op_type == "Gather" and use.idx == 1 and node.inputs[0] is not None:
            table = node.inputs[0].const_value
            if table is not None and len(table.shape) == 2:
                return int(table.shape[0])
        elif node.op_type in ID_RESHAPING_OPS and use.idx == 0 and id(node) not in seen:
            seen.add(id(node))  # T5 and BART encoders reshape input_ids before the embedding Gather
            pending += [u for output in node.outputs for u in output.uses()]
    raise CalibrationError("no Gather reads input_ids from a constant 2-D embedding table: vocabulary size unknown")


def decoder_logits_output(model: ir.Model, vocab: int) -> str | None:
    """Name of a graph output whose last axis is the vocabulary (a language-model head), else None."""
    for value in model.graph.outputs:
        shape = value.shape
        if shape is not None and len(shape) == 3 and shape[-1] == vocab:
            return value.name
    return None


def _batch_shape(model: ir.Model, settings: SyntheticSettings) -> tuple[int | None, int]:
    """(rows per batch or None for the settings' choice, sequence length): fixed dims of input_ids win."""
    ids = next(value for value in model.graph.inputs if value.name == "input_ids")
    shape = ids.shape
    rows = shape[0] if shape is not None and len(shape) == 2 and isinstance(shape[0], int) else None
    length = shape[1] if shape is not None and len(shape) == 2 and isinstance(shape[1], int) else settings.length
    return rows, length


def _feeds(model: ir.Model, ids: np.ndarray) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        name = value.name or ""
        if name == "input_ids":
            array = ids
        elif name == "attention_mask":
            array = np.ones_like(ids)
        elif name == "token_type_ids":
            array = np.zeros_like(ids)
        elif name == "position_ids":
            array = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        else:
            raise CalibrationError(
                f"cannot make up calibration inputs for graph input {name!r} (only {', '.join(TEXT_INPUTS)})"
            )
        dtype = np.int32 if value.dtype == ir.DataType.INT32 else np.int64
        feeds[name] = array.astype(dtype)
    return feeds


def random_token_calibration(model: ir.Model, settings: SyntheticSettings = SyntheticSettings()) -> Calibration:
    """Batches of ids drawn uniformly from the model's vocabulary."""
    vocab = vocabulary_size(model)
    fixed_rows, length = _batch_shape(model, settings)
    rng = np.random.default_rng(settings.seed)
    batches = []
    for start in range(0, settings.sequences, fixed_rows or settings.batch_size):
        rows = fixed_rows or min(settings.batch_size, settings.sequences - start)
        ids = rng.integers(0, vocab, size=(rows, length), dtype=np.int64)
        batches.append(_feeds(model, ids))
    return Calibration(tuple(batches), damping=SYNTHETIC_DAMPING)


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int) -> np.ndarray:
    """One id per row of logits [..., vocab], sampled among the top_k at the given temperature."""
    flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    k = min(top_k, flat.shape[-1])
    top = np.argpartition(-flat, k - 1, axis=-1)[:, :k]
    chosen = np.take_along_axis(flat, top, axis=-1) / max(temperature, 1e-6)
    chosen -= chosen.max(axis=-1, keepdims=True)
    probs = np.exp(chosen)
    probs /= probs.sum(axis=-1, keepdims=True)
    cumulative = probs.cumsum(axis=-1)
    draws = rng.random((flat.shape[0], 1))
    index = np.minimum((cumulative < draws).sum(axis=-1), k - 1)
    return top[np.arange(flat.shape[0]), index].reshape(logits.shape[:-1])


def self_generated_calibration(
    model: ir.Model, settings: SyntheticSettings = SyntheticSettings(), providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> Calibration:
    """Batches of sequences the float decoder samples itself (Jacobi-refined from random ids)."""
    vocab = vocabulary_size(model)
    logits_name = decoder_logits_output(model, vocab)
    if logits_name is None:
        raise CalibrationError("the model has no output over its vocabulary (logits): not a decoder")
    fixed_rows, length = _batch_shape(model, settings)
    rng = np.random.default_rng(settings.seed)
    session = model_session(model, providers)
    batches = []
    for start in range(0, settings.sequences, fixed_rows or settings.batch_size):
        rows = fixed_rows or min(settings.batch_size, settings.sequences - start)
        ids = rng.integers(0, vocab, size=(rows, length), dtype=np.int64)
        for _ in range(settings.rounds):
            (logits,) = session.run([logits_name], _feeds(model, ids))
            # Position p's logits predict token p + 1; the first token stays a random pick.
            ids[:, 1:] = _sample(logits[:, :-1], rng, settings.temperature, settings.top_k)
        batches.append(_feeds(model, ids))
    return Calibration(tuple(batches), damping=SYNTHETIC_DAMPING)


def synthetic_calibration(
    model: ir.Model, method: str | None = None, settings: SyntheticSettings = SyntheticSettings()
) -> tuple[Calibration, str]:
    """(calibration, method used): self-generated for a decoder, random ids otherwise (method=None)."""
    if method is not None and method not in METHODS:
        raise CalibrationError(f"synthetic calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if method is None:
        vocab = vocabulary_size(model)
        method = SELF_GENERATED if decoder_logits_output(model, vocab) is not None else RANDOM
    if method == SELF_GENERATED:
        return self_generated_calibration(model, settings), method
    return random_token_calibration(model, settings), method


def data_free_calibration(model: ir.Model) -> tuple[Calibration | None, str]:
    """The calibration bct-onnx runs without a tokenizer: (batches or None, what was decided and why).

    Encoders: GPTQ on random token ids. Decoders (an output over the vocabulary): none, since GPTQ on
    self-generated or random sequences did not beat plain rounding with clipped-scale search on
    SmolLM2-135M (docs/results.md, data-free quality). Raises CalibrationError when no ids can be made up.
    """
    vocab = vocabulary_size(model)
    if decoder_logits_output(model, vocab) is not None:
        return None, "a decoder: made-up sequences did not beat plain rounding"
    calibration = random_token_calibration(model)
    length = calibration.feeds[0]["input_ids"].shape[1]
    sequences = sum(len(batch["input_ids"]) for batch in calibration.feeds)
    return calibration, f"random token ids ({sequences} sequences of {length} from a vocabulary of {vocab})"
