"""RemoveNoOpCastsPass: a Cast to the dtype its input already has is dropped (its readers read the input).

Exports of RMSNorm write ``hidden_states.to(float32)`` on float32 hidden states: SmolLM2's with-past
graph keeps 60 such Casts (two per layer) after compression. ONNX Runtime drops them when it loads the
model; the pass drops them from the file, so the node count says what runs. A Cast whose result is a
graph output, or whose input dtype is not known, stays.
"""

from __future__ import annotations

import onnx_ir as ir
from bct_onnx.passes.framework import DEFAULT_DOMAINS, CompressPass, PassReport

RULE = "Cast to its input's own dtype (removed)"


class RemoveNoOpCastsPass(CompressPass):
    """Drop Casts whose ``to`` is their input's dtype (main graph)."""

    def run(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        for node in list(graph):
            if node.op_type != "Cast" or node.domain not in DEFAULT_DOMAINS or not node.inputs:
                continue
            source, result = node.inputs[0], node.outputs[0]
            to = node.attributes.get("to")
            if (
                source is None
                or source.dtype is None
                or to is None
                or source.dtype != ir.DataType(to.as_int())
            ):
                continue
            if result.is_graph_output():
                continue
            result.replace_all_uses_with(source)
            graph.remove(node, safe=True)
            report.count(RULE)
