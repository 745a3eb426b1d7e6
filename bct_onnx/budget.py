"""Budgets instead of bit flags: choose bits and block size per weight tensor to meet a size or error goal.

Every constant weight tensor the quantize passes compress (a MatMul weight, an embedding table, a
table tied to the output projection counted once) is a *unit*. For each unit the allocator knows,
per candidate format (bits 3..8, block sizes), its stored bytes and its relative weight error
``|W - Q(W)|^2 / |W|^2`` (measured by quantizing a row sample exactly as the passes would), and one
*sensitivity*: how much the model's output moves per unit of relative weight error. Sensitivity is
measured, not guessed: the float model is run on inputs (calibration batches when there are any,
otherwise synthetic token sequences: data-free) once with every weight as it is and once per unit
with that unit alone quantized to a reference format; the output's relative squared error divided
by the unit's relative weight error is its sensitivity. The predicted output error of a plan is the
sum over units of sensitivity times relative weight error (errors of different tensors add, to
first order); the proxy is stated in the report as ``relative output MSE`` (|y' - y|^2 / |y|^2 of
the model's first float output), and the plan's real output error is measured once at the end.

The allocation minimises predicted error under a byte budget (``target_ratio``: whole-file size) or
the bytes under a predicted-error bound (``max_error``), greedily along each unit's lower convex
hull of (bytes, error), which is optimal for the Lagrangian relaxation of the knapsack. The plan
becomes NodeOverride entries by exact node name, so mixed precision is stored in the existing
block format and read by the existing kernels.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bct_onnx import model_io, runtime
from bct_onnx.block_format import (
    BlockFormat,
    ScaleKind,
    choose_scales,
    codes_for,
    default_scale_factor,
    dequantize_codes,
    pad_to_blocks,
)
from bct_onnx.config import CompressConfig, NodeOverride, OpSettings
from bct_onnx.errors import BctOnnxError
from bct_onnx.weight_quantizer import search_scales

logger = logging.getLogger(__name__)

# 2-bit codes are left out: their error grows faster than the 3-bit sensitivity measurement
# extrapolates, and on SmolLM2 a data-free 8x plan with 8% of the weights at 2 bits predicted no
# more error than 4-bit everywhere yet doubled the perplexity (docs/results.md).
BUDGET_BITS: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
REFERENCE_BITS = 3  # sensitivity is measured with each unit at 3 bits: a clear but first-order effect
SAMPLE_VALUES = 1 << 15  # values (whole rows, at least 16) sampled to estimate a unit's error per format
SYNTHETIC_BATCH = 2
SYNTHETIC_SEQUENCE = 32
# Calibration tokens the sensitivities are measured on (every unit runs the model on them once):
# whole batches up to this many, else the first rows of the first batch, at least one (a decoder's
# packed rows hold 1024 shipped tokens, so it measures on its first row; an encoder's first two
# batches of 8 shipped lines hold about 500).
MEASURE_TOKENS = 512
_CHUNK_ELEMENTS = 1 << 22  # rows are fake-quantized in chunks of about this many values
# The plan counts codes, scales and the float parts exactly; the compressed graph's own bytes (node
# attributes, initializer names) are an allowance, corrected by a second plan when the file is larger.
GRAPH_ALLOWANCE = 0.001
NODE_ALLOWANCE_BYTES = 256
PROXY = "relative output MSE |y' - y|^2 / |y|^2 of the model's first float output"


class BudgetError(BctOnnxError):
    """A budget cannot be planned or met (bad goal, no weights, inputs that cannot be synthesised)."""


@dataclasses.dataclass(frozen=True)
class WeightUnit:
    """One constant weight tensor, quantized as ``rows`` rows of ``axis_size`` values.

    transposed: the stored layout is the transpose of the initializer (a MatMul weight [K, N] is
    stored [N, K]). consumers: (op kind, node key) of every node reading it, which all get the same
    format so that the tensor is stored once.
    """

    source: str
    rows: int
    axis_size: int
    transposed: bool
    scale_kind: ScaleKind
    consumers: tuple[tuple[str, str], ...]
    pinned: tuple[int, int] | None = None  # (bits, block size) the user's own settings fix for it

    @property
    def elements(self) -> int:
        return self.rows * self.axis_size

    @property
    def float_bytes(self) -> int:
        return 4 * self.elements


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One format a unit may get: its stored bytes and its relative weight error."""

    bits: int
    block_size: int
    nbytes: int
    relative_error: float


@dataclasses.dataclass(frozen=True)
class UnitChoice:
    """What the plan gave one unit, and why (its sensitivity and predicted share of the error)."""

    source: str
    consumers: tuple[str, ...]
    elements: int
    bits: int
    block_size: int
    nbytes: int
    sensitivity: float
    relative_error: float
    predicted_error: float


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """The allocation: per-unit choices, totals, the goal and the error proxy."""

    choices: tuple[UnitChoice, ...]
    budget_bytes: int | None
    max_error: float | None
    fixed_bytes: int
    predicted_error: float
    inputs: str  # "calibration" or "synthetic"
    measured_error: float | None = None
    floored: bool = False  # the ratio's plan was replaced by one as good as the fixed widths

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + sum(choice.nbytes for choice in self.choices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "proxy": PROXY,
            "inputs": self.inputs,
            "budget_bytes": self.budget_bytes,
            "max_error": self.max_error,
            "planned_bytes": self.planned_bytes,
            "predicted_error": self.predicted_error,
            "measured_error": self.measured_error,
            "floored": self.floored,
            "units": [dataclasses.asdict(choice) for choice in self.choices],
        }

    def describe(self) -> str:
        """One line per unit, most sensitive first: what it got and why."""
        lines = [
            f"budget: {len(self.choices)} weight tensors, planned {self.planned_bytes / 1e6:.2f} MB"
            + (f" of {self.budget_bytes / 1e6:.2f} MB" if self.budget_bytes is not None else "")
            + f"; predicted {PROXY} {self.predicted_error:.2e}"
            + (f", measured {self.measured_error:.2e}" if self.measured_error is not None else "")
            + f" ({self.inputs} inputs)"
        ]
        for rank, choice in enumerate(sorted(self.choices, key=lambda c: -c.sensitivity), start=1):
            lines.append(
                f"  {choice.bits}-bit b{choice.block_size}  {', '.join(choice.consumers)} ({choice.source})  sensitivity {choice.sensitivity:.3g} "
                f"(rank {rank}), weight error {choice.relative_error:.2e}, output share {choice.predicted_error:.2e}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The allocation itself (pure: unit-tested without a model)


def _lower_hull(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates on the lower convex hull of (bytes, relative error), cheapest first.

    Dominated candidates (more bytes, no less error) and those above the hull are dropped.
    """
    points = sorted(candidates, key=lambda c: (c.nbytes, c.relative_error))
    frontier: list[Candidate] = []
    for candidate in points:
        if frontier and candidate.relative_error >= frontier[-1].relative_error:
            continue
        frontier.append(candidate)
    hull: list[Candidate] = []
    for candidate in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Keep b only if the slope a->b is steeper (more error saved per byte) than b->candidate.
            slope_ab = (a.relative_error - b.relative_error) / (b.nbytes - a.nbytes)
            slope_bc = (b.relative_error - candidate.relative_error) / (candidate.nbytes - b.nbytes)
            if slope_ab > slope_bc:
                break
            hull.pop()
        hull.append(candidate)
    return hull


def allocate(
    candidates: Mapping[str, Sequence[Candidate]],
    sensitivities: Mapping[str, float],
    budget_bytes: int | None = None,
    max_error: float | None = None,
) -> dict[str, Candidate]:
    """Choose one candidate per unit: least predicted error within budget_bytes (the units' bytes
    only), or the fewest bytes whose predicted error is at most max_error (within budget_bytes too
    when both are given). Predicted error = sum of sensitivity * relative_error.

    Greedy on the lower convex hulls: start every unit at its cheapest format and take, while the
    budget allows, the upgrade that saves the most error per byte.
    """
    if budget_bytes is None and max_error is None:
        raise BudgetError("a budget needs target bytes or a maximum error")
    hulls = {name: _lower_hull(options) for name, options in candidates.items()}
    if any(not hull for hull in hulls.values()):
        raise BudgetError("every unit needs at least one candidate format")
    position = dict.fromkeys(hulls, 0)
    used = sum(hull[0].nbytes for hull in hulls.values())
    if budget_bytes is not None and used > budget_bytes:
        raise BudgetError(
            f"the budget of {budget_bytes} bytes for the weights is below their smallest size ({used} bytes)"
        )
    error = sum(sensitivities[name] * hull[0].relative_error for name, hull in hulls.items())

    def step(name: str) -> tuple[float, str] | None:
        hull, at = hulls[name], position[name]
        if at + 1 >= len(hull):
            return None
        gain = sensitivities[name] * (hull[at].relative_error - hull[at + 1].relative_error)
        return (-gain / (hull[at + 1].nbytes - hull[at].nbytes), name)

    heap = [item for item in (step(name) for name in hulls) if item is not None]
    heapq.heapify(heap)
    while heap:
        if max_error is not None and error <= max_error:
            break
        _, name = heapq.heappop(heap)
        hull, at = hulls[name], position[name]
        extra = hull[at + 1].nbytes - hull[at].nbytes
        if budget_bytes is not None and used + extra > budget_bytes:
            continue  # this upgrade does not fit; cheaper upgrades of other units may
        used += extra
        error -= sensitivities[name] * (hull[at].relative_error - hull[at + 1].relative_error)
        position[name] = at + 1
        following = step(name)
        if following is not None:
            heapq.heappush(heap, following)
    return {name: hulls[name][position[name]] for name in hulls}


# ---------------------------------------------------------------------------------------------
# Units, candidate formats and sensitivities of a real model


def node_key(node: ir.Node) -> str:
    """The name the config's overrides match a node by (as the quantize passes look it up)."""
    return node.name or node.outputs[0].name or ""


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.is_graph_input() or value.const_value is None:
        return None
    return value.const_value


def _float_2d(tensor: ir.TensorProtocol | None) -> bool:
    return tensor is not None and tensor.dtype == ir.DataType.FLOAT and len(tensor.shape) == 2


def find_units(model: ir.Model, config: CompressConfig) -> list[WeightUnit]:
    """The constant weight tensors that config compresses in model (a canonicalized model)."""
    found: dict[str, dict[str, Any]] = {}

    def add(source: ir.Value, kind: str, key: str, transposed: bool) -> None:
        tensor = source.const_value
        assert tensor is not None
        dims = tuple(int(d) for d in tensor.shape.numpy())
        rows, axis = (dims[1], dims[0]) if transposed else dims
        entry = found.setdefault(
            source.name or "", {"rows": rows, "axis": axis, "transposed": transposed, "consumers": [], "kinds": set()}
        )
        if entry["transposed"] != transposed:
            raise BudgetError(f"weight '{source.name}' is read in two layouts; a budget cannot plan it")
        entry["consumers"].append((kind, key))
        entry["kinds"].add(kind)

    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul" and len(node.inputs) == 2 and config.settings_for("MatMul", node_key(node)).enabled:
            weight = node.inputs[1]
            if _float_2d(_constant(weight)):
                assert weight is not None
                add(weight, "MatMul", node_key(node), transposed=True)
                continue
            producer = weight.producer() if weight is not None else None
            if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
                perm = producer.attributes.get("perm")
                inner = producer.inputs[0]
                if (perm is None or list(perm.as_ints()) == [1, 0]) and _float_2d(_constant(inner)):
                    assert inner is not None
                    add(inner, "MatMul", node_key(node), transposed=False)
        elif node.op_type == "Gather" and config.settings_for("Gather", node_key(node)).enabled:
            axis = node.attributes.get("axis")
            table = node.inputs[0]
            if (axis is None or axis.as_int() in (0, -2)) and _float_2d(_constant(table)):
                assert table is not None
                add(table, "Gather", node_key(node), transposed=False)
    units = []
    for source, entry in found.items():
        if "MatMul" in entry["kinds"]:
            kind = config.scale_kind
        else:
            kind = config.embedding_scale_kind or config.scale_kind
        consumers = tuple(entry["consumers"])
        pinned = next((_pinned_format(config, op, key) for op, key in consumers if _pinned_format(config, op, key)), None)
        units.append(WeightUnit(source, entry["rows"], entry["axis"], entry["transposed"], kind, consumers, pinned))
    return units


def _pinned_format(config: CompressConfig, kind: str, key: str) -> tuple[int, int] | None:
    """(bits, block size) of a node whose bits or block size the config sets by op kind or override.

    A budget plans only the tensors the user left free; explicit per-op or per-node settings stand.
    """
    layers = [config.op_settings[kind]] if kind in config.op_settings else []
    layers += [o.settings for o in config.overrides if o.matches(kind, key)]
    pinned_table = kind == "Gather" and config.embedding_bits is not None
    if pinned_table or any(layer.weight_bits is not None or layer.block_size is not None for layer in layers):
        settings = config.settings_for(kind, key)
        return settings.weight_bits, settings.block_size
    return None


def unit_layout(unit: WeightUnit, model: ir.Model) -> np.ndarray:
    """The unit's values in its stored layout [rows, axis_size] (float32)."""
    value = model.graph.initializers[unit.source]
    assert value.const_value is not None
    array = np.asarray(value.const_value.numpy(), dtype=np.float32)
    return np.ascontiguousarray(array.T) if unit.transposed else array


def unit_format(unit: WeightUnit, config: CompressConfig, bits: int, block_size: int) -> BlockFormat:
    return BlockFormat(bits, block_size, config.symmetric, unit.scale_kind, config.zero_points)


def format_bytes(unit: WeightUnit, fmt: BlockFormat) -> int:
    """Stored bytes of the unit in fmt: packed codes, scales and zero points / offsets."""
    per_row = fmt.row_bytes(unit.axis_size) + fmt.num_blocks(unit.axis_size) * fmt.scale_dtype.itemsize
    if fmt.zero_point_dtype is not None:
        per_row += fmt.num_blocks(unit.axis_size) * fmt.zero_point_dtype.itemsize
    return unit.rows * per_row


def fake_quantize(values: np.ndarray, fmt: BlockFormat, scale_search: bool) -> np.ndarray:
    """values [rows, D] quantized along D as the passes quantize them, then dequantized (no packing)."""
    d = values.shape[-1]
    out = np.empty_like(values, dtype=np.float32)
    factor = default_scale_factor(values, fmt)  # float8e4m3: one factor for the whole tensor
    step = max(1, _CHUNK_ELEMENTS // max(1, d))
    for start in range(0, values.shape[0], step):
        blocks = pad_to_blocks(values[start : start + step], fmt)
        scales, zero_points = (
            search_scales(blocks, fmt, scale_factor=factor) if scale_search else choose_scales(blocks, fmt, factor)
        )
        codes = codes_for(blocks, scales, zero_points, fmt, factor).reshape(blocks.shape[0], -1)[:, :d]
        out[start : start + step] = dequantize_codes(codes, scales, zero_points, fmt, factor)
    return out


def relative_error(values: np.ndarray, fmt: BlockFormat, scale_search: bool) -> float:
    """|W - Q(W)|^2 / |W|^2 of values [rows, D] quantized along D as the passes quantize it."""
    restored = fake_quantize(values, fmt, scale_search)
    denominator = float(np.sum(np.square(values, dtype=np.float64)))
    return float(np.sum(np.square(restored - values, dtype=np.float64))) / max(denominator, 1e-30)


def sample_rows(values: np.ndarray, budget: int = SAMPLE_VALUES) -> np.ndarray:
    """Evenly spaced rows of values [rows, D], about ``budget`` values (at least 16 rows)."""
    rows = max(16, budget // max(1, values.shape[1]))
    if values.shape[0] <= rows:
        return values
    return values[np.linspace(0, values.shape[0] - 1, rows).round().astype(np.int64)]


def block_sizes(config: CompressConfig, axis_size: int) -> tuple[int, ...]:
    """Block sizes a budget may give a unit: the config's and twice it (when the axis is that long)."""
    sizes = [config.block_size]
    if 2 * config.block_size <= axis_size:
        sizes.append(2 * config.block_size)
    return tuple(sizes)


def candidate_formats(unit: WeightUnit, values: np.ndarray, config: CompressConfig) -> list[Candidate]:
    """Every (bits, block size) the budget may give the unit, with bytes and relative error."""
    sample = sample_rows(values)
    if unit.pinned is not None:
        bits, block_size = unit.pinned
        fmt = unit_format(unit, config, bits, block_size)
        return [Candidate(bits, block_size, format_bytes(unit, fmt), relative_error(sample, fmt, config.weight_scale_search))]
    out = []
    for block_size in block_sizes(config, unit.axis_size):
        for bits in BUDGET_BITS:
            fmt = unit_format(unit, config, bits, block_size)
            out.append(
                Candidate(bits, block_size, format_bytes(unit, fmt), relative_error(sample, fmt, config.weight_scale_search))
            )
    return out


def _lookup_vocabulary(model: ir.Model) -> dict[str, int]:
    """Graph input name -> rows of the constant table a Gather looks it up in (token ids)."""
    found: dict[str, int] = {}
    for node in model.graph:
        ids = node.inputs[1] if node.op_type == "Gather" and len(node.inputs) == 2 else None
        table = _constant(node.inputs[0]) if ids is not None else None
        if ids is not None and ids.is_graph_input() and table is not None and len(table.shape) == 2:
            found[ids.name or ""] = int(table.shape[0])
    return found


def measurement_batches(feeds: Sequence[Mapping[str, np.ndarray]], tokens: int) -> list[dict[str, np.ndarray]]:
    """The first calibration batches holding at most ``tokens`` tokens (attention mask ones, else
    input_ids elements), at most two; when the first batch alone holds more, its first rows that
    fit (at least one). Every input of a batch has its rows on the first axis."""
    picked: list[dict[str, np.ndarray]] = []
    total = 0
    for batch in list(feeds)[:2]:
        counts = _row_tokens(batch)
        if total + int(counts.sum()) <= tokens:
            picked.append(dict(batch))
            total += int(counts.sum())
            continue
        if not picked:
            rows = max(1, int(np.searchsorted(np.cumsum(counts), tokens, side="right")))
            picked.append({name: np.asarray(value)[:rows] for name, value in batch.items()})
        break
    return picked


def _row_tokens(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Tokens of each row of a batch: its attention mask's ones, else its input_ids' length."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return np.asarray(mask).reshape(len(mask), -1).sum(axis=1)
    ids = np.asarray(batch["input_ids"] if "input_ids" in batch else next(iter(batch.values())))
    return np.full(len(ids), ids[0].size)


def synthetic_feeds(
    model: ir.Model, batch: int = SYNTHETIC_BATCH, sequence: int = SYNTHETIC_SEQUENCE, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """One batch of synthetic inputs for data-free sensitivity: random token sequences.

    Integer inputs that an embedding Gather looks up: uniform over the table's rows;
    attention_mask ones; token_type_ids zeros; position_ids 0..S-1; a KV cache (past_key_values.*)
    empty; float inputs standard normal (symbolic dimensions: batch first, then sequence). Any other
    integer input is an error naming it.
    """
    rng = np.random.default_rng(seed)
    vocabulary = _lookup_vocabulary(model)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        name = value.name or ""
        dtype = np.int32 if value.dtype == ir.DataType.INT32 else np.int64
        shape = value.shape
        if name in vocabulary:
            feeds[name] = rng.integers(0, vocabulary[name], size=(batch, sequence)).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, sequence), dtype=dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, sequence), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(sequence, dtype=dtype), (batch, sequence)).copy()
        elif name.startswith("past_key_values") and shape is not None and len(shape) == 4:
            heads, width = shape[1], shape[3]
            if not isinstance(heads, int) or not isinstance(width, int):
                raise BudgetError(f"cannot synthesise graph input '{name}': its heads and width are not static")
            feeds[name] = np.zeros((batch, heads, 0, width), dtype=np.float32)
        elif value.dtype == ir.DataType.FLOAT and shape is not None:
            dims, symbolic = [], 0
            for dim in shape:
                if isinstance(dim, int):
                    dims.append(dim)
                else:
                    dims.append(batch if symbolic == 0 else sequence)
                    symbolic += 1
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
        else:
            raise BudgetError(
                f"cannot synthesise graph input '{name}' for data-free sensitivity; pass calibration inputs"
            )
    return [feeds]


def _external_data_options(model: ir.Model) -> Any:
    """Session options that let ONNX Runtime find the model's external (or in-file) weights when the
    model is opened from bytes: their folder, given explicitly (else ORT looks in the working directory)."""
    import onnxruntime as ort

    folders = {
        str(Path(value.const_value.base_dir).absolute())
        for value in model.graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    options = ort.SessionOptions()
    if len(folders) == 1:
        options.add_session_config_entry(model_io.EXTERNAL_DATA_FOLDER_KEY, folders.pop())
    return options


class _WeightSwapper:
    """The float model in one ONNX Runtime session whose unit weights can be replaced per run.

    Each unit's initializer is also declared a graph input, which ONNX Runtime lets a feed override.
    """

    def __init__(self, model: ir.Model, units: Sequence[WeightUnit], feeds: Sequence[Mapping[str, np.ndarray]]):
        proto = ir.serde.serialize_model(model)
        declared = {i.name for i in proto.graph.input}
        by_name = {init.name: init for init in proto.graph.initializer}
        for unit in units:
            if unit.source not in declared:
                init = by_name[unit.source]
                proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        outputs = [o for o in proto.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
        if not outputs:
            raise BudgetError("the model has no float output to measure sensitivity on")
        self.output = outputs[0].name
        if proto.ByteSize() > (1 << 31) - (1 << 26):
            raise BudgetError("sensitivity measurement of models above 2 GB is not supported yet")
        try:
            self.session = runtime.session(
                proto.SerializeToString(), sess_options=_external_data_options(model), with_library=False, quiet=True
            )
        except Exception as error:  # onnxruntime raises its own exception types
            raise BudgetError(f"the float model does not load for sensitivity measurement: {error}") from error
        self.feeds = [dict(f) for f in feeds]
        self.reference = [self._run({}, feed) for feed in self.feeds]

    def _run(self, weights: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray]) -> np.ndarray:
        try:
            (out,) = self.session.run([self.output], {**feed, **weights})
        except Exception as error:  # onnxruntime raises its own exception types
            raise BudgetError(f"running the float model for sensitivity measurement failed: {error}") from error
        return np.asarray(out, dtype=np.float64)

    def output_error(self, weights: Mapping[str, np.ndarray]) -> float:
        """Relative squared error of the output with the given weights swapped in (all feeds)."""
        num = den = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            out = self._run(weights, feed)
            num += float(np.sum(np.square(out - reference)))
            den += float(np.sum(np.square(reference)))
        return num / max(den, 1e-30)


def _restored(unit: WeightUnit, values: np.ndarray, fmt: BlockFormat, scale_search: bool) -> np.ndarray:
    """The unit's quantized-then-dequantized values in the initializer's own layout."""
    restored = fake_quantize(values, fmt, scale_search)
    return np.ascontiguousarray(restored.T) if unit.transposed else restored


class BudgetPlanner:
    """Units, candidate formats and sensitivities of one canonicalized float model, measured once;
    ``plan`` then allocates for any goal (api.compress re-plans when the saved file overshoots)."""

    def __init__(
        self,
        model: ir.Model,
        config: CompressConfig,
        input_bytes: int,
        feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        self.config = config
        self.units = find_units(model, config)
        if not self.units:
            raise BudgetError("the model has no constant weight tensor that the config compresses")
        self.input_bytes = input_bytes
        self.fixed_bytes = input_bytes - sum(unit.float_bytes for unit in self.units)
        self.inputs = "calibration" if feeds else "synthetic"
        batches = measurement_batches(feeds, MEASURE_TOKENS) if feeds else synthetic_feeds(model)
        self.swapper = _WeightSwapper(model, self.units, batches)
        self.candidates: dict[str, list[Candidate]] = {}
        self.sensitivities: dict[str, float] = {}
        self.layouts: dict[str, np.ndarray] = {}
        for unit in self.units:
            values = unit_layout(unit, model)
            self.layouts[unit.source] = values
            self.candidates[unit.source] = candidate_formats(unit, values, config)
            reference = unit_format(unit, config, REFERENCE_BITS, config.block_size)
            restored = _restored(unit, values, reference, scale_search=False)  # the ratio below cancels the rounding
            original = values.T if unit.transposed else values
            weight_error = float(np.sum(np.square(restored - original, dtype=np.float64)))
            weight_error /= max(float(np.sum(np.square(values, dtype=np.float64))), 1e-30)
            out_error = self.swapper.output_error({unit.source: restored})
            self.sensitivities[unit.source] = out_error / max(weight_error, 1e-30)
            logger.info("budget: %s sensitivity %.3g", unit.source, self.sensitivities[unit.source])

    def budget_bytes(self, target_ratio: float, overshoot: int = 0) -> int:
        """Bytes a plan may use for target_ratio: the whole file's share less an allowance for the
        graph's own growth (GRAPH_ALLOWANCE of it, and NODE_ALLOWANCE_BYTES per rewritten node) and
        less ``overshoot`` bytes a previous plan went over."""
        whole = int(self.input_bytes / target_ratio)
        nodes = sum(len(unit.consumers) for unit in self.units)
        budget = whole - int(GRAPH_ALLOWANCE * whole) - NODE_ALLOWANCE_BYTES * nodes - overshoot
        if budget <= self.fixed_bytes:
            raise BudgetError(
                f"target ratio {target_ratio} leaves {budget} bytes, less than the {self.fixed_bytes} bytes "
                "of the parts that stay float"
            )
        return budget

    def fixed_width_error(self) -> float:
        """Predicted output error of the config's own widths (weight_bits, embedding_bits, block_size)."""
        total = 0.0
        for unit in self.units:
            # A tied table takes its output projection's width (the MatMul pass quantizes it first).
            kind, key = next((c for c in unit.consumers if c[0] == "MatMul"), unit.consumers[0])
            settings = self.config.settings_for(kind, key)
            fmt = unit_format(unit, self.config, settings.weight_bits, settings.block_size)
            error = relative_error(sample_rows(self.layouts[unit.source]), fmt, self.config.weight_scale_search)
            total += self.sensitivities[unit.source] * error
        return total

    def plan(
        self, budget_bytes: int | None, max_error: float | None, floor: bool = False
    ) -> tuple[CompressConfig, BudgetPlan]:
        """The config with per-node overrides and the plan, for a whole-file byte budget and/or error bound.

        floor: when the budget's plan predicts more error than the config's fixed widths, plan
        instead the fewest bytes that predict no more than they do (see CompressConfig.budget_floor).
        """
        units = self.units
        weights_budget = None if budget_bytes is None else budget_bytes - self.fixed_bytes
        chosen = allocate(self.candidates, self.sensitivities, weights_budget, max_error)
        floored = False
        if floor and budget_bytes is not None:
            ceiling = self.fixed_width_error()
            if sum(self.sensitivities[n] * c.relative_error for n, c in chosen.items()) > ceiling:
                chosen = allocate(self.candidates, self.sensitivities, None, ceiling)
                floored = True
                logger.info("budget: the ratio's plan predicts more error than the fixed widths; matching them")
        choices = []
        for unit in units:
            pick = chosen[unit.source]
            sensitivity = self.sensitivities[unit.source]
            choices.append(
                UnitChoice(
                    unit.source,
                    tuple(key for _, key in unit.consumers),
                    unit.elements,
                    pick.bits,
                    pick.block_size,
                    pick.nbytes,
                    sensitivity,
                    pick.relative_error,
                    sensitivity * pick.relative_error,
                )
            )
        plan = BudgetPlan(
            tuple(choices),
            budget_bytes,
            max_error,
            self.fixed_bytes,
            sum(choice.predicted_error for choice in choices),
            self.inputs,
            floored=floored,
        )
        return apply_plan(self.config, units, plan), plan

    def measure(self, plan: BudgetPlan) -> BudgetPlan:
        """plan with its measured output error: every unit fake-quantized as planned, in one run."""
        by_source = {choice.source: choice for choice in plan.choices}
        swapped = {}
        for unit in self.units:
            choice = by_source[unit.source]
            fmt = unit_format(unit, self.config, choice.bits, choice.block_size)
            swapped[unit.source] = _restored(unit, self.layouts[unit.source], fmt, self.config.weight_scale_search)
        return dataclasses.replace(plan, measured_error=self.swapper.output_error(swapped))


def apply_plan(config: CompressConfig, units: Sequence[WeightUnit], plan: BudgetPlan) -> CompressConfig:
    """config with a NodeOverride (exact node name) per consumer of every unit, after its own overrides."""
    by_source = {choice.source: choice for choice in plan.choices}
    overrides = list(config.overrides)
    for unit in units:
        choice = by_source[unit.source]
        if unit.pinned is not None:
            continue  # the user's settings already give it this format
        for kind, key in unit.consumers:
            overrides.append(
                NodeOverride(
                    "re:^" + re.escape(key) + "$",
                    OpSettings(weight_bits=choice.bits, block_size=choice.block_size),
                    op=kind,
                )
            )
    return dataclasses.replace(config, overrides=tuple(overrides))
