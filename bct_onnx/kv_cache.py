"""The compressed KV cache of a decoder export: its format, names and feeds (docs/kv_cache.md).

CompressKVCachePass (passes/compress_kv_cache.py) turns each float cache input
``past_key_values.L.key`` [B, H_kv, T, Dh] into two inputs, ``past_key_values.L.key.codes`` uint8
[B, H_kv, T, row_bytes(Dh)] and ``past_key_values.L.key.scales`` float16 [B, H_kv, T, nb(Dh)], and each
``present.L.key`` output into ``present.L.key.codes`` / ``.scales`` alike: symmetric blocks along
head_dim, one row per token and head, so a new token is quantized on its own and appended along the
sequence axis (axis 2) without touching the rows before it. This module is what drivers (generate,
perplexity, tests) need: the format stamped in the model's metadata, empty caches, and the numpy
conversion of a float cache into codes (bct_onnx.block_format is the spec).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bct_onnx.block_format import BlockFormat, ScaleKind, pack_codes, quantize_codes

PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"
CODES_SUFFIX = ".codes"
SCALES_SUFFIX = ".scales"
METADATA_KEY = "bct_onnx.kv_cache"  # model metadata_props: JSON of KVCacheFormat.to_dict()
SEQUENCE_AXIS = 2  # [batch, kv heads, sequence, head_dim]


@dataclasses.dataclass(frozen=True)
class KVCacheFormat:
    """Format of a compressed cache: ``bits``-bit symmetric codes, float16 scales, blocks of ``block_size``
    along head_dim (``head_dim`` elements per row)."""

    bits: int
    block_size: int
    head_dim: int

    @property
    def block_format(self) -> BlockFormat:
        return BlockFormat(self.bits, self.block_size, True, ScaleKind.FLOAT16)

    @property
    def row_bytes(self) -> int:
        return self.block_format.row_bytes(self.head_dim)

    @property
    def num_blocks(self) -> int:
        return self.block_format.num_blocks(self.head_dim)

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one token of one head: codes plus float16 scales."""
        return self.row_bytes + 2 * self.num_blocks

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "block_size": self.block_size,
            "head_dim": self.head_dim,
            "symmetric": True,
            "scale_dtype": "float16",
            "sequence_axis": SEQUENCE_AXIS,
        }


def codes_name(float_name: str) -> str:
    return float_name + CODES_SUFFIX


def scales_name(float_name: str) -> str:
    return float_name + SCALES_SUFFIX


def read_formats(metadata: Mapping[str, str]) -> dict[str, KVCacheFormat]:
    """{float cache input name: format} from a model's metadata_props (or ORT's custom_metadata_map)."""
    text = metadata.get(METADATA_KEY)
    if not text:
        return {}
    entries = json.loads(text)
    return {
        name: KVCacheFormat(int(entry["bits"]), int(entry["block_size"]), int(entry["head_dim"]))
        for name, entry in entries.items()
    }


def write_formats(metadata: dict[str, str], formats: Mapping[str, KVCacheFormat]) -> None:
    metadata[METADATA_KEY] = json.dumps(
        {name: fmt.to_dict() for name, fmt in formats.items()}, sort_keys=True
    )


def session_formats(session: Any) -> dict[str, KVCacheFormat]:
    """The compressed cache inputs of an ONNX Runtime session, by float name (empty: a float cache)."""
    return read_formats(session.get_modelmeta().custom_metadata_map)


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


def empty_cache(inputs: Iterable[Any], batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length cache feeds for every ``past_key_values*`` input of a session (ORT NodeArg list):
    float, or codes and scales, with dims other than batch and past length as declared."""
    feeds: dict[str, np.ndarray] = {}
    for declared in inputs:
        if not declared.name.startswith(PAST_PREFIX):
            continue
        dtype = _ORT_TYPES.get(declared.type)
        if dtype is None:
            raise ValueError(
                f"cache input {declared.name!r} has type {declared.type}, not float, float16 or uint8"
            )
        dims = list(declared.shape)
        if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
            raise ValueError(
                f"cache input {declared.name!r} has shape {dims}, not [batch, heads, past, width]"
            )
        feeds[declared.name] = np.zeros((batch, dims[1], 0, dims[3]), dtype=dtype)
    return feeds


def quantize_cache(values: np.ndarray, fmt: KVCacheFormat) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [..., row_bytes], scales float16 [..., nb]) of a float cache [..., head_dim]."""
    if values.shape[-1] != fmt.head_dim:
        raise ValueError(
            f"cache rows have {values.shape[-1]} elements, the format says head_dim {fmt.head_dim}"
        )
    codes, scales, _ = quantize_codes(values, fmt.block_format)
    return pack_codes(codes, fmt.bits), scales


def compress_feeds(
    feeds: Mapping[str, np.ndarray], formats: Mapping[str, KVCacheFormat]
) -> dict[str, np.ndarray]:
    """feeds with each float cache input of ``formats`` replaced by its codes and scales."""
    out: dict[str, np.ndarray] = {}
    for name, value in feeds.items():
        fmt = formats.get(name)
        if fmt is None:
            out[name] = value
            continue
        out[codes_name(name)], out[scales_name(name)] = quantize_cache(np.asarray(value, np.float32), fmt)
    return out


def bytes_per_token(inputs: Iterable[Any]) -> int:
    """Cache bytes one token adds over every layer (session inputs: static heads and widths)."""
    total = 0
    for declared in inputs:
        if declared.name.startswith(PAST_PREFIX):
            dtype = _ORT_TYPES.get(declared.type)
            if dtype is None:
                raise ValueError(f"cache input {declared.name!r} has type {declared.type}")
            total += int(declared.shape[1]) * int(declared.shape[3]) * np.dtype(dtype).itemsize
    return total
