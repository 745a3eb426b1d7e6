"""EntropyCodeWeightsPass: store BlockMatMul / BlockGather codes entropy-coded (lossless) where smaller.

Each constant codes initializer read only as the codes input of BlockMatMul / BlockGather nodes (a
table tied to an output projection is read by both) is replaced by its canonical Huffman stream
(bct_onnx/code_entropy.py, docs/block_format.md) and its readers get ``codes_coding = "huffman"``;
the kernels decode it once at session creation into the packed layout. A tensor whose stream is not
smaller than its packed codes is left alone and reported as skipped.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import onnx_ir as ir
from bct_onnx.passes.framework import CompressPass, PassReport

from bct_onnx import code_entropy, ops

logger = logging.getLogger(__name__)

RULE_CODED = "codes entropy-coded"
CODED_OPS = frozenset({ops.BLOCK_MATMUL, ops.BLOCK_GATHER})


def _attr_int(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else 0


def _row_length(node: ir.Node) -> int:
    return _attr_int(node, "K" if node.op_type == ops.BLOCK_MATMUL else "axis_size")


class EntropyCodeWeightsPass(CompressPass):
    """Entropy-code the constant codes of every BlockMatMul and BlockGather (where it saves bytes)."""

    def __init__(self, chunk_symbols: int = code_entropy.DEFAULT_CHUNK_SYMBOLS) -> None:
        super().__init__()
        self.chunk_symbols = chunk_symbols

    def run(self, model: ir.Model, report: PassReport) -> None:
        readers: dict[ir.Value, list[ir.Node]] = defaultdict(list)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain == ops.DOMAIN and node.op_type in CODED_OPS and len(node.inputs) > 1:
                codes = node.inputs[1]
                if codes is not None and codes.const_value is not None and not code_entropy.is_coded(node):
                    readers[codes].append(node)
        for codes, nodes in readers.items():
            reason = self._why_not(codes, nodes)
            if reason is not None:
                for node in nodes:
                    report.skip(node, reason)
                continue
            packed = codes.const_value.numpy()
            bits, row_length = _attr_int(nodes[0], "bits"), _row_length(nodes[0])
            stream = code_entropy.encode_packed(packed, bits, row_length, self.chunk_symbols)
            if stream.nbytes >= packed.nbytes:
                for node in nodes:
                    report.skip(node, f"entropy coding does not shrink its codes ({stream.nbytes} >= {packed.nbytes} bytes)")
                continue
            codes.const_value = ir.tensor(stream, name=codes.name)
            codes.shape = ir.Shape([stream.size])
            for node in nodes:
                node.attributes["codes_coding"] = ir.AttrString("codes_coding", code_entropy.CODING)
                report.count(RULE_CODED)
            logger.debug("%s: %d -> %d bytes", codes.name, packed.nbytes, stream.nbytes)

    @staticmethod
    def _why_not(codes: ir.Value, nodes: list[ir.Node]) -> str | None:
        others = [use.node for use in codes.uses() if use.node not in nodes or use.idx != 1]
        if others:
            return f"its codes are also read by {others[0].op_type} '{others[0].name}'"
        formats = {(_attr_int(n, "bits"), _row_length(n)) for n in nodes}
        if len(formats) != 1:
            return f"its readers disagree on bits / row length: {sorted(formats)}"
        array = codes.const_value
        if array is None or array.dtype != ir.DataType.UINT8 or len(array.shape) != 2:
            return "its codes are not a 2-D uint8 initializer"
        if array.shape[0] * array.shape[1] == 0:
            return "its codes are empty"
        return None
