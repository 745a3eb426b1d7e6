"""What to compress and how: one frozen, validated configuration shared by the API, CLI and passes."""

from __future__ import annotations

import dataclasses

from bct_onnx.block_format import MAX_BITS, MIN_BITS, BlockFormat, ScaleKind

# ONNX op types that have a quantize pass. Extend this set when a pass for a new family lands.
SUPPORTED_OPS: frozenset[str] = frozenset({"MatMul", "Gather"})
DEFAULT_OPS: frozenset[str] = frozenset({"MatMul", "Gather"})


def _check_bits(field: str, value: object, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{field} must be an integer in [{MIN_BITS}, {MAX_BITS}]{extra}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """Compression settings.

    weight_bits: code width of MatMul weights (2..8).
    act_bits: code width of activations quantized at run time inside BlockMatMul; None = weight-only.
    block_size: consecutive elements sharing one scale (weights: along K; tables: along D).
    ops: ONNX op types to compress (subset of SUPPORTED_OPS).
    symmetric: implicit zero point for weights and tables (no zero-point tensors stored).
    scale_kind: how block scales are stored (float16, float32, pow2).
    embedding_bits: code width of Gather tables; None = weight_bits.
    weight_scale_search: per block, choose the clipped scale with least squared weight error
        instead of the plain max-based scale (offline only; the stored format is unchanged).
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    block_size: int = 32
    ops: frozenset[str] = DEFAULT_OPS
    symmetric: bool = True
    scale_kind: ScaleKind = ScaleKind.FLOAT16
    embedding_bits: int | None = None
    weight_scale_search: bool = True

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, allow_none=False)
        _check_bits("act_bits", self.act_bits, allow_none=True)
        _check_bits("embedding_bits", self.embedding_bits, allow_none=True)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")  # noqa: TRY004 (field error)
        if not isinstance(self.weight_scale_search, bool):
            raise ValueError(  # noqa: TRY004 (one exception type for every bad field)
                f"weight_scale_search must be a bool, got {self.weight_scale_search!r}"
            )
        try:
            object.__setattr__(self, "scale_kind", ScaleKind(self.scale_kind))
        except ValueError:
            kinds = ", ".join(kind.value for kind in ScaleKind)
            raise ValueError(f"scale_kind must be one of {kinds}, got {self.scale_kind!r}") from None
        if isinstance(self.ops, str) or not all(isinstance(op, str) for op in self.ops):
            raise ValueError(f"ops must be a collection of ONNX op type names, got {self.ops!r}")
        ops = frozenset(self.ops)
        unknown = sorted(ops - SUPPORTED_OPS)
        if unknown:
            raise ValueError(
                f"ops contains op types without a quantize pass: {unknown}; supported: {sorted(SUPPORTED_OPS)}"
            )
        object.__setattr__(self, "ops", ops)

    @property
    def weight_format(self) -> BlockFormat:
        """Block format of MatMul weights."""
        return BlockFormat(self.weight_bits, self.block_size, self.symmetric, self.scale_kind)

    @property
    def embedding_format(self) -> BlockFormat:
        """Block format of Gather (embedding) tables."""
        bits = self.weight_bits if self.embedding_bits is None else self.embedding_bits
        return BlockFormat(bits, self.block_size, self.symmetric, self.scale_kind)
