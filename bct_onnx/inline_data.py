"""Tensor data stored inside an .onnx file, left where it is: the file is its own external data.

Parsing a model with its weights inline (``raw_data``, as optimum and torch write files under 2 GB)
copies every weight into the protobuf message, and onnx-ir keeps that message: the process holds
the model twice while loading and once until it exits. ``detached_model_bytes`` instead walks the
file's protobuf wire format (memory-mapped; only field headers are read) and returns a ModelProto
encoding in which every large initializer of the main graph points at its own ``raw_data`` bytes
inside the .onnx file, as an external-data reference (location = the file's name, offset, length).
That message is small (the graph without its weights); the weights are read on demand later
(bct_onnx.external_data.StreamedTensor).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

# Protobuf field numbers (onnx.proto3) and wire types used here.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Inline tensors smaller than this stay in the message (shapes, scalars, small biases).
MIN_DETACHED_BYTES = 1024


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message (the caller reports the file)."""


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireFormatError("field number 0")
        if wire == _VARINT:
            value_start = pos
            _, pos = _varint(buf, pos, end)
        elif wire == _FIXED64:
            value_start, pos = pos, pos + 8
        elif wire == _LEN:
            length, value_start = _varint(buf, pos, end)
            pos = value_start + length
        elif wire == _FIXED32:
            value_start, pos = pos, pos + 4
        else:
            raise WireFormatError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireFormatError("a field runs past the end of its message")
        yield field, wire, field_start, value_start, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    return _len_field(_TENSOR_EXTERNAL_DATA, _len_field(_ENTRY_KEY, key.encode()) + _len_field(_ENTRY_VALUE, value.encode()))


def _detached_tensor(buf: mmap.mmap, start: int, end: int, location: str, min_bytes: int) -> bytes | None:
    """The TensorProto at buf[start:end] as an external reference to its raw_data, or None to keep it."""
    raw: tuple[int, int] | None = None
    kept: list[bytes] = []
    for field, wire, field_start, value_start, value_end in _fields(buf, start, end):
        if field in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None  # already external (or a location we do not rewrite)
        if field == _TENSOR_RAW_DATA and wire == _LEN:
            if raw is not None:
                return None  # repeated raw_data: protobuf would merge it; leave it to the parser
            raw = (value_start, value_end)
            continue
        kept.append(buf[field_start:value_end])
    if raw is None or raw[1] - raw[0] < min_bytes:
        return None
    offset, length = raw[0], raw[1] - raw[0]
    kept += [
        _entry("location", location), _entry("offset", str(offset)), _entry("length", str(length)),
        _encode_varint(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _encode_varint(_EXTERNAL),
    ]
    return b"".join(kept)


def detached_model_bytes(path: Path, min_bytes: int = MIN_DETACHED_BYTES) -> tuple[bytes, int]:
    """(ModelProto bytes whose large inline initializers refer to their bytes in ``path``, count detached).

    Raises WireFormatError (or OSError) when the file is not a protobuf message this walk can
    handle; the caller then parses it the ordinary way, which reports what is wrong.
    """
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        size = len(buf)
        graphs = [f for f in _fields(buf, 0, size) if f[0] == _MODEL_GRAPH]
        if len(graphs) != 1 or graphs[0][1] != _LEN:
            raise WireFormatError("expected exactly one graph field")
        _, _, graph_field_start, graph_start, graph_end = graphs[0]
        parts: list[bytes] = []
        detached = 0
        for field, wire, field_start, value_start, value_end in _fields(buf, graph_start, graph_end):
            if field == _GRAPH_INITIALIZER and wire == _LEN:
                tensor = _detached_tensor(buf, value_start, value_end, path.name, min_bytes)
                if tensor is not None:
                    parts.append(_len_field(_GRAPH_INITIALIZER, tensor))
                    detached += 1
                    continue
            parts.append(buf[field_start:value_end])
        graph = _len_field(_MODEL_GRAPH, b"".join(parts))
        return buf[:graph_field_start] + graph + buf[graph_end:], detached
