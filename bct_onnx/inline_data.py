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

import math
import mmap
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
from google.protobuf.message import EncodeError

# Protobuf field numbers (onnx.proto3) and wire types used here.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS = 1
_TENSOR_DATA_TYPE = 2
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


def _varints(buf: mmap.mmap | bytes, start: int, end: int) -> list[int]:
    """The values of a packed repeated varint field."""
    values = []
    while start < end:
        value, start = _varint(buf, start, end)
        values.append(value)
    return values


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


# Bytes per element of the fixed-width TensorProto data types (FLOAT .. FLOAT8E5M2FNUZ).
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
                  17: 1, 18: 1, 19: 1, 20: 1}


def _detached_tensor(buf: mmap.mmap, start: int, end: int, location: str, min_bytes: int) -> bytes | None:
    """The TensorProto at buf[start:end] as an external reference to its raw_data, or None to keep it.

    Only a tensor whose raw_data has exactly the bytes its dtype and dims need is detached: any other
    stays in the message, where the input checks report it as the inline tensor it is.
    """
    raw: tuple[int, int] | None = None
    kept: list[bytes] = []
    dims: list[int] = []
    data_type = 0
    for field, wire, field_start, value_start, value_end in _fields(buf, start, end):
        if field in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None  # already external (or a location we do not rewrite)
        if field == _TENSOR_DIMS:
            dims += _varints(buf, value_start, value_end) if wire == _LEN else [_varint(buf, value_start, value_end)[0]]
        elif field == _TENSOR_DATA_TYPE and wire == _VARINT:
            data_type = _varint(buf, value_start, value_end)[0]
        if field == _TENSOR_RAW_DATA and wire == _LEN:
            if raw is not None:
                return None  # repeated raw_data: protobuf would merge it; leave it to the parser
            raw = (value_start, value_end)
            continue
        kept.append(buf[field_start:value_end])
    if raw is None or raw[1] - raw[0] < min_bytes or data_type not in _ELEMENT_BYTES:
        return None
    if raw[1] - raw[0] != _ELEMENT_BYTES[data_type] * math.prod(dims):
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


# The location that marks a stand-in for a tensor whose bytes write_inline streams into the file.
_STREAMED_LOCATION = "__bct_onnx_streamed__"
# protobuf cannot parse a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1


def write_inline(model: ir.Model, path: Path, min_bytes: int = MIN_DETACHED_BYTES) -> None:
    """Save model as one .onnx file with its weights inline, writing them tensor by tensor.

    ``ir.save`` builds the whole ModelProto (a copy of every weight) and then its serialization (a
    second copy) before writing; here only the graph is serialized (large initializers replaced by
    stand-in references), and each weight's bytes are written into its TensorProto's ``raw_data``
    straight from the tensor (an external one copies inside the kernel). Raises EncodeError when
    the file would exceed protobuf's 2 GB limit, before writing anything.
    """
    streamed: list[ir.TensorProtocol] = []

    def stand_in(tensor: ir.TensorProtocol) -> ir.TensorProtocol | None:
        if not _whole_bytes(tensor) or tensor.nbytes < min_bytes:
            # Written by protobuf itself; an external tensor must be read in to end up inline.
            return ir.Tensor(tensor.numpy(), name=tensor.name) if isinstance(tensor, ir.ExternalTensor) else None
        streamed.append(tensor)
        return ir.ExternalTensor(
            _STREAMED_LOCATION, len(streamed) - 1, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name or ""
        )

    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            replacement = stand_in(tensor) if tensor is not None else None
            if replacement is not None:
                swapped.append((value, tensor))
                value.const_value = replacement
        skeleton = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    _write_attached(skeleton, streamed, path)


def _whole_bytes(tensor: ir.TensorProtocol) -> bool:
    """True for a fixed-width dtype of whole bytes (its raw bytes are its numpy bytes)."""
    try:
        bits = tensor.dtype.bitwidth
    except (TypeError, ValueError):  # STRING and other variable-width types
        return False
    return bits >= 8 and bits % 8 == 0


def _write_attached(skeleton: bytes, streamed: list[ir.TensorProtocol], path: Path) -> None:
    """Write skeleton with each stand-in initializer's raw_data filled from streamed[its offset]."""
    graphs = [f for f in _fields(skeleton, 0, len(skeleton)) if f[0] == _MODEL_GRAPH]
    if len(graphs) != 1:
        raise WireFormatError("expected exactly one graph field")
    _, _, graph_field_start, graph_start, graph_end = graphs[0]
    parts: list[bytes | ir.TensorProtocol] = []  # bytes as they are, or a tensor's raw bytes
    graph_length = 0
    for field, wire, field_start, value_start, value_end in _fields(skeleton, graph_start, graph_end):
        attached = _attached_tensor(skeleton, value_start, value_end, streamed) if field == _GRAPH_INITIALIZER and wire == _LEN else None
        if attached is None:
            parts.append(skeleton[field_start:value_end])
            graph_length += value_end - field_start
            continue
        header, tensor = attached
        body = len(header) + len(_encode_varint(_TENSOR_RAW_DATA << 3 | _LEN)) + len(_encode_varint(tensor.nbytes)) + tensor.nbytes
        prefix = _encode_varint(_GRAPH_INITIALIZER << 3 | _LEN) + _encode_varint(body)
        prefix += header + _encode_varint(_TENSOR_RAW_DATA << 3 | _LEN) + _encode_varint(tensor.nbytes)
        parts += [prefix, tensor]
        graph_length += len(prefix) + tensor.nbytes
    head = skeleton[:graph_field_start] + _encode_varint(_MODEL_GRAPH << 3 | _LEN) + _encode_varint(graph_length)
    tail = skeleton[graph_end:]
    if len(head) + graph_length + len(tail) > PROTOBUF_LIMIT:
        raise EncodeError(f"the model takes {len(head) + graph_length + len(tail)} bytes, over protobuf's 2 GB limit")
    with open(path, "wb") as file:
        file.write(head)
        for part in parts:
            if isinstance(part, bytes):
                file.write(part)
            elif hasattr(part, "tofile"):
                part.tofile(file)
            else:
                file.write(part.tobytes())
        file.write(tail)


def _attached_tensor(
    buf: bytes, start: int, end: int, streamed: list[ir.TensorProtocol]
) -> tuple[bytes, ir.TensorProtocol] | None:
    """(the TensorProto's fields without its stand-in reference, the tensor it stands for), or None."""
    kept: list[bytes] = []
    index = 0  # an offset of 0 may be left out
    is_stand_in = False
    for field, _, field_start, value_start, value_end in _fields(buf, start, end):
        if field == _TENSOR_EXTERNAL_DATA:
            key = value = None
            for sub, _, _, sub_start, sub_end in _fields(buf, value_start, value_end):
                text = buf[sub_start:sub_end].decode()
                key, value = (text, value) if sub == _ENTRY_KEY else (key, text)
            if key == "location":
                is_stand_in = value == _STREAMED_LOCATION
            elif key == "offset" and value is not None:
                index = int(value)
            continue
        if field == _TENSOR_DATA_LOCATION:
            continue
        kept.append(buf[field_start:value_end])
    if not is_stand_in:
        return None
    return b"".join(kept), streamed[index]
