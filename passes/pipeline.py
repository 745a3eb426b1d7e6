"""compress_model: canonicalize -> quantize passes chosen by the config -> cleanup, with a report.

The input model is never changed: the pipeline works on a clone (tensors are shared, not copied,
so lazily loaded external data stays on disk until a pass needs it). Debug mode, in MLIR's
spirit: with ``debug_dir`` (or env ``BCT_ONNX_DEBUG_DIR``) the model is saved after every pass
that changed it, and the input of a pass that raised is saved so the failure is reproducible
from one file.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from bct_onnx.passes.check_model import CheckModelPass
from bct_onnx.passes.compress_intermediates import (
    ActivationSummary,
    CompressIntermediatesPass,
    compressed_activations,
)
from bct_onnx.passes.compress_kv_cache import CompressKVCachePass
from bct_onnx.passes.convert_to_qdq import ConvertToQDQPass
from bct_onnx.passes.entropy_code_weights import EntropyCodeWeightsPass
from bct_onnx.passes.fold_constant_weights import FoldConstantWeightsPass
from bct_onnx.passes.fold_shape_arithmetic import FoldShapeArithmeticPass
from bct_onnx.passes.framework import NODE_PROGRESS, CompressPassResult, Skip, check_model_basics
from bct_onnx.passes.fuse_add_norm import FuseAddNormPass
from bct_onnx.passes.fuse_attention import FuseAttentionPass
from bct_onnx.passes.fuse_attention_step import FuseAttentionStepPass
from bct_onnx.passes.fuse_gelu import FuseGeluPass
from bct_onnx.passes.fuse_layer_norm import FuseLayerNormPass
from bct_onnx.passes.fuse_matmul_epilogue import FuseMatMulEpiloguePass
from bct_onnx.passes.fuse_rms_norm import FuseRMSNormPass
from bct_onnx.passes.fuse_silu import FuseSiluPass
from bct_onnx.passes.gemm_to_matmul import GemmToMatMulPass
from bct_onnx.passes.infer_shapes import annotate_shapes
from bct_onnx.passes.operand_ops import OperandRewritePass
from bct_onnx.passes.pack_shared_input_matmuls import PackSharedInputMatMulsPass
from bct_onnx.passes.quantize_act_matmul import QuantizeActMatMulPass
from bct_onnx.passes.quantize_fused_ops import QuantizeFusedOpsPass
from bct_onnx.passes.quantize_gather import QuantizeGatherPass
from bct_onnx.passes.quantize_gelu import QuantizeGeluPass
from bct_onnx.passes.quantize_layer_norm import QuantizeLayerNormPass
from bct_onnx.passes.quantize_matmul import QuantizeMatMulPass
from bct_onnx.passes.quantize_silu import QuantizeSiluPass
from bct_onnx.passes.quantize_softmax import QuantizeSoftmaxPass
from bct_onnx.passes.remove_broadcast_expands import RemoveBroadcastExpandsPass
from bct_onnx.passes.remove_noop_casts import RemoveNoOpCastsPass
from bct_onnx.passes.rotate_residual_stream import RotateResidualStreamPass
from onnx_ir.passes import common as common_passes

from bct_onnx import ops
from bct_onnx.calibration import (
    DEFAULT_DAMPING,
    Calibration,
    HessianStore,
    MatMulKey,
    collect_hessians,
    constant_weight_matmuls,
)
from bct_onnx.channel_importance import ImportanceCalibration, collect_channel_importance
from bct_onnx.config import ACTIVATION_OPS, CompressConfig

logger = logging.getLogger(__name__)

DEBUG_DIR_ENV = "BCT_ONNX_DEBUG_DIR"
# Debug snapshots larger than this keep their tensors in a side file (protobuf's 2 GB limit).
_EXTERNAL_DATA_BYTES = 1 << 30

# The pass order, stated here only (docs/passes.md shows it; tests/passes/test_pipeline.py pins it):
# canonicalize_passes() (Constant nodes lifted to initializers, constant weight chains folded,
# Gemm -> MatMul, shape arithmetic folded), then per op kind in this dict's order its fusions
# (FUSION_PASSES) and its quantize pass, each only when config enables the kind, then
# CompressIntermediatesPass when an activation kind is enabled, then cleanup. Why this order:
# - FoldShapeArithmeticPass is the last canonicalize pass and runs before calibration: the
#   calibration run and every quantize pass see the lean graph (a with-past decoder's per-layer
#   shape arithmetic collapses to one copy: SmolLM2 compresses to 1,700 nodes instead of 6,692).
# - MatMul before Gather: a table tied to the output projection is quantized (GPTQ-rounded when
#   calibrated) for the MatMul in the Gather's layout, and the embedding Gather reuses those codes.
# - QuantizeFusedOpsPass follows the weight passes: the weights ONNX Runtime's fused ops hold
#   (Attention's QKV, EmbedLayerNormalization's word table) in a graph its transformer optimizer
#   already fused; it only runs where those com.microsoft nodes exist.
# - QuantizeMatMulPass reports attention's activation x activation MatMuls as skipped;
#   QuantizeActMatMulPass then rewrites them, and compress_model drops the skips of nodes a later
#   pass rewrote.
# - FuseAttentionPass runs before QuantizeActMatMulPass and QuantizeSoftmaxPass, on the float
#   MatMul -> scale/mask -> Softmax -> MatMul chain; it takes Q x K^T's AttentionMatMul settings
#   (config.fuse_attention=False leaves the chain to those two passes).
# - The weight passes come first, so the weight-only pass list is a prefix of the full one; the
#   fusions of the activation kinds then see BlockMatMul results, which they do not mind.
# - With config.fuse_ops, FuseMatMulEpiloguePass runs before CompressIntermediatesPass (it folds a
#   GELU / SiLU gating into the MatMul while the edge is float, so the fused result then gets the
#   next MatMul's codes) and FuseAddNormPass after it (the norm's result format, chosen for the
#   MatMuls reading it, is kept; the Add's operands stay float32).
# - CompressKVCachePass (config.kv_cache_bits) runs after CompressIntermediatesPass: it changes graph
#   inputs and outputs only, and its BlockDequantize hands attention the float cache the passes
#   before it saw.
# - FuseAttentionStepPass comes last: it folds the cache append (CompressKVCachePass's BlockQuantize
#   and Concats, or a float cache's Concat), rotary and the head split / merge into BlockAttention.
# - PackSharedInputMatMulsPass (config.fuse_ops) after every attention fusion and format choice: it
#   packs the Q, K (and V) BlockMatMuls of an encoder's BlockAttention into one, which the op reads in
#   place; the MatMuls' attributes (formats, codes in and out) must be final to be compared.
# - RemoveBroadcastExpandsPass after the attention fusions: BlockAttention broadcasts its mask, so an
#   encoder's mask is no longer expanded to [B, 1, S, S] (exported shapes do not prove it for the Add
#   the op replaced).
# - RemoveNoOpCastsPass before cleanup: Casts to their input's own dtype (RMSNorm's .to(float32)),
#   once the passes have given every value its dtype.
QUANTIZE_PASSES: dict[str, Callable[[CompressConfig], ir.passes.PassBase]] = {
    "MatMul": QuantizeMatMulPass,
    "Gather": QuantizeGatherPass,
    "AttentionMatMul": QuantizeActMatMulPass,
    "Gelu": QuantizeGeluPass,
    "Silu": QuantizeSiluPass,
    "Softmax": QuantizeSoftmaxPass,
    "LayerNormalization": QuantizeLayerNormPass,
}
# Fusions that turn an exporter's decomposition into the node the op kind's quantize pass handles;
# they run only when that kind is compressed.
FUSION_PASSES: dict[str, list[type[ir.passes.PassBase]]] = {
    "AttentionMatMul": [FuseAttentionPass],
    "Gelu": [FuseGeluPass],
    "Silu": [FuseSiluPass],
    "LayerNormalization": [FuseLayerNormPass, FuseRMSNormPass],
}

ProgressCallback = Callable[[str, int, int], None]
"""progress(pass_name, passes_done, passes_total), called after each pass."""

NodeProgressCallback = Callable[[str, int, int], None]
"""node_progress(pass_name, candidates_done, candidates_total), called inside a node-rewrite pass
before each candidate node (per MatMul while GPTQ rounds them)."""


# The name under which the pipeline's per-pass records time the calibration Hessians' collection.
CALIBRATION_RECORD = "CollectHessians (calibration)"


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass of the pipeline did."""

    name: str
    modified: bool
    seconds: float
    rewritten: dict[str, int]
    skipped: int


@dataclasses.dataclass
class PipelineResult:
    """The compressed model and the summed report of every pass."""

    model: ir.Model
    modified: bool
    rewritten: dict[str, int]
    skipped: list[Skip]
    passes: list[PassRecord]
    warnings: list[str] = dataclasses.field(default_factory=list)
    activations: ActivationSummary | None = None  # intermediates that stay compressed

    def summary(self) -> str:
        """Human-readable report: counts per rule, then every skip with its reason."""
        lines = [f"modified: {self.modified}"] + [f"warning: {text}" for text in self.warnings]
        lines += [f"  {rule}: {count}" for rule, count in sorted(self.rewritten.items())]
        if self.activations is not None:
            lines.append(self.activations.describe())
        lines.append(f"skipped: {len(self.skipped)}")
        lines += [f"  {skip}" for skip in self.skipped]
        return "\n".join(lines)


def canonicalize_passes(config: CompressConfig | None = None) -> list[ir.passes.PassBase]:
    """The passes that bring an exporter's graph into the form the quantize passes match (order:
    the comment above QUANTIZE_PASSES).

    With config.rotation, a pre-RMSNorm residual stream is also rotated here, so that calibration
    statistics are measured on the weights the quantize passes will see.
    """
    passes: list[ir.passes.PassBase] = [
        common_passes.LiftConstantsToInitializersPass(),
        FoldConstantWeightsPass(),
        GemmToMatMulPass(),
        FoldShapeArithmeticPass(),
    ]
    if config is not None and config.rotation:
        # The rotation folds RMSNorm scales, so it needs the norms fused first.
        passes += [FuseRMSNormPass(), RotateResidualStreamPass()]
    return passes


def canonicalization_keeps_values(config: CompressConfig) -> bool:
    """Whether every value that canonicalize_passes(config) keeps holds what it held before (no rotation
    of the residual stream): statistics measured on the input model then hold for its canonical form."""
    return not config.rotation


def start_hessians(
    model: ir.Model, config: CompressConfig, calibration: Calibration | None, model_file: str | os.PathLike[str]
) -> HessianStore | None:
    """Start measuring GPTQ's Hessians on model as loaded from model_file (unchanged since), in the
    background, before compress_model canonicalizes it; None when compress_model would not use them.

    The float model's forward is most of a calibrated compile: started here, it runs while the input
    is canonicalized, and its weights are mapped from the input file instead of a saved copy. Hand the
    store to compress_model (hessians=), which closes it.
    """
    if calibration is None or isinstance(calibration, ImportanceCalibration) or not config.enabled("MatMul"):
        return None
    if not canonicalization_keeps_values(config):
        return None
    return collect_hessians(model, calibration, background=True, model_file=model_file)


def rewrite_passes(
    config: CompressConfig,
    hessians: Mapping[MatMulKey, np.ndarray] | None = None,
    damping: float = DEFAULT_DAMPING,
    importances: Mapping[MatMulKey, np.ndarray] | None = None,
) -> list[ir.passes.PassBase]:
    """The quantize passes config enables (each after its fusions), then cleanup (order: see QUANTIZE_PASSES).

    hessians (calibration statistics of the canonicalized model, from collect_hessians) make
    QuantizeMatMulPass round those weights with GPTQ, at that damping; importances (per-channel
    mean squares, from collect_channel_importance) weigh its scale search instead.
    """
    quantize: list[ir.passes.PassBase] = []
    for op_type, factory in QUANTIZE_PASSES.items():
        if op_type in FUSION_PASSES and config.enabled(op_type):
            for fusion in FUSION_PASSES[op_type]:
                if issubclass(fusion, OperandRewritePass):  # configured per node
                    if fusion is not FuseAttentionPass or config.fuse_attention:
                        quantize.append(fusion(config))  # type: ignore[call-arg]
                else:
                    quantize.append(fusion())
        if config.enabled(op_type):
            if op_type == "MatMul" and (hessians is not None or importances is not None):
                quantize.append(QuantizeMatMulPass(config, hessians, damping, importances))
            else:
                quantize.append(factory(config))
        if op_type == "Gather" and config.format == "bct" and (config.enabled("MatMul") or config.enabled("Gather")):
            quantize.append(QuantizeFusedOpsPass(config))
    if any(config.enabled(kind) for kind in ACTIVATION_OPS):
        if config.fuse_ops and config.format == "bct":
            quantize.append(FuseMatMulEpiloguePass())
        quantize.append(CompressIntermediatesPass(config))
        if config.fuse_ops and config.format == "bct":
            quantize.append(FuseAddNormPass())
    if config.compresses_kv_cache:
        quantize.append(CompressKVCachePass(config))
    if config.fuse_attention and config.enabled("AttentionMatMul") and config.format == "bct":
        quantize.append(FuseAttentionStepPass())
        if config.fuse_ops:
            quantize.append(PackSharedInputMatMulsPass())
    quantize.append(RemoveBroadcastExpandsPass())
    quantize.append(RemoveNoOpCastsPass())
    if config.format == "qdq":
        quantize.append(ConvertToQDQPass(activations=config.qdq_activations))
    if config.entropy_code:
        quantize.append(EntropyCodeWeightsPass())
    cleanup: list[ir.passes.PassBase] = [
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.TopologicalSortPass(),
        CheckModelPass(),
    ]
    return quantize + cleanup


def build_passes(
    config: CompressConfig, hessians: Mapping[MatMulKey, np.ndarray] | None = None
) -> list[ir.passes.PassBase]:
    """The pass list compress_model runs for config: canonicalize, quantize, cleanup."""
    return canonicalize_passes(config) + rewrite_passes(config, hessians)


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


# Debug snapshots without weights keep tensors up to this size (shapes, axes, small constants) and
# store larger ones as references to this file, which is never written: the graph stays readable
# (Netron, onnx.load(..., load_external_data=False)) and a snapshot of a 5 GB model costs kilobytes.
OMITTED_WEIGHTS_FILE = "weights-omitted.bin"
SNAPSHOT_KEEP_BYTES = 1024


def save_snapshot(model: ir.Model, path: Path, weights: bool = True) -> Path:
    """Save model to path, with its own side file when large or when it reads external data.

    External tensors refer to a file next to the source model; a copy saved elsewhere must carry
    its own side file, or its references would dangle. weights=False: tensors over
    SNAPSHOT_KEEP_BYTES are written as references to OMITTED_WEIGHTS_FILE, which does not exist.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not weights:
        model = without_weights(model)
        ir.save(model, path)
        return path
    reads_external = any(
        isinstance(value.const_value, ir.ExternalTensor) for value in model.graph.initializers.values()
    )
    if reads_external or _initializer_bytes(model) > _EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=f"{path.name}.data")
    else:
        ir.save(model, path)
    return path


def without_weights(model: ir.Model) -> ir.Model:
    """A copy of model whose large initializers point at OMITTED_WEIGHTS_FILE instead of holding data."""
    copy = model.clone()
    for name, value in copy.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= SNAPSHOT_KEEP_BYTES:
            continue
        value.const_value = ir.ExternalTensor(
            OMITTED_WEIGHTS_FILE, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name, base_dir=""
        )
    return copy


def compress_model(
    model: ir.Model,
    config: CompressConfig,
    progress: ProgressCallback | None = None,
    debug_dir: str | os.PathLike[str] | None = None,
    calibration: Calibration | None = None,
    node_progress: NodeProgressCallback | None = None,
    debug_weights: bool = False,
    hessians: HessianStore | None = None,
) -> PipelineResult:
    """Compress a copy of model per config; the input model is left untouched.

    hessians: calibration's Hessians already being measured on model (start_hessians); they are used
    when they fit its canonical form (measured again otherwise). The store is closed at the end.

    Raises an UnsupportedModelError (an onnx_ir PreconditionError) naming the problem when the
    model cannot be handled (no graph, ONNX opset too old, conflicting ai.bct_onnx version).
    """
    try:
        return _compress_model(model, config, progress, debug_dir, calibration, node_progress, debug_weights, hessians)
    finally:
        if hessians is not None:
            hessians.close()


def _compress_model(
    model: ir.Model,
    config: CompressConfig,
    progress: ProgressCallback | None,
    debug_dir: str | os.PathLike[str] | None,
    calibration: Calibration | None,
    node_progress: NodeProgressCallback | None,
    debug_weights: bool,
    early_hessians: HessianStore | None,
) -> PipelineResult:
    check_model_basics(model, "compress_model")
    if debug_dir is None:
        debug_dir = os.environ.get(DEBUG_DIR_ENV) or None
    debug_path = Path(debug_dir) if debug_dir is not None else None
    work = model.clone()  # quantize passes import the ai.bct_onnx domain when they emit a node
    canonical = canonicalize_passes(config)
    total = len(canonical) + len(rewrite_passes(config))
    if any(config.enabled(kind) for kind in ACTIVATION_OPS):
        annotate_shapes(work)  # in value.meta only: the model is not changed
    rewritten: dict[str, int] = {}
    skipped: list[Skip] = []
    records: list[PassRecord] = []
    warnings: list[str] = []

    def run(pass_: ir.passes.PassBase, index: int, work: ir.Model) -> ir.Model:
        name = type(pass_).__name__
        snapshot = work.clone() if debug_path is not None else None
        start = time.perf_counter()
        hook = NODE_PROGRESS.set(functools.partial(node_progress, name) if node_progress is not None else None)
        try:
            result = pass_(work)
        except onnx.checker.ValidationError as error:
            if not isinstance(pass_, CheckModelPass) or not _fails_check(model):
                raise
            # The exporter's model was already invalid (e.g. torch's Split with num_outputs at
            # opset 17, which ONNX Runtime accepts): report it, do not blame the passes.
            message = f"the input model already fails the ONNX checker; output not checked: {error}"
            logger.warning(message)
            warnings.append(message)
            result = ir.passes.PassResult(work, False)
        except Exception as error:
            if snapshot is not None and debug_path is not None:
                saved = save_snapshot(snapshot, debug_path / f"{index:02d}_{name}.input.onnx")
                logger.error("%s failed; its input model is saved at %s", name, saved)
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note(f"bct-onnx debug: the input of {name} is saved at {saved}")
            raise
        finally:
            NODE_PROGRESS.reset(hook)
        seconds = time.perf_counter() - start
        pass_rewritten: dict[str, int] = {}
        pass_skipped: list[Skip] = []
        if isinstance(result, CompressPassResult):
            pass_rewritten, pass_skipped = result.rewritten, result.skipped
        for rule, count in pass_rewritten.items():
            rewritten[rule] = rewritten.get(rule, 0) + count
        skipped.extend(pass_skipped)
        records.append(PassRecord(name, result.modified, seconds, dict(pass_rewritten), len(pass_skipped)))
        logger.info("%s: modified=%s in %.3f s %s", name, result.modified, seconds, pass_rewritten or "")
        if debug_path is not None and result.modified:
            save_snapshot(result.model, debug_path / f"{index:02d}_{name}.onnx", weights=debug_weights)
        if progress is not None:
            progress(name, index, total)
        return result.model

    for index, pass_ in enumerate(canonical, start=1):
        work = run(pass_, index, work)
    # Calibration statistics are measured here, on the canonicalized model whose MatMuls the
    # quantize pass sees, and handed to it: passes run no inference. Hessians already being measured
    # on the input model (start_hessians) are of the same values when canonicalization kept them.
    hessians = importances = None
    calibration_index = len(records)
    if calibration is not None and config.enabled("MatMul"):
        start = time.perf_counter()
        if isinstance(calibration, ImportanceCalibration):
            importances = collect_channel_importance(work, calibration)
            # Not a pass, but often the longest step before GPTQ: the report times it like one.
            records.append(PassRecord(CALIBRATION_RECORD, False, time.perf_counter() - start, {}, 0))
        else:
            if early_hessians is not None:
                reason = (
                    early_hessians.retarget(constant_weight_matmuls(work))
                    if canonicalization_keeps_values(config)
                    else "the canonical passes change values (rotation)"
                )
                if reason is None:
                    hessians = early_hessians
                else:
                    logger.info("Hessians of the input model do not fit its canonical form (%s): measured again", reason)
                    early_hessians.close()
            # In the background: GPTQ rounds each weight as soon as its Hessian is measured, while
            # the float model runs the later layers (the two share the machine's cores).
            if hessians is None:
                hessians = collect_hessians(work, calibration, background=True)
    damping = calibration.damping if calibration is not None else DEFAULT_DAMPING
    try:
        for index, pass_ in enumerate(rewrite_passes(config, hessians, damping, importances), start=len(canonical) + 1):
            work = run(pass_, index, work)
        if hessians is not None:  # its wall time, overlapping QuantizeMatMulPass's
            records.insert(calibration_index, PassRecord(CALIBRATION_RECORD, False, hessians.wait(), {}, 0))
    finally:
        if hessians is not None and hessians is not early_hessians:
            hessians.close()  # its files on disk (compress_model closes the early store)
    modified = any(record.modified for record in records)
    skipped = _drop_rewritten_later(skipped, work)
    return PipelineResult(work, modified, rewritten, skipped, records, warnings, compressed_activations(work))


def _drop_rewritten_later(skipped: list[Skip], model: ir.Model) -> list[Skip]:
    """One reason per node (the first pass's), none for nodes a later pass rewrote (attention MatMuls)."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    seen = {
        (node.name, "MatMul")
        for node in nodes
        if node.domain == ops.DOMAIN and node.op_type == ops.BLOCK_ACT_MATMUL and node.name
    }
    # MatMuls fused away by a later pass (FuseAttentionPass: Q x K^T and P x V into BlockAttention).
    float_matmuls = {node.name for node in nodes if node.op_type == "MatMul" and node.domain in ("", "ai.onnx")}
    fused = any(node.domain == ops.DOMAIN and node.op_type == ops.BLOCK_ATTENTION for node in nodes)
    kept = []
    for skip in skipped:
        gone = fused and skip.op_type == "MatMul" and skip.node not in float_matmuls and "at run time" in skip.reason
        if (skip.node, skip.op_type) not in seen and not gone:
            kept.append(skip)
            seen.add((skip.node, skip.op_type))
    return kept


def _fails_check(model: ir.Model) -> bool:
    try:
        CheckModelPass()(model)
    except onnx.checker.ValidationError:
        return True
    return False
