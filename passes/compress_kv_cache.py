"""CompressKVCachePass: a decoder's KV cache crosses steps as blockwise codes + float16 scales.

A with-past export (optimum's text-generation-with-past) reads each layer's cache as a float graph
input ``past`` [B, H_kv, T, Dh], appends the step's keys or values with ``present = Concat(past, new,
axis=2)`` and returns ``present`` as a graph output. The pass replaces that by

    new.codes, new.scales = BlockQuantize(new)                      # symmetric, blocks along Dh
    present.codes  = Concat(past.codes,  new.codes,  axis=2)        # graph outputs
    present.scales = Concat(past.scales, new.scales, axis=2)
    present_values = BlockDequantize(present.codes, present.scales) # what attention reads

so old tokens are never requantized (one row per token and head). A BlockAttention (FuseAttentionPass)
whose K and V are both such caches reads their codes and scales directly (its kv_bits inputs), so
no BlockDequantize runs. Shape reads of the cache that stop before head_dim (the past length) read
the codes input instead. The format (bits, block size,
head_dim per input) is stamped in the model's metadata (bct_onnx.kv_cache; docs/kv_cache.md).
A cache input read any other way, or a Concat on another axis, is skipped with the reason.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from bct_onnx.passes.framework import CompressPass, PassReport, Skip, register_domain

from bct_onnx import ops
from bct_onnx.config import CompressConfig
from bct_onnx.kv_cache import (
    PAST_PREFIX,
    SEQUENCE_AXIS,
    KVCacheFormat,
    codes_name,
    read_formats,
    scales_name,
    write_formats,
)

logger = logging.getLogger(__name__)

RULE = "KV cache input"
RULE_ATTENTION = "BlockAttention reads the cache codes"
_K_SLOT, _V_SLOT = 1, 4  # BlockAttention: K value/codes, scales, zero points at 1..3; V at 4..6


class _Skip(Exception):
    """A cache input left float; the message says why."""


def _axis(node: ir.Node, rank: int) -> int:
    attr = node.attributes.get("axis")
    axis = attr.as_int() if attr is not None else 0
    return axis + rank if axis < 0 else axis


def _shape_reader_ok(node: ir.Node, rank: int) -> bool:
    """A Shape node whose result stops before the last axis (head_dim): the codes have the same dims."""
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
        return False
    end = node.attributes.get("end")
    if end is None:
        return False
    stop = end.as_int()
    stop = stop + rank if stop < 0 else stop
    return stop <= rank - 1


class CompressKVCachePass(CompressPass):
    """Every float ``past_key_values*`` input appended to by a Concat on the sequence axis whose result is
    a graph output -> codes + scales input/output pairs (config.kv_cache_bits, kv_cache_block_size)."""

    def __init__(self, config: CompressConfig) -> None:
        super().__init__()
        self.config = config

    def run(self, model: ir.Model, report: PassReport) -> None:
        bits = self.config.kv_cache_bits
        if bits is None or not self.config.compresses_kv_cache:
            return
        graph = model.graph
        formats = read_formats(model.metadata_props)
        outputs = {id(value) for value in graph.outputs}
        for past in list(graph.inputs):
            if not (past.name or "").startswith(PAST_PREFIX) or past.name in formats:
                continue
            try:
                concat, shape_reads, head_dim = self._match(past, outputs)
            except _Skip as reason:
                report.skipped.append(_cache_skip(past, str(reason)))
                continue
            fmt = KVCacheFormat(bits, self.config.kv_cache_block_size, head_dim)
            self._rewrite(graph, past, concat, shape_reads, fmt)
            formats[past.name] = fmt
            report.count(RULE)
        if formats:
            register_domain(model)
            write_formats(model.metadata_props, formats)
            _attend_to_codes(graph, report)

    def _match(self, past: ir.Value, outputs: set[int]) -> tuple[ir.Node, list[ir.Node], int]:
        if past.dtype != ir.DataType.FLOAT:
            raise _Skip(f"dtype {past.dtype} is not float32")
        shape = past.shape
        if shape is None or len(shape) != 4:
            raise _Skip(f"shape {shape} is not [batch, heads, past, head_dim]")
        head_dim = shape[3]
        if not isinstance(head_dim, int) or not isinstance(shape[1], int):
            raise _Skip(f"heads and head_dim of shape {shape} are not static")
        concat = None
        shape_reads = []
        for use in past.uses():
            node = use.node
            if node.graph is not None and node.graph is not past.graph:
                raise _Skip(f"read inside a subgraph by {node.op_type} '{node.name}'")
            if (
                node.op_type == "Concat"
                and node.domain in ("", "ai.onnx")
                and use.idx == 0
                and concat is None
            ):
                concat = node
            elif _shape_reader_ok(node, 4):
                shape_reads.append(node)
            else:
                raise _Skip(
                    f"read by {node.op_type} '{node.name}' (input {use.idx}), not only by the cache Concat"
                )
        if concat is None:
            raise _Skip("no Concat appends to it")
        if len(concat.inputs) != 2 or _axis(concat, 4) != SEQUENCE_AXIS:
            raise _Skip(f"Concat '{concat.name}' is not a two-input Concat on axis {SEQUENCE_AXIS}")
        if id(concat.outputs[0]) not in outputs:
            raise _Skip(f"the result of Concat '{concat.name}' is not a graph output (present)")
        return concat, shape_reads, head_dim

    def _rewrite(
        self, graph: ir.Graph, past: ir.Value, concat: ir.Node, shape_reads: list[ir.Node], fmt: KVCacheFormat
    ) -> None:
        batch, heads, length, _ = past.shape  # type: ignore[misc]
        present = concat.outputs[0]
        new = concat.inputs[1]
        assert new is not None and present.name is not None and past.name is not None
        past_codes = ir.Value(
            name=codes_name(past.name),
            type=ir.TensorType(ir.DataType.UINT8),
            shape=ir.Shape([batch, heads, length, fmt.row_bytes]),
        )
        past_scales = ir.Value(
            name=scales_name(past.name),
            type=ir.TensorType(ir.DataType.FLOAT16),
            shape=ir.Shape([batch, heads, length, fmt.num_blocks]),
        )
        attrs = {"bits": fmt.bits, "block_size": fmt.block_size, "symmetric": 1}
        quantize = ir.node(
            ops.BLOCK_QUANTIZE,
            [new],
            {**attrs, "scale_kind": "float16"},
            domain=ops.DOMAIN,
            name=f"{concat.name}.kv_quantize",
            num_outputs=2,
        )
        quantize.outputs[0].name = f"{new.name}.codes"
        quantize.outputs[1].name = f"{new.name}.scales"
        present_dims = list(present.shape) if present.shape is not None and len(present.shape) == 4 else None
        cat_codes = ir.node(
            "Concat", [past_codes, quantize.outputs[0]], {"axis": SEQUENCE_AXIS}, name=f"{concat.name}.codes"
        )
        cat_scales = ir.node(
            "Concat",
            [past_scales, quantize.outputs[1]],
            {"axis": SEQUENCE_AXIS},
            name=f"{concat.name}.scales",
        )
        for value, suffix_name, dtype, width in (
            (cat_codes.outputs[0], codes_name(present.name), ir.DataType.UINT8, fmt.row_bytes),
            (cat_scales.outputs[0], scales_name(present.name), ir.DataType.FLOAT16, fmt.num_blocks),
        ):
            value.name = suffix_name
            value.type = ir.TensorType(dtype)
            if present_dims is not None:
                value.shape = ir.Shape([*present_dims[:3], width])
        dequantize = ir.node(
            ops.BLOCK_DEQUANTIZE,
            [cat_codes.outputs[0], cat_scales.outputs[0]],
            {**attrs, "axis_size": fmt.head_dim},
            domain=ops.DOMAIN,
            name=f"{concat.name}.kv_dequantize",
        )
        values = dequantize.outputs[0]
        values.name = f"{present.name}.values"
        values.type = ir.TensorType(ir.DataType.FLOAT)
        values.shape = present.shape
        graph.insert_after(concat, [quantize, cat_codes, cat_scales, dequantize])
        # Graph outputs: present -> its codes and scales, in its place.
        index = list(graph.outputs).index(present)
        graph.outputs.pop(index)
        graph.outputs.insert(index, cat_scales.outputs[0])
        graph.outputs.insert(index, cat_codes.outputs[0])
        present.replace_all_uses_with(values)
        graph.remove(concat, safe=True)
        for node in shape_reads:
            node.replace_input_with(0, past_codes)
        index = list(graph.inputs).index(past)
        graph.inputs.pop(index)
        graph.inputs.insert(index, past_scales)
        graph.inputs.insert(index, past_codes)


def _cache_codes(value: ir.Value | None) -> tuple[ir.Node, KVCacheFormat] | None:
    """The cache BlockDequantize behind value and its format, when value is one."""
    node = value.producer() if value is not None else None
    if node is None or node.domain != ops.DOMAIN or node.op_type != ops.BLOCK_DEQUANTIZE:
        return None
    if not node.name.endswith(".kv_dequantize"):
        return None
    attrs = {name: attr.as_int() for name, attr in node.attributes.items()}
    return node, KVCacheFormat(attrs["bits"], attrs["block_size"], attrs["axis_size"])


def _attend_to_codes(graph: ir.Graph, report: PassReport) -> None:
    """BlockAttention nodes with float K and V from two caches of one format read their codes instead."""
    for node in list(graph):
        if node.domain != ops.DOMAIN or node.op_type != ops.BLOCK_ATTENTION:
            continue
        attr = node.attributes.get("kv_bits")
        if attr is not None and attr.as_int() != 0:
            continue
        inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
        key, value = _cache_codes(inputs[_K_SLOT]), _cache_codes(inputs[_V_SLOT])
        if key is None or value is None or key[1] != value[1]:
            continue
        fmt = key[1]
        inputs[_K_SLOT : _K_SLOT + 3] = [key[0].inputs[0], key[0].inputs[1], None]
        inputs[_V_SLOT : _V_SLOT + 3] = [value[0].inputs[0], value[0].inputs[1], None]
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        attributes.update(kv_bits=fmt.bits, kv_block_size=fmt.block_size, kv_symmetric=1)
        new = ir.node(
            node.op_type,
            inputs,
            attributes,
            domain=node.domain,
            name=node.name,
            num_outputs=len(node.outputs),
        )
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [new], list(node.outputs), list(new.outputs)
        )
        for dequantize, _ in (key, value):
            if not dequantize.outputs[0].uses() and dequantize.graph is not None:
                graph.remove(
                    dequantize, safe=True
                )  # the pass is usable alone, without the pipeline's cleanup
        report.count(RULE_ATTENTION)


def _cache_skip(past: ir.Value, reason: str) -> Skip:
    return Skip(past.name or "<unnamed>", "KVCache", f"cache input left float: {reason}")
