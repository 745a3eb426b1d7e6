"""The kind of model (decoder or encoder) and the config defaults that depend on it.

The defaults themselves are in bct_onnx.config (DECODER_*); this module decides the kind from the graph
and applies them to the fields a user left at their class defaults.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import onnx_ir as ir

from bct_onnx.block_format import MAX_BITS, ScaleKind
from bct_onnx.calibration import CalibrationError
from bct_onnx.config import (
    DECODER_SCALE_KIND,
    DECODER_TIED_TABLE_EXTRA_BITS,
    DECODER_WIDER_WEIGHTS,
    CompressConfig,
    NodeOverride,
    OpSettings,
)

DECODER = "decoder"
ENCODER = "encoder"


def model_kind(model: ir.Model) -> str:
    """"decoder" when a graph output's last axis is the vocabulary of the input_ids table, else "encoder"."""
    from bct_onnx.synthetic_calibration import decoder_logits_output, vocabulary_size

    try:
        vocab = vocabulary_size(model)
    except CalibrationError:
        return ENCODER
    return DECODER if decoder_logits_output(model, vocab) is not None else ENCODER


def _exact(key: str) -> str:
    return "re:^" + re.escape(key) + "$"


def apply_kind_defaults(model: ir.Model, config: CompressConfig) -> tuple[CompressConfig, dict[str, Any]]:
    """config with the defaults of the model's kind on fields still at their class defaults, and a note.

    Nothing changes when config.kind_defaults is off, when a budget chooses the bits, for asymmetric
    formats (the decoder plan was measured with symmetric codes; config files such as
    docs/configs/smollm2-w4a8.toml keep their measured meaning), or for encoders.
    A tied table or weight that the user's op settings or overrides already pin keeps its format.
    """
    from bct_onnx.budget import find_units

    kind = model_kind(model)
    note: dict[str, Any] = {"kind": kind, "changed": []}
    if kind != DECODER or not config.kind_defaults or config.budgeted or not config.symmetric:
        return config, note
    changed: list[str] = note["changed"]
    fields: dict[str, Any] = {}
    if config.scale_kind is ScaleKind.FLOAT16 and DECODER_SCALE_KIND is not ScaleKind.FLOAT16:
        fields["scale_kind"] = DECODER_SCALE_KIND
        changed.append(f"weight scales {DECODER_SCALE_KIND.value}")
    overrides = list(config.overrides)
    for unit in find_units(model, config):
        if unit.pinned is not None:
            continue
        kinds = {op for op, _ in unit.consumers}
        if kinds == {"MatMul", "Gather"} and config.embedding_bits is None:
            extra = DECODER_TIED_TABLE_EXTRA_BITS
        else:
            extra = next(
                (bits for pattern, bits in DECODER_WIDER_WEIGHTS if all(re.search(pattern, key) for _, key in unit.consumers)),
                0,
            )
        if not extra:
            continue
        bits = min(MAX_BITS, config.weight_bits + extra)
        for op, key in unit.consumers:
            overrides.append(NodeOverride(_exact(key), OpSettings(weight_bits=bits), op=op))
        changed.append(f"{unit.source}: {bits}-bit")
    if len(overrides) != len(config.overrides):
        fields["overrides"] = tuple(overrides)
    return (dataclasses.replace(config, **fields) if fields else config), note
