"""Per-op-kind and per-node control from a config file (TOML, or YAML with PyYAML) and CLI strings.

The format is documented in docs/config.md. Precedence, lowest first: CompressConfig defaults,
the config file, command-line flags (``--weight-bits`` etc., then ``--op-bits``, then
``--override``, which are applied after the file's own overrides). Every bad key or value raises
ConfigFileError naming the file, the key and the value.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

from bct_onnx.config import (
    SETTING_KEYS,
    SUPPORTED_OPS,
    WEIGHT_OPS,
    CompressConfig,
    NodeOverride,
    OpSettings,
)
from bct_onnx.errors import BctOnnxError

TOP_LEVEL_KEYS = (
    "weight_bits",
    "act_bits",
    "block_size",
    "embedding_bits",
    "ops",
    "symmetric",
    "zero_points",
    "scale_kind",
    "embedding_scale_kind",
    "weight_scale_search",
    "keep_compressed",
    "fuse_ops",
    "target_ratio",
    "max_error",
    "format",
    "qdq_activations",
    "rotation",
    "fuse_attention",
    "op",
    "override",
)
_FIELD_KEYS = TOP_LEVEL_KEYS[: TOP_LEVEL_KEYS.index("op")]  # keys that are CompressConfig fields
_NONE_WORDS = ("none", "off", "null")


class ConfigFileError(BctOnnxError, ValueError):
    """A config file or a control flag holds an unknown key or a bad value; the message names both."""


def _where(source: str, key: str) -> str:
    return f"{source}: key '{key}'"


def _setting_value(source: str, key: str, name: str, value: Any) -> tuple[Any, bool]:
    """(value for OpSettings, act_bits_none) of one setting, checked."""
    if name == "act_bits" and isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        return None, True
    if name == "enabled":
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "on", "off", "yes", "no"):
            return value.strip().lower() in ("true", "on", "yes"), False
        if not isinstance(value, bool):
            raise ConfigFileError(f"{_where(source, key)}: {value!r} is not true/false")
        return value, False
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigFileError(f"{_where(source, key)}: {value!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigFileError(f"{_where(source, key)}: {value!r} is not an integer")
    return value, False


def _settings(
    source: str, prefix: str, table: Mapping[str, Any], allowed: Sequence[str]
) -> tuple[OpSettings, bool]:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigFileError(
            f"{_where(source, f'{prefix}.{unknown[0]}')}: unknown key (value {table[unknown[0]]!r}); "
            f"known: {', '.join(allowed)}"
        )
    values: dict[str, Any] = {}
    weight_only = False
    for name in SETTING_KEYS:
        if name in table:
            values[name], none = _setting_value(source, f"{prefix}.{name}", name, table[name])
            weight_only = weight_only or none
            try:
                OpSettings(**{name: values[name]})
            except ValueError as error:
                raise ConfigFileError(
                    f"{_where(source, f'{prefix}.{name}')}: {table[name]!r}: {error}"
                ) from None
    try:
        return OpSettings(**values), weight_only
    except ValueError as error:
        raise ConfigFileError(f"{source}: table '{prefix}' {dict(table)!r}: {error}") from None


def _op_kind(source: str, key: str, kind: Any) -> str:
    if kind not in SUPPORTED_OPS:
        raise ConfigFileError(
            f"{_where(source, key)}: {kind!r} is not an op kind; known: {', '.join(sorted(SUPPORTED_OPS))}"
        )
    return str(kind)


def config_from_mapping(
    data: Mapping[str, Any], source: str, base: CompressConfig | None = None
) -> CompressConfig:
    """A CompressConfig from parsed file contents (base's fields where the file says nothing)."""
    base = base if base is not None else CompressConfig()
    if not isinstance(data, Mapping):
        raise ConfigFileError(
            f"{source}: the file must hold a table/mapping at the top, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigFileError(
            f"{_where(source, unknown[0])}: unknown key (value {data[unknown[0]]!r}); known: {', '.join(TOP_LEVEL_KEYS)}"
        )
    fields: dict[str, Any] = {}
    for key in _FIELD_KEYS:
        if key not in data:
            continue
        value = data[key]
        nullable = ("act_bits", "embedding_bits", "target_ratio", "max_error")
        if key in nullable and isinstance(value, str) and value.lower() in _NONE_WORDS:
            value = None
        if key == "ops":
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ConfigFileError(f"{_where(source, key)}: {value!r} is not a list of op kinds")
            value = frozenset(_op_kind(source, key, v) for v in value)
        fields[key] = value
    op_settings = dict(base.op_settings)
    table = data.get("op", {})
    if not isinstance(table, Mapping):
        raise ConfigFileError(f"{_where(source, 'op')}: {table!r} is not a table of op kinds")
    for kind, settings in table.items():
        _op_kind(source, f"op.{kind}", kind)
        if not isinstance(settings, Mapping):
            raise ConfigFileError(f"{_where(source, f'op.{kind}')}: {settings!r} is not a table")
        parsed, weight_only = _settings(source, f"op.{kind}", settings, SETTING_KEYS)
        if weight_only:
            raise ConfigFileError(
                f"{_where(source, f'op.{kind}.act_bits')}: 'none' is only allowed in overrides"
            )
        op_settings[kind] = parsed
    overrides = list(base.overrides)
    entries = data.get("override", [])
    if isinstance(entries, Mapping) or not isinstance(entries, Sequence):
        raise ConfigFileError(
            f"{_where(source, 'override')}: {entries!r} is not a list of tables ([[override]])"
        )
    for index, entry in enumerate(entries):
        prefix = f"override[{index}]"
        if not isinstance(entry, Mapping) or "pattern" not in entry:
            raise ConfigFileError(f"{_where(source, prefix)}: {entry!r} needs a 'pattern'")
        op = _op_kind(source, f"{prefix}.op", entry["op"]) if "op" in entry else None
        rest = {k: v for k, v in entry.items() if k not in ("pattern", "op")}
        parsed, weight_only = _settings(source, prefix, rest, SETTING_KEYS)
        try:
            overrides.append(NodeOverride(str(entry["pattern"]), parsed, op, weight_only))
        except ValueError as error:
            raise ConfigFileError(f"{_where(source, f'{prefix}.pattern')}: {error}") from None
    fields["op_settings"] = op_settings
    fields["overrides"] = tuple(overrides)
    if {"weight_bits", "embedding_bits"} & fields.keys() and not {"target_ratio", "max_error"} & fields.keys():
        fields.update(target_ratio=None, max_error=None)  # the file's own widths, not a default budget
    try:
        return dataclasses.replace(base, **fields)
    except (ValueError, TypeError) as error:
        raise ConfigFileError(f"{source}: {error}") from None


def load_config_file(path: str | os.PathLike[str], base: CompressConfig | None = None) -> CompressConfig:
    """Read a .toml (tomllib) or .yaml/.yml (PyYAML, if installed) config file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigFileError(f"config file not found: {file}")
    suffix = file.suffix.lower()
    text = file.read_text(encoding="utf-8")
    if suffix in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigFileError(
                f"{file}: YAML config needs PyYAML (pip install pyyaml), or use TOML"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigFileError(f"{file}: not valid YAML: {error}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigFileError(f"{file}: not valid TOML: {error}") from None
    return config_from_mapping(data, str(file), base)


def parse_op_bits(text: str) -> dict[str, OpSettings]:
    """``Gelu=8,MatMul=4,Softmax=off``: weight bits for MatMul/Gather, activation bits otherwise."""
    result: dict[str, OpSettings] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        source = "--op-bits"
        if not sep:
            raise ConfigFileError(f"{source}: {item!r} is not KIND=BITS (e.g. Gelu=8)")
        _op_kind(source, kind, kind)
        if value.strip().lower() in _NONE_WORDS:
            result[kind] = OpSettings(enabled=False)
            continue
        bits, _ = _setting_value(source, kind, "weight_bits", value)
        try:
            result[kind] = OpSettings(weight_bits=bits) if kind in WEIGHT_OPS else OpSettings(act_bits=bits)
        except ValueError as error:
            raise ConfigFileError(f"{_where(source, kind)}: {value!r}: {error}") from None
    return result


def parse_override(text: str) -> NodeOverride:
    """``PATTERN:key=value[,key=value]``, keys enabled/weight_bits/act_bits/block_size/op."""
    pattern, sep, rest = text.rpartition(":")
    source = "--override"
    if not sep or not pattern:
        raise ConfigFileError(
            f"{source}: {text!r} is not PATTERN:key=value[,key=value] (e.g. 'attention/*:weight_bits=8')"
        )
    table: dict[str, str] = {}
    for item in (part.strip() for part in rest.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigFileError(f"{_where(source, key)}: {item!r} is not key=value")
        table[key.strip()] = value.strip()
    op = _op_kind(source, "op", table.pop("op")) if "op" in table else None
    settings, weight_only = _settings(source, pattern, table, SETTING_KEYS)
    try:
        return NodeOverride(pattern, settings, op, weight_only)
    except ValueError as error:
        raise ConfigFileError(f"{source}: {error}") from None


def apply_controls(
    config: CompressConfig, op_bits: Sequence[str] = (), overrides: Sequence[str] = ()
) -> CompressConfig:
    """config with --op-bits merged into op_settings and --override appended to overrides."""
    op_settings = dict(config.op_settings)
    for text in op_bits:
        for kind, settings in parse_op_bits(text).items():
            old = op_settings.get(kind, OpSettings())
            merged = {f.name: getattr(settings, f.name) for f in dataclasses.fields(OpSettings)}
            op_settings[kind] = dataclasses.replace(old, **{k: v for k, v in merged.items() if v is not None})
    extra = tuple(parse_override(text) for text in overrides)
    return dataclasses.replace(config, op_settings=op_settings, overrides=config.overrides + extra)
