"""Defaults per model kind: the one place where encoders and decoders get different default settings.

``CompressConfig``'s own field defaults are the generic ones. When a config comes from
``bct_onnx.compress`` keywords, CLI flags or a config file (``make_config`` records the fields the
caller named in ``CompressConfig.explicit_fields``), ``bct_onnx.compress`` looks at the model and fills
every field the caller left unset from ``MODEL_KIND_DEFAULTS[kind]``. A ``CompressConfig`` built
directly (``explicit_fields`` None) is used exactly as given.

Why encoders differ: an 8x budget with one-byte float8e5m2 scales takes all-MiniLM-L6-v2 to 8.0x at
a higher cosine than fixed 4-bit widths at 7.2x, data-free (docs/results.md), while the same budget
costs a decoder (SmolLM2-135M) far more perplexity than fixed widths do. Decoders get their own plan
instead (``apply_decoder_plan``: one-byte weight scales, float8e4m3 when GPTQ rounds the weights and
float8e5m2 otherwise, a wider tied table and value projections, the DECODER_* values in
bct_onnx/config.py), on configs without a budget; ``kind_defaults=False`` switches both off.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import onnx_ir as ir

from bct_onnx.block_format import MAX_BITS, ScaleKind
from bct_onnx.config import (
    DECODER_ASYMMETRIC_WEIGHTS,
    DECODER_GPTQ_SCALE_KIND,
    DECODER_SCALE_KIND,
    DECODER_TIED_TABLE_BLOCK_SIZE,
    DECODER_TIED_TABLE_EXTRA_BITS,
    DECODER_TIED_TABLE_ZERO_POINTS,
    DECODER_WIDER_WEIGHTS,
    CompressConfig,
    NodeOverride,
    OpSettings,
    ZeroPointKind,
)


class ModelKind(enum.Enum):
    """What a graph is, as far as its defaults go."""

    ENCODER = "encoder"  # token ids in, hidden states / embeddings / class scores out
    DECODER = "decoder"  # an output over the vocabulary (a language-model head)
    OTHER = "other"  # no token-id input read by an embedding Gather (vision, audio, a bare MLP ...)


MODEL_KIND_DEFAULTS: Mapping[ModelKind, Mapping[str, Any]] = MappingProxyType({
    ModelKind.ENCODER: MappingProxyType({
        "target_ratio": 8.0,
        "scale_kind": ScaleKind.FLOAT8E5M2,
        "budget_floor": False,  # the ratio is the promise: 8x measured at cosine >= 0.975 data-free
    }),
    ModelKind.DECODER: MappingProxyType({}),
    ModelKind.OTHER: MappingProxyType({}),
})


def model_kind(model: ir.Model) -> ModelKind:
    """ENCODER / DECODER / OTHER from the graph alone (same test as data-free calibration's).

    A graph input ``input_ids`` read by a Gather of a constant 2-D table makes a text model; an output
    whose last axis is that table's row count (logits over the vocabulary) makes it a decoder (a
    masked-LM head counts as one too). The encoder graph of an encoder-decoder export is an encoder.
    """
    from bct_onnx.calibration import CalibrationError
    from bct_onnx.synthetic_calibration import decoder_logits_output, vocabulary_size

    try:
        vocab = vocabulary_size(model)
    except CalibrationError:
        return ModelKind.OTHER
    return ModelKind.DECODER if decoder_logits_output(model, vocab) is not None else ModelKind.ENCODER


def apply_model_kind_defaults(config: CompressConfig, kind: ModelKind) -> tuple[CompressConfig, dict[str, Any]]:
    """(config with ``kind``'s defaults in every field the caller left unset, the fields so set).

    A config built directly (explicit_fields None) comes back unchanged. The result's explicit_fields
    is None: it is resolved, what the pipeline runs and the model's metadata records.
    """
    if config.explicit_fields is None or not config.kind_defaults:
        return config, {}
    applied = {
        name: value
        for name, value in MODEL_KIND_DEFAULTS[kind].items()
        if name not in config.explicit_fields and getattr(config, name) != value
    }
    return dataclasses.replace(config, explicit_fields=None, **applied), applied


def _exact(key: str) -> str:
    return "re:^" + re.escape(key) + "$"


def _matches(consumers: Any, patterns: tuple[str, ...]) -> bool:
    """True when one of the node-name regexes matches every (op, node name) consumer of a weight."""
    return any(all(re.search(pattern, key) for _, key in consumers) for pattern in patterns)


def apply_decoder_plan(
    model: ir.Model, config: CompressConfig, kind: ModelKind | None = None, gptq: bool = False
) -> tuple[CompressConfig, dict[str, Any]]:
    """A decoder's adjustments (DECODER_* in bct_onnx.config) on fields still at their class
    defaults, and a note {"kind": ..., "changed": [...]}: one-byte weight scales (float8e5m2, or
    DECODER_GPTQ_SCALE_KIND when ``gptq``: the MatMul weights will be rounded by GPTQ), and per-tensor
    overrides widening the tied table (asymmetric, integer zero points packed at the code width) and
    the value projections (measured: docs/results.md).

    Nothing changes when config.kind_defaults is off, when a budget chooses the bits, for asymmetric
    formats (the decoder plan was measured with symmetric codes; config files such as
    docs/configs/smollm2-w4a8.toml keep their measured meaning), or for encoders.
    A tied table or weight that the user's op settings or overrides already pin keeps its format.
    """
    from bct_onnx.budget import find_units

    kind = model_kind(model) if kind is None else kind
    note: dict[str, Any] = {"kind": kind.value, "changed": []}
    if kind is not ModelKind.DECODER or not config.kind_defaults or config.budgeted or not config.symmetric:
        return config, note
    changed: list[str] = note["changed"]
    fields: dict[str, Any] = {}
    scale_kind = DECODER_GPTQ_SCALE_KIND if gptq else DECODER_SCALE_KIND
    if config.scale_kind is ScaleKind.FLOAT16 and scale_kind is not ScaleKind.FLOAT16:
        fields["scale_kind"] = scale_kind
        changed.append(f"weight scales {scale_kind.value}")
    overrides = list(config.overrides)
    for unit in find_units(model, config):
        if unit.pinned is not None:
            continue
        kinds = {op for op, _ in unit.consumers}
        tied_table = kinds == {"MatMul", "Gather"} and config.embedding_bits is None
        if tied_table:
            extra = DECODER_TIED_TABLE_EXTRA_BITS
        else:
            extra = next((bits for pattern, bits in DECODER_WIDER_WEIGHTS if _matches(unit.consumers, (pattern,))), 0)
        asymmetric = not tied_table and _matches(unit.consumers, DECODER_ASYMMETRIC_WEIGHTS)
        if not extra and not asymmetric:
            continue
        bits = min(MAX_BITS, config.weight_bits + extra)
        settings = OpSettings(weight_bits=bits)
        described = f"{unit.source}: {bits}-bit"
        if tied_table and DECODER_TIED_TABLE_ZERO_POINTS is not None and bits < MAX_BITS:
            settings = OpSettings(weight_bits=bits, symmetric=False, zero_points=DECODER_TIED_TABLE_ZERO_POINTS)
            described += f", {DECODER_TIED_TABLE_ZERO_POINTS.value} integer zero points"
        if asymmetric and bits < MAX_BITS:
            settings = OpSettings(weight_bits=bits, symmetric=False, zero_points=ZeroPointKind.PACKED)
            described += ", packed integer zero points"
        if tied_table and DECODER_TIED_TABLE_BLOCK_SIZE is not None:
            settings = dataclasses.replace(settings, block_size=DECODER_TIED_TABLE_BLOCK_SIZE)
            described += f", blocks of {DECODER_TIED_TABLE_BLOCK_SIZE}"
        for op, key in unit.consumers:
            overrides.append(NodeOverride(_exact(key), settings, op=op))
        changed.append(described)
    if len(overrides) != len(config.overrides):
        fields["overrides"] = tuple(overrides)
    return (dataclasses.replace(config, **fields) if fields else config), note
