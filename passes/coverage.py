"""Coverage of a compressed model: which nodes of the target kinds ended up as bct-onnx ops.

``target_kind_shares(original, compressed)`` counts, per kind, the float nodes of the original
model (after the pipeline's canonicalize passes and the same GELU / SiLU / LayerNorm / RMSNorm
fusions, with Gemm counted as MatMul and ONNX Swish as Silu) and the ai.bct_onnx nodes of the
compressed model. The
README's family x op-kind table is built from it (tests/passes/test_families_e2e.py prints it).
A Gelu, Silu, Softmax or norm counted here runs as a bct-onnx op; whether its operand and result also
stay compressed is reported separately (``compressed_activations``).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from bct_onnx.passes.framework import DEFAULT_DOMAINS
from bct_onnx.passes.fuse_gelu import FuseGeluPass
from bct_onnx.passes.fuse_layer_norm import FuseLayerNormPass
from bct_onnx.passes.fuse_rms_norm import FuseRMSNormPass
from bct_onnx.passes.fuse_silu import FuseSiluPass
from bct_onnx.passes.infer_shapes import annotate_shapes
from bct_onnx.passes.pipeline import canonicalize_passes
from bct_onnx.passes.quantized_weights import FLOAT_DTYPES, constant_tensor

from bct_onnx import ops

# The op kinds bct-onnx compresses: MatMul, Gather, GELU, SiLU (the Llama family), Softmax, the norms.
TARGET_KINDS = ("MatMul", "Gather", "Gelu", "Silu", "Softmax", "LayerNormalization")

_FLOAT_KIND = {
    "MatMul": "MatMul",
    "Gemm": "MatMul",
    "Gelu": "Gelu",
    "Swish": "Silu",
    "Softmax": "Softmax",
    "LayerNormalization": "LayerNormalization",
}
_BCT_KIND = {
    ops.BLOCK_MATMUL: "MatMul",
    ops.BLOCK_ACT_MATMUL: "MatMul",
    ops.BLOCK_GATHER: "Gather",
    ops.BLOCK_GELU: "Gelu",
    ops.BLOCK_SILU: "Silu",
    ops.BLOCK_SOFTMAX: "Softmax",
    ops.BLOCK_LAYER_NORM: "LayerNormalization",
    ops.BLOCK_RMS_NORM: "LayerNormalization",
    ops.BLOCK_ADD_LAYER_NORM: "LayerNormalization",
    ops.BLOCK_ADD_RMS_NORM: "LayerNormalization",
}
# A BlockMatMul's epilogue is the activation it absorbed (FuseMatMulEpiloguePass): (kind, extra MatMuls).
_EPILOGUE_KINDS = {"gelu": ("Gelu", 0), "gelu_tanh": ("Gelu", 0), "silu_gate": ("Silu", 1)}
# Fused ops that stand for several target nodes: BlockAttention is Q x K^T, Softmax and P x V.
_BCT_COVERS = {ops.BLOCK_ATTENTION: ("MatMul", "Softmax", "MatMul")}


@dataclasses.dataclass(frozen=True)
class KindShare:
    kind: str
    original: int  # float nodes of this kind in the (canonicalized) original model
    compressed: int  # bct-onnx nodes of this kind in the compressed model

    @property
    def share(self) -> float | None:
        return None if self.original == 0 else min(1.0, self.compressed / self.original)


def _is_embedding(node: ir.Node) -> bool:
    table = node.inputs[0] if node.inputs else None
    tensor = constant_tensor(table)
    return tensor is not None and tensor.dtype in FLOAT_DTYPES and len(tensor.shape) == 2


def _float_counts(model: ir.Model) -> dict[str, int]:
    work = model.clone()
    # Canonicalized as the pipeline does: FoldShapeArithmeticPass merges nodes that compute the same
    # thing, e.g. GPT-NeoX's two LayerNorms of one input once exporter-deduplicated weights are one.
    for canonicalize in canonicalize_passes():
        work = canonicalize(work).model
    annotate_shapes(work)
    for fusion in (FuseGeluPass(), FuseSiluPass(), FuseLayerNormPass(), FuseRMSNormPass()):
        work = fusion(work).model
    counts = dict.fromkeys(TARGET_KINDS, 0)
    for node in ir.traversal.RecursiveGraphIterator(work.graph):
        if node.domain in DEFAULT_DOMAINS:
            if node.op_type in _FLOAT_KIND:
                counts[_FLOAT_KIND[node.op_type]] += 1
            elif node.op_type == "Gather" and _is_embedding(node):
                counts["Gather"] += 1
        elif node.domain == ops.DOMAIN:  # fused, still float operands
            for kind in _bct_kinds(node):
                counts[kind] += 1
    return counts


def _bct_kinds(node: ir.Node) -> tuple[str, ...]:
    """The target kinds an ai.bct_onnx node stands for (none, one, or several for a fused op)."""
    if node.op_type in _BCT_COVERS:
        return _BCT_COVERS[node.op_type]
    if node.op_type not in _BCT_KIND:
        return ()
    epilogue = node.attributes.get("epilogue") if node.op_type == ops.BLOCK_MATMUL else None
    if epilogue is not None and epilogue.as_string() in _EPILOGUE_KINDS:
        kind, extra_matmuls = _EPILOGUE_KINDS[epilogue.as_string()]
        return ("MatMul", kind) + ("MatMul",) * extra_matmuls  # gate and up: two MatMuls of the original
    if node.op_type == ops.BLOCK_MATMUL:
        return ("MatMul",) * _packed_projections(node)
    return (_BCT_KIND[node.op_type],)


def _packed_projections(node: ir.Node) -> int:
    """The original MatMuls a BlockMatMul computes: 2 or 3 for the Q, K [, V] projection that
    PackSharedInputMatMulsPass packs (read by BlockAttention as Q with K, and maybe V, absent), else 1."""
    for use in node.outputs[0].uses():
        reader = use.node
        if use.idx != 0 or reader.domain != ops.DOMAIN or reader.op_type != ops.BLOCK_ATTENTION:
            continue
        kv_heads = reader.attributes.get("kv_heads")
        if (
            kv_heads is not None
            and kv_heads.as_int() > 0
            and (len(reader.inputs) < 2 or reader.inputs[1] is None)
        ):
            return 2 if len(reader.inputs) > 4 and reader.inputs[4] is not None else 3
    return 1


def bct_counts(model: ir.Model) -> dict[str, int]:
    counts = dict.fromkeys(TARGET_KINDS, 0)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == ops.DOMAIN:
            for kind in _bct_kinds(node):
                counts[kind] += 1
    return counts


def target_kind_shares(original: ir.Model, compressed: ir.Model) -> dict[str, KindShare]:
    """Per target kind: float nodes before, bct-onnx nodes after, and the share compressed."""
    before = _float_counts(original)
    after = bct_counts(compressed)
    return {kind: KindShare(kind, before[kind], after[kind]) for kind in TARGET_KINDS}


def format_shares(rows: dict[str, dict[str, KindShare]]) -> str:
    """A markdown table: one row per model, one column per kind ("compressed/original")."""
    lines = ["| model | " + " | ".join(TARGET_KINDS) + " |", "|---" * (len(TARGET_KINDS) + 1) + "|"]
    for name, shares in rows.items():
        cells = []
        for kind in TARGET_KINDS:
            s = shares[kind]
            cells.append(
                "-" if s.original == 0 else f"{s.compressed}/{s.original} ({100 * (s.share or 0):.0f}%)"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shares_for_files(paths: dict[str, str], config: object | None = None) -> dict[str, dict[str, KindShare]]:
    """Compress each .onnx file (name -> path) with config (default: everything) and return its shares.

    The README's family x op-kind table: ``format_shares(shares_for_files({...}))``.
    """
    from bct_onnx.passes.pipeline import compress_model

    from bct_onnx.config import CompressConfig

    cfg = config if isinstance(config, CompressConfig) else CompressConfig()
    rows: dict[str, dict[str, KindShare]] = {}
    for name, path in paths.items():
        model = ir.load(path)
        rows[name] = target_kind_shares(model, compress_model(model, cfg).model)
    return rows
