"""Lossless entropy coding of stored block codes (canonical Huffman, chunked): the numpy specification.

A weight or table's packed codes ([rows, row_bytes], bct_onnx.block_format) may be stored instead as
one uint8 stream that codes every code symbol (0 .. 2**bits - 1, row-major) with a canonical Huffman
code of at most MAX_CODE_LENGTH bits. The runtime decodes it once, at session creation, back into
exactly the packed layout (runtime_ops/include/bct/code_entropy.h); docs/block_format.md describes
the stream in prose. Symbols are cut into chunks of ``chunk_symbols`` that each start on a byte, so
decoders can run chunks in parallel (and this module decodes all chunks in lockstep with numpy).

Stream layout (little-endian):

====== ==================== ===============================================================
offset size                 field
====== ==================== ===============================================================
0      4                    magic ``b"BCTH"``
4      1                    version (1)
5      1                    bits (2..8): width of the code symbols
6      1                    max_length: longest code length used (1..MAX_CODE_LENGTH)
7      1                    0 (reserved)
8      8                    rows (uint64)
16     8                    row_length: symbols per row (uint64; the tensor's axis_size)
24     4                    chunk_symbols (uint32, >= 1)
28     4                    chunk_count = ceil(rows * row_length / chunk_symbols) (uint32)
32     2**bits              code length of each symbol (uint8; 0: the symbol does not occur)
..     4 * (chunk_count+1)  byte offset of each chunk in the payload (uint32; first 0, last = payload size)
..     payload              the chunks
====== ==================== ===============================================================

Codes are canonical (DEFLATE's rule: shorter codes first, then by symbol) and written as DEFLATE
writes Huffman codes: a code's most significant bit first, into a bit stream that fills each byte
from its least significant bit. A chunk's unused high bits of its last byte are zero.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import numpy as np
import onnx_ir as ir

from bct_onnx.block_format import MAX_BITS, MIN_BITS, pack_codes, unpack_codes

MAGIC = b"BCTH"
VERSION = 1
MAX_CODE_LENGTH = 12  # decode tables of 4096 entries; 2**12 >= 256 symbols of 8-bit codes
DEFAULT_CHUNK_SYMBOLS = 16384
HEADER_BYTES = 32
CODING = "huffman"  # the ops' codes_coding attribute value for this stream


class EntropyCodeError(ValueError):
    """A stream that is not a valid entropy-coded code stream (the message says what is wrong)."""


@dataclasses.dataclass(frozen=True)
class StreamHeader:
    bits: int
    max_length: int
    rows: int
    row_length: int
    chunk_symbols: int
    chunk_count: int
    lengths: np.ndarray  # uint8 [2**bits]
    offsets: np.ndarray  # int64 [chunk_count + 1], byte offsets into the payload
    payload_start: int

    @property
    def symbols(self) -> int:
        return self.rows * self.row_length


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths (uint8) of a Huffman code for ``counts``; 0 for absent symbols."""
    lengths = np.zeros(len(counts), dtype=np.uint8)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        lengths[present[0]] = 1  # one symbol still needs a one-bit code
        return lengths
    # (weight, tie-break, symbols under this node): ties broken by creation order, deterministic
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(present)]
    heapq.heapify(heap)
    order = len(heap)
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, order, s1 + s2))
        order += 1
    return lengths


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths of at most ``max_length`` bits: counts are halved (kept >= 1) until they fit."""
    counts = np.asarray(counts, dtype=np.int64)
    while True:
        lengths = _huffman_lengths(counts)
        if int(lengths.max()) <= max_length:
            return lengths
        counts = np.where(counts > 0, np.maximum(counts >> 1, 1), 0)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """DEFLATE's canonical code of each symbol (most significant bit first), from its length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code = 0
    previous = 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        previous = int(lengths[symbol])
        codes[symbol] = code
        code += 1
    return codes


def _reversed(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each code with its ``length`` bits in reverse order (the order they enter the LSB-first stream)."""
    out = np.zeros_like(codes)
    for j in range(int(lengths.max(initial=0))):
        out |= ((codes >> j) & 1) << np.maximum(lengths - 1 - j, 0)  # codes < 2**length: no stray bits
    return out


def encode(codes: np.ndarray, bits: int, chunk_symbols: int = DEFAULT_CHUNK_SYMBOLS) -> np.ndarray:
    """The stream (uint8 1-D) of unpacked codes [rows, row_length] of ``bits`` bits."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise EntropyCodeError(f"codes must be 2-D [rows, row_length], got shape {codes.shape}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise EntropyCodeError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    if chunk_symbols < 1:
        raise EntropyCodeError(f"chunk_symbols must be >= 1, got {chunk_symbols}")
    symbols = codes.reshape(-1).astype(np.int64)
    if symbols.size == 0:
        raise EntropyCodeError("no codes to encode (an empty tensor)")
    if symbols.size and (symbols.min() < 0 or symbols.max() >= 1 << bits):
        raise EntropyCodeError(f"codes must be in 0..{(1 << bits) - 1}")
    lengths = code_lengths(np.bincount(symbols, minlength=1 << bits))
    rev = _reversed(canonical_codes(lengths), lengths.astype(np.int64))
    sym_len = lengths.astype(np.int64)[symbols]
    sym_code = rev[symbols]
    count = symbols.size
    chunk_count = -(-count // chunk_symbols)
    chunk_of = np.arange(count) // chunk_symbols
    # Bit position of each symbol inside its chunk, then each chunk's byte size.
    ends = np.cumsum(sym_len)
    chunk_bits = np.add.reduceat(sym_len, np.arange(0, count, chunk_symbols)) if count else np.zeros(0, np.int64)
    chunk_bytes = (chunk_bits + 7) // 8
    offsets = np.zeros(chunk_count + 1, dtype=np.int64)
    np.cumsum(chunk_bytes, out=offsets[1:])
    if offsets[-1] >= 1 << 32:
        raise EntropyCodeError("a stream payload of 4 GiB or more cannot be stored (uint32 chunk offsets)")
    first_bit_of_chunk = np.concatenate(([0], np.cumsum(chunk_bits)))[:-1] if count else np.zeros(0, np.int64)
    starts = ends - sym_len - first_bit_of_chunk[chunk_of] + 8 * offsets[:-1][chunk_of]
    bit_stream = np.zeros(8 * int(offsets[-1]), dtype=np.uint8)
    for j in range(int(lengths.max(initial=0))):
        has = sym_len > j
        bit_stream[starts[has] + j] = (sym_code[has] >> j) & 1
    payload = np.packbits(bit_stream, bitorder="little")
    header = np.zeros(HEADER_BYTES, dtype=np.uint8)
    header[0:4] = np.frombuffer(MAGIC, dtype=np.uint8)
    header[4:8] = (VERSION, bits, int(lengths.max(initial=0)), 0)
    header[8:16] = np.frombuffer(np.uint64(codes.shape[0]).tobytes(), np.uint8)
    header[16:24] = np.frombuffer(np.uint64(codes.shape[1]).tobytes(), np.uint8)
    header[24:28] = np.frombuffer(np.uint32(chunk_symbols).tobytes(), np.uint8)
    header[28:32] = np.frombuffer(np.uint32(chunk_count).tobytes(), np.uint8)
    return np.concatenate(
        (header, lengths, offsets.astype("<u4").view(np.uint8), payload)
    ).astype(np.uint8)


def read_header(stream: np.ndarray) -> StreamHeader:
    """The header of ``stream``, checked against the stream's size; EntropyCodeError says what is wrong."""
    data = np.asarray(stream, dtype=np.uint8).reshape(-1)
    if data.size < HEADER_BYTES or bytes(data[:4]) != MAGIC:
        raise EntropyCodeError("not an entropy-coded code stream (no BCTH header)")
    version, bits, max_length, reserved = (int(v) for v in data[4:8])
    if version != VERSION:
        raise EntropyCodeError(f"stream version {version} is not supported (only {VERSION})")
    if not MIN_BITS <= bits <= MAX_BITS or not 1 <= max_length <= MAX_CODE_LENGTH or reserved:
        raise EntropyCodeError(f"bad stream header: bits {bits}, max_length {max_length}, reserved {reserved}")
    rows, row_length = (int(v) for v in data[8:24].view("<u8"))
    chunk_symbols, chunk_count = (int(v) for v in data[24:32].view("<u4"))
    if chunk_symbols < 1 or rows >= 1 << 40 or row_length >= 1 << 40:
        raise EntropyCodeError(f"bad stream header: rows {rows}, row_length {row_length}, chunk_symbols {chunk_symbols}")
    if chunk_count != -(-rows * row_length // chunk_symbols):
        raise EntropyCodeError(f"chunk_count {chunk_count} does not match {rows * row_length} symbols")
    lengths_end = HEADER_BYTES + (1 << bits)
    payload_start = lengths_end + 4 * (chunk_count + 1)
    if data.size < payload_start:
        raise EntropyCodeError(f"stream of {data.size} bytes is shorter than its header ({payload_start})")
    lengths = data[HEADER_BYTES:lengths_end].copy()
    if int(lengths.max()) != max_length:
        raise EntropyCodeError(f"code lengths exceed or miss max_length {max_length}")
    kraft = sum(1 << (max_length - int(n)) for n in lengths if n)
    if kraft > 1 << max_length or (kraft < 1 << max_length and np.count_nonzero(lengths) > 1):
        raise EntropyCodeError("code lengths do not form a complete prefix code")
    offsets = data[lengths_end:payload_start].view("<u4").astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or payload_start + offsets[-1] != data.size:
        raise EntropyCodeError("chunk offsets are not increasing from 0 to the payload size")
    return StreamHeader(bits, max_length, rows, row_length, chunk_symbols, chunk_count, lengths, offsets, payload_start)


def decode_table(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbol, length) per value of the next ``max_length`` stream bits (LSB first); length 0: invalid."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rev = _reversed(canonical_codes(lengths), lengths)
    table_symbol = np.zeros(1 << max_length, dtype=np.int64)
    table_length = np.zeros(1 << max_length, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        n = int(lengths[symbol])
        index = int(rev[symbol]) + (np.arange(1 << (max_length - n)) << n)
        table_symbol[index] = symbol
        table_length[index] = n
    return table_symbol, table_length


def decode(stream: np.ndarray) -> np.ndarray:
    """Unpacked codes [rows, row_length] (uint8) of a stream; EntropyCodeError on a corrupt one."""
    data = np.asarray(stream, dtype=np.uint8).reshape(-1)
    header = read_header(data)
    total = header.symbols
    out = np.zeros(total, dtype=np.uint8)
    if total == 0:
        return out.reshape(header.rows, header.row_length)
    table_symbol, table_length = decode_table(header.lengths, header.max_length)
    mask = (1 << header.max_length) - 1
    # Every chunk in lockstep: one symbol of each per step. Pad the payload so a peek never overreads.
    payload = np.concatenate((data[header.payload_start:], np.zeros(4, np.uint8))).astype(np.int64)
    chunk_start = header.offsets[:-1] * 8
    chunk_end = header.offsets[1:] * 8
    position = chunk_start.copy()
    first = np.arange(header.chunk_count) * header.chunk_symbols
    count = np.minimum(header.chunk_symbols, total - first)
    for step in range(header.chunk_symbols):
        live = np.flatnonzero(count > step)
        if live.size == 0:
            break
        p = position[live]
        byte = p >> 3
        window = payload[byte] | (payload[byte + 1] << 8) | (payload[byte + 2] << 16)
        peek = (window >> (p & 7)) & mask
        n = table_length[peek]
        if np.any(n == 0):
            raise EntropyCodeError(f"invalid code in chunk {int(live[np.argmax(n == 0)])}")
        position[live] = p + n
        if np.any(position[live] > chunk_end[live]):
            raise EntropyCodeError(f"chunk {int(live[np.argmax(position[live] > chunk_end[live])])} overruns its bytes")
        out[first[live] + step] = table_symbol[peek]
    return out.reshape(header.rows, header.row_length)


def encode_packed(packed: np.ndarray, bits: int, axis_size: int, chunk_symbols: int = DEFAULT_CHUNK_SYMBOLS) -> np.ndarray:
    """The stream of packed codes [..., row_bytes] (rows flattened) of rows of ``axis_size`` codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows = int(np.prod(packed.shape[:-1], dtype=np.int64))
    return encode(unpack_codes(packed.reshape(rows, packed.shape[-1]), bits, axis_size), bits, chunk_symbols)


def decode_packed(stream: np.ndarray, bits: int, axis_size: int) -> np.ndarray:
    """Packed codes [rows, row_bytes] of a stream, checked against the op's ``bits`` and ``axis_size``."""
    header = read_header(stream)
    if header.bits != bits or header.row_length != axis_size:
        raise EntropyCodeError(
            f"stream holds {header.bits}-bit codes in rows of {header.row_length}, "
            f"the op expects {bits}-bit codes in rows of {axis_size}"
        )
    return pack_codes(decode(stream), bits)


def bits_per_value(stream: np.ndarray) -> float:
    """Stored bits per code of a stream (header, table and offsets included)."""
    header = read_header(stream)
    return 8 * np.asarray(stream).size / max(1, header.symbols)


def is_coded(node: ir.Node) -> bool:
    """True when a BlockMatMul / BlockGather node's codes input holds a stream (codes_coding)."""
    attr = node.attributes.get("codes_coding")
    return attr is not None and attr.as_string() == CODING


def coded_summary(model: ir.Model) -> dict[str, Any] | None:
    """Bits per stored code of the model's entropy-coded tensors, packed and coded (None: none coded).

    "values": codes in coded tensors; "bits_before": packed bits a value (bits, plus row padding);
    "bits_after": stream bits a value (header, code lengths and chunk offsets included).
    """
    seen: set[str] = set()
    values = packed_bytes = stream_bytes = tensors = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        codes = node.inputs[1] if len(node.inputs) > 1 else None
        if not is_coded(node) or codes is None or codes.const_value is None or codes.name in seen:
            continue
        seen.add(codes.name or "")
        stream = codes.const_value.numpy()
        header = read_header(stream)
        tensors += 1
        values += header.symbols
        packed_bytes += header.rows * ((header.row_length * header.bits + 7) // 8)
        stream_bytes += stream.size
    if not tensors:
        return None
    return {
        "tensors": tensors,
        "values": values,
        "packed_bytes": packed_bytes,
        "coded_bytes": stream_bytes,
        "bits_before": round(8 * packed_bytes / values, 4),
        "bits_after": round(8 * stream_bytes / values, 4),
    }
