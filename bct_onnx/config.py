"""What to compress and how: one frozen, validated configuration shared by the API, CLI and passes."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping

from bct_onnx.block_format import (
    MAX_BITS,
    MIN_BITS,
    RUNTIME_SCALE_KINDS,
    BlockFormat,
    ScaleKind,
    ZeroPointKind,
)

# Op kinds that have a quantize pass. "LayerNormalization" covers RMS normalization too;
# "AttentionMatMul" is a MatMul of two run-time activations (Q x K^T, probabilities x V); "Silu" is
# x * sigmoid(x) (Llama's MLP activation, exported as Sigmoid * Mul).
WEIGHT_OPS: frozenset[str] = frozenset({"MatMul", "Gather"})
ACTIVATION_OPS: frozenset[str] = frozenset(
    {"Gelu", "Silu", "Softmax", "LayerNormalization", "AttentionMatMul"}
)
SUPPORTED_OPS: frozenset[str] = WEIGHT_OPS | ACTIVATION_OPS
DEFAULT_OPS: frozenset[str] = SUPPORTED_OPS  # everything by default
# The generic default budget (None: fixed widths). Encoders get an 8x budget by default through
# bct_onnx/model_defaults.py, the one place where model kinds differ.
DEFAULT_TARGET_RATIO: float | None = None
# Defaults by kind of model, applied by bct_onnx.model_defaults.apply_decoder_plan (which decides the kind from the graph: a
# decoder has an output over its vocabulary) to fields still at the class defaults below, unless
# kind_defaults is off or a budget chooses the bits. Encoders: the class defaults as they are.
# Decoders (SmolLM2-135M, docs/results.md "decoder defaults"): one-byte float8e5m2 weight scales pay
# for one more bit on the embedding table tied to the output projection, which carries most of the
# 4-bit loss, and the value projections: about 7.1x, where 4-bit with float16 scales is 7.0x.
DECODER_SCALE_KIND = ScaleKind.FLOAT8E5M2
# The weight scales of a decoder whose MatMul weights GPTQ rounds (calibration "gptq": a tokenizer was
# found or given, or the caller's inputs): float8e4m3 with one float32 factor per tensor, at the same
# size (3 mantissa bits: finer scales that GPTQ's error feedback uses; plain rounding does better
# with float8e5m2, docs/results.md "SmolLM2 calibrated fidelity ... (session 11)").
DECODER_GPTQ_SCALE_KIND = ScaleKind.FLOAT8E4M3
DECODER_TIED_TABLE_EXTRA_BITS = 1
# The tied table's zero points below 8 bits: integer zero points packed at the code width (asymmetric
# blocks; a 5-bit table costs 5.41 bits a value instead of 5.25), or None for symmetric blocks.
DECODER_TIED_TABLE_ZERO_POINTS: ZeroPointKind | None = ZeroPointKind.PACKED
# (node-name regex, extra bits): Llama-style value projections (optimum names them .../v_proj/MatMul)
DECODER_WIDER_WEIGHTS: tuple[tuple[str, int], ...] = ((r"/v_proj/", 2),)
# The tied table's block size (None: the config's), and node-name regexes of weights stored asymmetric
# with packed integer zero points at their width (none by default).
DECODER_TIED_TABLE_BLOCK_SIZE: int | None = None
DECODER_ASYMMETRIC_WEIGHTS: tuple[str, ...] = ()
SETTING_KEYS = ("enabled", "weight_bits", "act_bits", "block_size")
# Output formats: "bct" (the ai.bct_onnx custom ops; needs the library at run time) or "qdq"
# (standard ONNX: blocked DequantizeLinear feeding MatMul / Gather; runs in any ONNX runtime).
OUTPUT_FORMATS = ("bct", "qdq")
QDQ_OPS: frozenset[str] = WEIGHT_OPS  # the op kinds standard ONNX can hold compressed


def _check_bits(field: str, value: object, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{field} must be an integer in [{MIN_BITS}, {MAX_BITS}]{extra}, got {value!r}")


def _check_block_size(field: str, value: object, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OpSettings:
    """Settings of one op kind or one override; None leaves the value to the level below.

    enabled: compress it or not. weight_bits: code width of MatMul weights / Gather tables.
    act_bits: MatMul: activations quantized at run time; Gelu/Silu/Softmax/LayerNormalization: width of
    their compressed operand/result when it stays compressed; AttentionMatMul: its act_bits.
    block_size: elements per block of the weights and activations concerned.
    symmetric, zero_points: of the weights / tables concerned (programmatic; the decoder plan stores
    its tied table with packed integer zero points).
    """

    enabled: bool | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    zero_points: ZeroPointKind | None = None

    def __post_init__(self) -> None:
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be true or false, got {self.enabled!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.zero_points is not None:
            object.__setattr__(self, "zero_points", ZeroPointKind(self.zero_points))
        _check_bits("weight_bits", self.weight_bits, allow_none=True)
        _check_bits("act_bits", self.act_bits, allow_none=True)
        _check_block_size("block_size", self.block_size, allow_none=True)


@dataclasses.dataclass(frozen=True)
class NodeOverride:
    """Settings for the nodes whose name matches ``pattern`` (a glob; ``re:`` starts a regex).

    ``op`` restricts it to one op kind. Overrides apply in order; a later one wins.
    ``act_bits_none``: weight-only (no run-time activation quantization) for the matched nodes.
    """

    pattern: str
    settings: OpSettings
    op: str | None = None
    act_bits_none: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"override pattern must be a non-empty string, got {self.pattern!r}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as error:
                raise ValueError(f"override pattern {self.pattern!r} is not a valid regex: {error}") from None
        if self.op is not None and self.op not in SUPPORTED_OPS:
            raise ValueError(f"override op must be one of {sorted(SUPPORTED_OPS)}, got {self.op!r}")

    def matches(self, kind: str, node_name: str) -> bool:
        if self.op is not None and self.op != kind:
            return False
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], node_name) is not None
        return fnmatch.fnmatchcase(node_name, self.pattern)


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    """The settings that apply to one node (config, then its op kind, then matching overrides)."""

    enabled: bool
    weight_bits: int
    act_bits: int | None
    block_size: int
    symmetric: bool
    scale_kind: ScaleKind
    zero_points: ZeroPointKind = ZeroPointKind.INTEGER  # asymmetric weights and tables

    @property
    def weight_format(self) -> BlockFormat:
        return BlockFormat(
            self.weight_bits, self.block_size, self.symmetric, self.scale_kind, self.zero_points
        )

    def act_format(self, symmetric: bool) -> BlockFormat | None:
        """Format of a compressed activation of this node (None: stays float)."""
        if self.act_bits is None:
            return None
        # Kernels choose activation scales at run time; float8e5m2 and float8e4m3 are for weights and
        # tables only, so activations of such a config keep float16 scales.
        kind = self.scale_kind if self.scale_kind in RUNTIME_SCALE_KINDS else ScaleKind.FLOAT16
        return BlockFormat(self.act_bits, self.block_size, symmetric, kind)


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """Compression settings.

    weight_bits: code width of MatMul weights (2..8).
    act_bits: code width of activations quantized at run time inside BlockMatMul; None = weight-only.
    block_size: consecutive elements sharing one scale (weights: along K; tables: along D).
    ops: ONNX op types to compress (subset of SUPPORTED_OPS).
    symmetric: implicit zero point for weights and tables (no zero-point tensors stored).
    zero_points: what asymmetric (symmetric=False) weights and tables store per block: "integer"
        (uint8 zero point, value (u - zp) * scale), "packed" (the same integer zero points stored at
        the code width, packed like codes: 4-bit, two a byte) or "float" (float16 offset, float32
        with float32 scales: value u * scale + offset, the block minimum, as GGUF's Q4_1 / AWQ /
        MatMulNBits). "integer" costs 8 bits a block, "packed" `bits` bits; "float" costs 8 more
        bits a block than "integer" (16 with float32 scales) and needs symmetric=False.
    scale_kind: how block scales are stored (float16, float32, pow2, float8e5m2, float8e4m3; the
        float8 kinds are for weights and tables: activations quantized at run time then keep float16
        scales; float8e4m3 adds one float32 factor per tensor, docs/block_format.md). float8e5m2
        costs one byte a block (4-bit codes in blocks of 32: 4.25 bits a value, not 4.5); under a
        budget the bytes it saves buy more bits where they matter (docs/results.md).
    embedding_bits: code width of Gather tables; None = weight_bits.
    embedding_scale_kind: how Gather tables store block scales (default float8e5m2: one byte per
        block, four steps per octave; docs/results.md compares the kinds); None = scale_kind. A table
        tied to an output projection is stored once, in the MatMul's scale kind.
    weight_scale_search: per block, choose the clipped scale with least squared weight error
        instead of the plain max-based scale (offline only; the stored format is unchanged).
    rotation: rotate a pre-RMSNorm decoder's residual stream by a randomized Hadamard matrix folded
        into the weights on both sides (passes/rotate_residual_stream.py; other models are left alone).
        Off by default: on SmolLM2-135M, whose float weights are dequantized from a 4-bit GGUF grid
        that the rotation mixes away, it costs more than it gains (docs/results.md).
    fuse_attention: rewrite attention (Q x K^T -> scale / mask -> Softmax -> x V) into one
        BlockAttention op with Q x K^T's AttentionMatMul settings (passes/fuse_attention.py); False
        leaves it to BlockActMatMul + BlockSoftmax.
    op_settings: per op kind (a key of SUPPORTED_OPS) OpSettings over the fields above.
    overrides: NodeOverride by node-name pattern, applied in order after op_settings.
    keep_compressed: let intermediate results between compressed ops stay compressed.
    fuse_ops: fuse a MatMul with the GELU or SiLU gating after it (BlockMatMul's epilogue) and a
        residual Add with the norm after it (BlockAddLayerNorm / BlockAddRMSNorm): bit-exact to the
        unfused ops on float edges, fewer nodes and passes over memory (docs/passes.md).
    target_ratio: a budget instead of bit widths (bct_onnx.budget): bct_onnx.compress chooses bits
        (3..8) and block size (block_size or twice it) per MatMul weight and table from each tensor's
        measured sensitivity so that the whole file is at least this many times smaller. weight_bits
        and embedding_bits then apply only to tensors that op_settings or overrides pin. None: the
        bit widths above, as given.
    max_error: a budget by quality: the fewest bytes whose predicted relative output MSE
        (|y' - y|^2 / |y|^2 of the model's first float output, on calibration or synthetic inputs) is
        at most this; with target_ratio too, within that size.
    budget_floor: a target_ratio plan may not predict a larger output error than the fixed widths
        (weight_bits / embedding_bits everywhere) would; when it does, the plan is instead the fewest
        bytes that predict no more error than they do (a guard; the proxy can miss, see
        docs/results.md on SmolLM2). Giving target_ratio explicitly switches it off
        (bct_onnx.compress, the CLI, config files).
    format: "bct" (custom ops, default) or "qdq": standard ONNX that runs without the library,
        weights and tables as blocked DequantizeLinear (opset 21, 25 for 2-bit); only MatMul and
        Gather are compressed (the other kinds have no standard blockwise form and stay float),
        and run-time activation quantization is left out (the report says so) unless
        ``qdq_activations``.
    kind_defaults: let the kind of model adjust fields still at their defaults (DECODER_* above:
        decoders get one-byte weight scales, float8e4m3 under GPTQ and float8e5m2 otherwise, and a
        wider tied table); off: the fields as they are.
    qdq_activations: with format "qdq", write the run-time blockwise activation quantization too, as
        scales computed in the graph + QuantizeLinear/DequantizeLinear (bit for bit the custom ops'
        activations, but runtimes execute it in float: slower than float activations).
    entropy_code: store every MatMul weight's and table's codes entropy-coded (canonical Huffman per
        tensor, bct_onnx/code_entropy.py, docs/block_format.md) where that is smaller: lossless, the
        kernels decode them once at session creation into the layout they read. Format "bct" only.
    explicit_fields: the fields the caller named (bct_onnx.compress keywords, CLI flags, config-file
        keys; set by make_config). bct_onnx.compress fills the others from the model kind's defaults
        (bct_onnx/model_defaults.py: encoders get an 8x budget with float8e5m2 scales). None (a
        config built directly): used exactly as given. Not part of equality or the report.
    kv_cache_bits: a decoder export's KV cache (past_key_values.* / present.*) crosses steps as
        symmetric codes of this width (2..8) with float16 scales, blocks along head_dim
        (docs/kv_cache.md); None keeps it float. Format "bct" only.
    kv_cache_block_size: head_dim elements per block of the KV cache.
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    block_size: int = 32
    ops: frozenset[str] = DEFAULT_OPS
    symmetric: bool = True
    zero_points: ZeroPointKind = ZeroPointKind.INTEGER
    scale_kind: ScaleKind = ScaleKind.FLOAT16
    embedding_bits: int | None = None
    embedding_scale_kind: ScaleKind | None = ScaleKind.FLOAT8E5M2
    weight_scale_search: bool = True
    rotation: bool = False
    fuse_attention: bool = True
    op_settings: Mapping[str, OpSettings] = dataclasses.field(default_factory=dict)
    overrides: tuple[NodeOverride, ...] = ()
    keep_compressed: bool = True
    fuse_ops: bool = True
    target_ratio: float | None = DEFAULT_TARGET_RATIO
    max_error: float | None = None
    budget_floor: bool = True
    format: str = "bct"
    qdq_activations: bool = False
    entropy_code: bool = False
    explicit_fields: frozenset[str] | None = dataclasses.field(
        default=None, compare=False, repr=False, metadata={"report": False}
    )
    kv_cache_bits: int | None = 8
    kv_cache_block_size: int = 32
    kind_defaults: bool = True

    def __post_init__(self) -> None:
        if self.explicit_fields is not None:
            names = frozenset(self.explicit_fields)
            unknown = sorted(names - {f.name for f in dataclasses.fields(self)})
            if unknown:
                raise ValueError(f"explicit_fields names unknown config fields: {unknown}")
            object.__setattr__(self, "explicit_fields", names)
        if not isinstance(self.qdq_activations, bool):
            raise ValueError(f"qdq_activations must be a bool, got {self.qdq_activations!r}")  # noqa: TRY004
        if self.qdq_activations and self.format != "qdq":
            raise ValueError("qdq_activations applies to format 'qdq' only (--format qdq)")
        if not isinstance(self.entropy_code, bool):
            raise ValueError(f"entropy_code must be a bool, got {self.entropy_code!r}")  # noqa: TRY004
        if self.entropy_code and self.format != "bct":
            raise ValueError("entropy_code applies to format 'bct' only (standard ONNX cannot hold the coded codes)")
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.format!r}")
        _check_bits("weight_bits", self.weight_bits, allow_none=False)
        _check_bits("act_bits", self.act_bits, allow_none=True)
        _check_bits("embedding_bits", self.embedding_bits, allow_none=True)
        _check_bits("kv_cache_bits", self.kv_cache_bits, allow_none=True)
        _check_block_size("kv_cache_block_size", self.kv_cache_block_size, allow_none=False)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")  # noqa: TRY004 (field error)
        if not isinstance(self.weight_scale_search, bool):
            raise ValueError(  # noqa: TRY004 (one exception type for every bad field)
                f"weight_scale_search must be a bool, got {self.weight_scale_search!r}"
            )
        try:
            object.__setattr__(self, "zero_points", ZeroPointKind(self.zero_points))
        except ValueError:
            kinds = ", ".join(kind.value for kind in ZeroPointKind)
            raise ValueError(f"zero_points must be one of {kinds}, got {self.zero_points!r}") from None
        if self.zero_points is ZeroPointKind.FLOAT and self.symmetric:
            raise ValueError(
                "zero_points='float' (float offsets) applies to asymmetric weights: set symmetric=False "
                "(--asymmetric, or symmetric = false in a config file)"
            )
        try:
            object.__setattr__(self, "scale_kind", ScaleKind(self.scale_kind))
        except ValueError:
            kinds = ", ".join(kind.value for kind in ScaleKind)
            raise ValueError(f"scale_kind must be one of {kinds}, got {self.scale_kind!r}") from None
        if self.embedding_scale_kind is not None:
            try:
                object.__setattr__(self, "embedding_scale_kind", ScaleKind(self.embedding_scale_kind))
            except ValueError:
                kinds = ", ".join(kind.value for kind in ScaleKind)
                raise ValueError(
                    f"embedding_scale_kind must be one of {kinds} or None, got {self.embedding_scale_kind!r}"
                ) from None
        if isinstance(self.ops, str) or not all(isinstance(op, str) for op in self.ops):
            raise ValueError(f"ops must be a collection of ONNX op type names, got {self.ops!r}")
        ops = frozenset(self.ops)
        unknown = sorted(ops - SUPPORTED_OPS)
        if unknown:
            raise ValueError(
                f"ops contains op types without a quantize pass: {unknown}; supported: {sorted(SUPPORTED_OPS)}"
            )
        object.__setattr__(self, "ops", ops)
        if not isinstance(self.op_settings, Mapping):
            raise ValueError(f"op_settings must map op kinds to OpSettings, got {self.op_settings!r}")  # noqa: TRY004
        for kind, settings in self.op_settings.items():
            if kind not in SUPPORTED_OPS:
                raise ValueError(f"op_settings has unknown op kind {kind!r}; known: {sorted(SUPPORTED_OPS)}")
            if not isinstance(settings, OpSettings):
                raise ValueError(f"op_settings[{kind!r}] must be an OpSettings, got {settings!r}")  # noqa: TRY004
        object.__setattr__(self, "op_settings", dict(self.op_settings))
        overrides = tuple(self.overrides)
        if not all(isinstance(o, NodeOverride) for o in overrides):
            raise ValueError(f"overrides must be NodeOverride objects, got {self.overrides!r}")
        object.__setattr__(self, "overrides", overrides)
        if not isinstance(self.rotation, bool):
            raise ValueError(f"rotation must be a bool, got {self.rotation!r}")  # noqa: TRY004
        if not isinstance(self.fuse_attention, bool):
            raise ValueError(f"fuse_attention must be a bool, got {self.fuse_attention!r}")  # noqa: TRY004
        if not isinstance(self.keep_compressed, bool):
            raise ValueError(f"keep_compressed must be a bool, got {self.keep_compressed!r}")  # noqa: TRY004
        if not isinstance(self.kind_defaults, bool):
            raise ValueError(f"kind_defaults must be a bool, got {self.kind_defaults!r}")  # noqa: TRY004
        if not isinstance(self.fuse_ops, bool):
            raise ValueError(f"fuse_ops must be a bool, got {self.fuse_ops!r}")  # noqa: TRY004
        if not isinstance(self.budget_floor, bool):
            raise ValueError(f"budget_floor must be a bool, got {self.budget_floor!r}")  # noqa: TRY004
        for field, low in (("target_ratio", 1.0), ("max_error", 0.0)):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"{field} must be a number > {low:g} or None, got {value!r}")
            object.__setattr__(self, field, float(value))

    @property
    def compresses_kv_cache(self) -> bool:
        """Whether a decoder's KV cache is stored as codes (format "bct" and kv_cache_bits set)."""
        return self.kv_cache_bits is not None and self.format == "bct"

    @property
    def budgeted(self) -> bool:
        """True when a budget (target_ratio or max_error) chooses the bits of weights and tables."""
        return self.target_ratio is not None or self.max_error is not None

    def __hash__(self) -> int:
        return hash((self.weight_bits, self.act_bits, self.block_size, self.ops, self.overrides))

    def enabled(self, kind: str) -> bool:
        """Whether op kind is compressed at all (some nodes may still be switched on by overrides).

        With format "qdq" only the kinds of QDQ_OPS are: the others have no standard form.
        """
        if self.format == "qdq" and kind not in QDQ_OPS:
            return False
        settings = self.op_settings.get(kind)
        on = kind in self.ops and (settings is None or settings.enabled is not False)
        return on or any(o.settings.enabled and (o.op in (None, kind)) for o in self.overrides)

    def settings_for(self, kind: str, node_name: str = "") -> NodeSettings:
        """The settings of one node of op kind ``kind``: config, then op_settings, then overrides."""
        if kind not in SUPPORTED_OPS:
            raise ValueError(f"unknown op kind {kind!r}; known: {sorted(SUPPORTED_OPS)}")
        enabled = kind in self.ops
        weight_bits = self.weight_bits
        if kind == "Gather" and self.embedding_bits is not None:
            weight_bits = self.embedding_bits
        act_bits = self.act_bits
        block_size = self.block_size
        symmetric, zero_points = self.symmetric, self.zero_points
        layers: list[tuple[OpSettings, bool]] = []
        if kind in self.op_settings:
            layers.append((self.op_settings[kind], False))
        layers += [(o.settings, o.act_bits_none) for o in self.overrides if o.matches(kind, node_name)]
        for layer, weight_only in layers:
            enabled = layer.enabled if layer.enabled is not None else enabled
            weight_bits = layer.weight_bits or weight_bits
            act_bits = None if weight_only else (layer.act_bits or act_bits)
            block_size = layer.block_size or block_size
            symmetric = symmetric if layer.symmetric is None else layer.symmetric
            zero_points = zero_points if layer.zero_points is None else layer.zero_points
        if self.format == "qdq" and kind not in QDQ_OPS:
            enabled = False
        scale_kind = self.scale_kind
        if kind == "Gather" and self.embedding_scale_kind is not None:
            scale_kind = self.embedding_scale_kind
        return NodeSettings(enabled, weight_bits, act_bits, block_size, symmetric, scale_kind, zero_points)

    @property
    def weight_format(self) -> BlockFormat:
        """Block format of MatMul weights."""
        return BlockFormat(
            self.weight_bits, self.block_size, self.symmetric, self.scale_kind, self.zero_points
        )

    @property
    def embedding_format(self) -> BlockFormat:
        """Block format of Gather (embedding) tables."""
        bits = self.weight_bits if self.embedding_bits is None else self.embedding_bits
        kind = self.scale_kind if self.embedding_scale_kind is None else self.embedding_scale_kind
        return BlockFormat(bits, self.block_size, self.symmetric, kind, self.zero_points)
