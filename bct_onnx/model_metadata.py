"""What a compressed model says about its making: producer, bct-onnx version, config (model metadata_props).

``producer_name`` / ``producer_version`` become bct-onnx's (the exporter's are kept under
``bct_onnx.source_producer``), and ``metadata_props`` carry the version and the whole config as
JSON, so ``bct-onnx inspect`` and any ONNX tool can tell how a file was made.
"""

from __future__ import annotations

import json
from typing import Any

import onnx_ir as ir

PRODUCER_NAME = "bct-onnx"
VERSION_KEY = "bct_onnx.version"
CONFIG_KEY = "bct_onnx.config"
FORMAT_KEY = "bct_onnx.format"
SOURCE_PRODUCER_KEY = "bct_onnx.source_producer"


def stamp(model: ir.Model, config: dict[str, Any]) -> None:
    """Mark model as made by this bct-onnx with ``config`` (a JSON-ready dict, e.g. config_to_dict)."""
    from bct_onnx import __version__

    if model.producer_name and model.producer_name != PRODUCER_NAME:
        source = model.producer_name + (f" {model.producer_version}" if model.producer_version else "")
        model.metadata_props[SOURCE_PRODUCER_KEY] = source
    model.producer_name = PRODUCER_NAME
    model.producer_version = __version__
    model.metadata_props[VERSION_KEY] = __version__
    model.metadata_props[FORMAT_KEY] = str(config.get("format", "bct"))
    model.metadata_props[CONFIG_KEY] = json.dumps(config, sort_keys=True)


def read(model: ir.Model) -> dict[str, Any] | None:
    """{"version", "format", "config", "source_producer"} of a model stamped by bct-onnx, else None."""
    props = model.metadata_props
    if VERSION_KEY not in props:
        return None
    try:
        config = json.loads(props.get(CONFIG_KEY, "{}"))
    except json.JSONDecodeError:
        config = {"unreadable": props.get(CONFIG_KEY)}
    return {
        "version": props[VERSION_KEY],
        "format": props.get(FORMAT_KEY, "bct"),
        "config": config,
        "source_producer": props.get(SOURCE_PRODUCER_KEY),
    }
