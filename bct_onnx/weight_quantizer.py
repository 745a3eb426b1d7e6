"""Offline quantization of constant tensors (weights, embedding tables) into the block format.

The format stores only codes, scales and zero points; how a scale was chosen is free. Besides the
plain max-based scale of ``block_format.choose_scales`` this module offers a per-block search over
clipped scales: for each ratio r of a small grid the block's spec scale of ``r * x`` is tried, codes
are computed for ``x`` itself (values beyond the clipped range saturate), and the scale with the
least squared error of the block wins (ties keep the larger, unclipped scale). The result is a
spec-conform QuantizedTensor; ``block_format.dequantize`` reads it back.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    ScaleKind,
    _inverse,
    _pad_to_blocks,
    asymmetric_scales,
    check_scale_factor,
    choose_scales,
    codes_for,
    default_scale_factor,
    pack_codes,
    pad_to_blocks,
    round_half_to_even,
    scales_to_float32,
    symmetric_scales,
)

logger = logging.getLogger(__name__)

# Ratios of the block's range tried by the search; 1.0 (the plain spec scale) first. Ratios below 1
# clip outliers; 1.0625 and 8/7 widen a symmetric scale so that the largest value of the opposite sign
# is not clipped at +2**(bits-1)-1 (docs/results.md: what the search gains, and that finer grids do not).
# Float-offset blocks (value = u * scale + offset) search clipped *ranges* instead: the block's
# [min, max] shrunk from below, from above or both (OFFSET_SHRINKS), since scaling the extremes
# toward 0 clips nothing in a block far from 0.
CLIP_RATIOS: tuple[float, ...] = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 1.0625, 8 / 7)
# Fractions of a float-offset block's range cut from its bottom and from its top; (0, 0) first.
OFFSET_SHRINKS: tuple[tuple[float, float], ...] = tuple(
    (bottom, top)
    for bottom in (0.0, 0.05, 0.1, 0.15)
    for top in (0.0, 0.05, 0.1, 0.15)
    if bottom + top <= 0.2
)
# A power-of-two scale has only two sensible exponents per block: the smallest that fits the block's
# maximum, and the next one down (finer steps, largest values clipped). Ratio 0.5 always reaches it.
POW2_RATIOS: tuple[float, ...] = (1.0, 0.5)
# Rows are processed in chunks of about this many elements to bound temporary memory.
_CHUNK_ELEMENTS = 1 << 22
# search_scales tries as many clip ratios at once as keep its temporaries under this many elements.
_SEARCH_GROUP_ELEMENTS = 1 << 21


def _extremes(blocks: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """The values choose_scales depends on, one tiny block per block: [..., nb, 1 or 2].

    Symmetric scales depend only on the element of largest magnitude, asymmetric ones on the
    minimum and maximum; scaling by r > 0 commutes with taking them (rounding is monotonic), so
    ``choose_scales(extremes * r)`` equals ``choose_scales(blocks * r)`` at a fraction of the cost.
    """
    if fmt.symmetric:
        idx = np.argmax(np.abs(blocks), axis=-1)
        return np.take_along_axis(blocks, idx[..., None], axis=-1)
    return np.stack([blocks.min(axis=-1), blocks.max(axis=-1)], axis=-1)


def _block_squared_error(
    blocks: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    fmt: BlockFormat,
    importance: np.ndarray | None = None,
    scale_factor: float | None = None,
) -> np.ndarray:
    """Squared error per block [..., nb] of quantizing blocks with the given stored scales.

    Same arithmetic as ``codes_for`` followed by ``dequantize_codes``, without forming codes. Rows of
    blocks (the axis before nb) are taken a few at a time (_ERROR_CHUNK_ELEMENTS): the elementwise
    steps then pass over temporaries in cache, not over candidates x rows x block_size floats in memory
    (GPTQ's output projection of 49152 rows: 3x faster), with the same arithmetic for every element.
    """
    scale = scales_to_float32(scales, fmt.scale_kind, scale_factor)[..., None]
    zp = None if zero_points is None else zero_points.astype(np.float32)[..., None]
    parts = [blocks, scale] + ([] if zp is None else [zp]) + ([] if importance is None else [np.asarray(importance)])
    shape = np.broadcast_shapes(*(part.shape for part in parts))
    if len(shape) < 3 or shape[-3] <= 1:
        return _squared_error(blocks, scale, zp, fmt, importance)
    rows, size = shape[-3], int(np.prod(shape, dtype=np.int64))
    if size <= 4 * _ERROR_CHUNK_ELEMENTS:  # in cache already: one pass costs fewer numpy calls
        return _squared_error(blocks, scale, zp, fmt, importance)
    step = max(1, _ERROR_CHUNK_ELEMENTS // max(1, size // rows))

    def rows_of(part: np.ndarray | None, start: int) -> np.ndarray | None:
        if part is None or part.ndim < 3 or part.shape[-3] == 1:
            return part
        return part[..., start : start + step, :, :]

    errors = np.empty(shape[:-1], np.float32)
    for start in range(0, rows, step):
        errors[..., start : start + step, :] = _squared_error(
            rows_of(blocks, start), rows_of(scale, start), rows_of(zp, start), fmt, rows_of(importance, start)
        )
    return errors


# _block_squared_error's temporaries hold about this many elements at once (a few hundred KB: in cache).
_ERROR_CHUNK_ELEMENTS = 1 << 16


def _squared_error(
    blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, fmt: BlockFormat, importance: np.ndarray | None
) -> np.ndarray:
    """_block_squared_error of float32 scales [..., nb, 1] (zero points or offsets zp, float32 [..., nb, 1])."""
    if fmt.float_offsets:
        assert zp is not None
        q = round_half_to_even(np.clip((blocks - zp) * _inverse(scale), 0, fmt.qmax))
        diff = (q * scale + zp) - blocks
        if importance is not None:
            return np.einsum("...i,...i,...i->...", diff, diff, np.broadcast_to(importance, diff.shape))
        return np.einsum("...i,...i->...", diff, diff)
    # round_half_to_even(blocks * inverse), the clip, q * scale - blocks: in place on one temporary
    diff = np.multiply(blocks, _inverse(scale), dtype=np.float32)
    np.rint(diff, out=diff)
    if fmt.symmetric:
        np.clip(diff, fmt.qmin, fmt.qmax, out=diff)
    else:
        assert zp is not None
        np.add(diff, zp, out=diff)
        np.clip(diff, 0, fmt.qmax, out=diff)
        np.subtract(diff, zp, out=diff)
    np.multiply(diff, scale, out=diff)
    np.subtract(diff, blocks, out=diff)
    if importance is not None:
        return np.einsum("...i,...i,...i->...", diff, diff, np.broadcast_to(importance, diff.shape))
    return np.einsum("...i,...i->...", diff, diff)


def search_scales(
    blocks: np.ndarray,
    fmt: BlockFormat,
    ratios: tuple[float, ...] | None = None,
    importance: np.ndarray | None = None,
    scale_factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored scales and zero points [..., nb] minimising each block's squared error over ratios.

    Float-offset formats search OFFSET_SHRINKS (ratios do not apply to them). One-byte float scales
    are rounded to their grid before each candidate's error is measured, so the search sees the
    scale the runtime will use (float8e4m3: for the tensor's scale_factor).
    """
    if fmt.float_offsets:
        return _search_offset_ranges(blocks.astype(np.float32, copy=False), fmt, importance, scale_factor)
    if ratios is None:
        ratios = POW2_RATIOS if fmt.scale_kind is ScaleKind.POW2 else CLIP_RATIOS
    blocks = blocks.astype(np.float32, copy=False)
    factor = check_scale_factor(fmt.scale_kind, scale_factor)
    extremes = _extremes(blocks, fmt)
    # The plain spec scale (ratio 1) first: on equal errors the earlier candidate wins.
    candidates = [1.0] + [ratio for ratio in ratios if ratio != 1.0]
    best_scales: np.ndarray | None = None
    best_zp: np.ndarray | None = None
    best_err: np.ndarray | None = None
    # Several ratios' candidates at once along a new leading axis (the same elementwise arithmetic, so
    # the same errors): few rows of blocks (GPTQ's one block column) cost numpy calls, not arithmetic.
    group = max(1, _SEARCH_GROUP_ELEMENTS // max(1, blocks.size))
    for first in range(0, len(candidates), group):
        ratio = np.array(candidates[first : first + group], np.float32).reshape((-1,) + (1,) * (extremes.ndim - 1))
        if fmt.symmetric:  # choose_scales of the one-element blocks extremes * ratio, without its argmax
            scales, zp = symmetric_scales(extremes[..., 0] * ratio, fmt, factor), None
        else:  # choose_scales of the blocks [min, max] * ratio: min * ratio is their minimum (ratio > 0)
            scales, zp = asymmetric_scales(extremes[..., 0] * ratio, extremes[..., 1] * ratio, fmt, factor)
        errors = _block_squared_error(blocks, scales, zp, fmt, importance, scale_factor)
        pick = _first_least(errors)
        err = np.take_along_axis(errors, pick, axis=0)[0]
        group_scales = np.take_along_axis(scales, pick, axis=0)[0]
        group_zp = None if zp is None else np.take_along_axis(zp, pick, axis=0)[0]
        if best_err is None:
            best_err, best_scales, best_zp = err, group_scales, group_zp
            continue
        better = err < best_err
        if not better.any():
            continue
        best_err = np.where(better, err, best_err)
        best_scales = np.where(better, group_scales, best_scales)
        if best_zp is not None and group_zp is not None:
            best_zp = np.where(better, group_zp, best_zp)
    assert best_scales is not None
    return best_scales, best_zp


def search_block_column(
    columns: np.ndarray,
    fmt: BlockFormat,
    importance: np.ndarray | None = None,
    scale_factor: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """search_scales of one block per row given K-major, as GPTQ's walk holds its weight rows: columns
    [L <= block_size, rows] (element j of row r's block at [j, r]; any float dtype, cast to float32 as
    search_scales casts), importance [block_size]. Stored scales and zero points [rows]: those of
    search_scales(pad_to_blocks(columns.T), fmt, importance=importance, scale_factor=...)[..., 0].

    With a float32 importance and integer codes, every candidate's errors come from the custom-op
    library's BlockScaleErrors (block_scale_errors, its numpy specification, when the library is not
    there): the same errors bit for bit, so the same picks, without search_scales' numpy passes over
    candidates x rows x block_size floats (GPTQ's search: about a third of its time). Without importance
    (a tied table's projection), the library's rounding differences (block_scale_diffs) are squared and
    summed by the einsum search_scales sums them with (the same errors). Otherwise (float offsets, no
    library for the unweighted search) the rows are handed to search_scales.
    """
    columns = np.asarray(columns)
    length, rows = columns.shape
    bs = fmt.block_size
    weights = None if importance is None else np.asarray(importance)
    diffs_session = None
    if weights is None and not fmt.float_offsets:
        diffs_session = _SCALE_ERROR_SESSIONS.get(fmt.bits, fmt.symmetric, reduce=False)
    if (
        fmt.float_offsets or length > bs or length == 0
        or (weights is None and diffs_session is None)
        or (weights is not None and (weights.dtype != np.float32 or weights.shape != (bs,)))
    ):
        scales, zp = search_scales(
            pad_to_blocks(columns.T.astype(np.float32), fmt), fmt, importance=importance, scale_factor=scale_factor
        )
        return scales[:, 0], None if zp is None else zp[:, 0]
    if length == bs:
        x = np.ascontiguousarray(columns, dtype=np.float32)
    else:  # the spec's zero padding of a partial block
        x = np.zeros((bs, rows), np.float32)
        x[:length] = columns
    factor = check_scale_factor(fmt.scale_kind, scale_factor)
    ratios = POW2_RATIOS if fmt.scale_kind is ScaleKind.POW2 else CLIP_RATIOS
    ratio = np.array([1.0] + [r for r in ratios if r != 1.0], np.float32)[:, None]  # [candidates, 1]
    if fmt.symmetric:  # the block's element of largest magnitude (the first of equals), as _extremes
        largest = np.take_along_axis(x, np.argmax(np.abs(x), axis=0)[None], axis=0)
        scales, zp = symmetric_scales(largest * ratio, fmt, factor), None
    else:
        scales, zp = asymmetric_scales(x.min(axis=0) * ratio, x.max(axis=0) * ratio, fmt, factor)
    scale = scales_to_float32(scales, fmt.scale_kind, scale_factor)  # [candidates, rows]
    zero = None if zp is None else zp.astype(np.float32)
    if weights is None:  # unweighted: the library's differences, squared and summed by einsum as before
        diffs = _run_scale_errors(diffs_session, np.ascontiguousarray(x.T), scale, zero, None)
        if diffs is None:
            scales_, zp_ = search_scales(pad_to_blocks(x.T, fmt), fmt, scale_factor=scale_factor)
            return scales_[:, 0], None if zp_ is None else zp_[:, 0]
        errors = np.einsum("...i,...i->...", diffs, diffs)
    else:
        errors = _run_scale_errors(_SCALE_ERROR_SESSIONS.get(fmt.bits, fmt.symmetric), x, scale, zero, weights)
        if errors is None:
            errors = block_scale_errors(x, scale, zero, weights, fmt)
    pick = _first_least(errors)
    best = np.take_along_axis(scales, pick, axis=0)[0]
    return best, None if zp is None else np.take_along_axis(zp, pick, axis=0)[0]


def block_scale_errors(
    x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, importance: np.ndarray, fmt: BlockFormat
) -> np.ndarray:
    """The numpy specification of the BlockScaleErrors op: the errors [C, N] of _squared_error for
    K-major blocks x [L, N] (float32), candidate float32 scales [C, N] (and float32 zero points [C, N],
    None when fmt is symmetric) and importance [L]: the elementwise steps in float32, then
    sum_i ((d_i * d_i) * importance_i) over the block's elements in order from 0 (einsum's
    three-operand sum: the same bits, tests/passes/test_gptq.py)."""
    diff = np.multiply(x[:, None, :], _inverse(scale), dtype=np.float32)  # [L, C, N]
    np.rint(diff, out=diff)
    if fmt.symmetric:
        np.clip(diff, fmt.qmin, fmt.qmax, out=diff)
    else:
        assert zero is not None
        np.add(diff, zero, out=diff)
        np.clip(diff, 0, fmt.qmax, out=diff)
        np.subtract(diff, zero, out=diff)
    np.multiply(diff, scale, out=diff)
    np.subtract(diff, x[:, None, :], out=diff)
    np.multiply(diff, diff, out=diff)
    np.multiply(diff, importance[:, None, None], out=diff)
    return np.add.reduce(diff, axis=0)  # axis 0 outermost: element by element, in order


def block_scale_diffs(x_rows: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, fmt: BlockFormat) -> np.ndarray:
    """The numpy specification of BlockScaleErrors with reduce=0: _squared_error's rounding differences
    q * scale - x [C, N, L] of blocks held row by row, x_rows [N, L] (float32), for candidate float32 scales
    (and float32 zero points) [C, N]; search_block_column sums their squares with search_scales' einsum."""
    diff = np.multiply(x_rows, _inverse(scale)[..., None], dtype=np.float32)  # [C, N, L]
    np.rint(diff, out=diff)
    if fmt.symmetric:
        np.clip(diff, fmt.qmin, fmt.qmax, out=diff)
    else:
        assert zero is not None
        np.add(diff, zero[..., None], out=diff)
        np.clip(diff, 0, fmt.qmax, out=diff)
        np.subtract(diff, zero[..., None], out=diff)
    np.multiply(diff, scale[..., None], out=diff)
    np.subtract(diff, x_rows, out=diff)
    return diff


class _ScaleErrorSessions:
    """One ONNX Runtime session per (bits, symmetric, reduce) running one BlockScaleErrors node on one
    thread, opened on first use; None (numpy instead) where the custom-op library cannot be loaded or a
    session fails, said once in the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[tuple[int, bool, bool], Any] = {}
        self._failed = False

    def get(self, bits: int, symmetric: bool, reduce: bool = True) -> Any:
        key = (bits, symmetric, reduce)
        with self._lock:
            if self._failed:
                return None
            if key not in self._sessions:
                try:
                    self._sessions[key] = _scale_errors_session(bits, symmetric, reduce)
                except Exception as error:  # noqa: BLE001  (no library, or an ONNX Runtime without it)
                    logger.info("BlockScaleErrors unavailable (%s): GPTQ's scale search runs in numpy", error)
                    self._failed = True
                    return None
            return self._sessions[key]

    def failed(self) -> None:
        with self._lock:
            self._failed = True


_SCALE_ERROR_SESSIONS = _ScaleErrorSessions()


def _scale_errors_session(bits: int, symmetric: bool, reduce: bool = True) -> Any:
    import onnx

    from bct_onnx import ops, runtime

    helper = onnx.helper
    names = ["x", "scales", "importance" if reduce else ""] + ([] if symmetric else ["zero_points"])
    node = helper.make_node(
        ops.BLOCK_SCALE_ERRORS, names, ["errors"], domain=ops.DOMAIN, bits=bits, symmetric=int(symmetric),
        reduce=int(reduce),
    )
    shapes = {"x": ["L", "N"] if reduce else ["N", "L"], "scales": ["C", "N"], "importance": ["L"], "zero_points": ["C", "N"]}
    graph = helper.make_graph(
        [node], "scale_errors",
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shapes[name]) for name in names if name],
        [helper.make_tensor_value_info("errors", onnx.TensorProto.FLOAT, ["C", "N"] if reduce else ["C", "N", "L"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)]
    )
    return runtime.session(model.SerializeToString(), ["CPUExecutionProvider"], threads=1, quiet=True)


def _run_scale_errors(
    session: Any, x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, importance: np.ndarray | None
) -> np.ndarray | None:
    """BlockScaleErrors' output on a session of _SCALE_ERROR_SESSIONS (None: no session, or it failed)."""
    if session is None:
        return None
    feeds = {"x": x, "scales": np.ascontiguousarray(scale)}
    if importance is not None:
        feeds["importance"] = importance
    if zero is not None:
        feeds["zero_points"] = np.ascontiguousarray(zero)
    try:
        (result,) = session.run(None, feeds)
    except Exception as error:  # noqa: BLE001  (onnxruntime raises its own exception types)
        logger.warning("BlockScaleErrors failed (%s): GPTQ's scale search runs in numpy from now on", error)
        _SCALE_ERROR_SESSIONS.failed()
        return None
    return result


def _first_least(errors: np.ndarray) -> np.ndarray:
    """Index [1, ...] along axis 0 of each block's candidate that one-at-a-time replacement (a candidate
    replaces the best so far when its error is strictly less) ends with: the first least error, NaN
    errors never chosen, and the first candidate kept while its own error is NaN."""
    nan = np.isnan(errors)
    pick = np.argmin(np.where(nan, np.float32(np.inf), errors) if nan.any() else errors, axis=0)
    if nan.any():
        pick = np.where(nan[0], 0, pick)
    return pick[None]


def _search_offset_ranges(
    blocks: np.ndarray, fmt: BlockFormat, importance: np.ndarray | None, scale_factor: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """search_scales for float-offset blocks: the spec's [min, max] and shrunk ranges, least error wins."""
    lo = blocks.min(axis=-1)
    hi = blocks.max(axis=-1)
    span = hi - lo
    best_scales, first_offsets = choose_scales(np.stack([lo, hi], axis=-1), fmt, scale_factor)
    assert first_offsets is not None
    best_offsets: np.ndarray = first_offsets
    best_err = _block_squared_error(blocks, best_scales, best_offsets, fmt, importance, scale_factor)
    for bottom, top in OFFSET_SHRINKS:
        if bottom == 0.0 and top == 0.0:
            continue
        extremes = np.stack([lo + np.float32(bottom) * span, hi - np.float32(top) * span], axis=-1)
        scales, offsets = choose_scales(extremes.astype(np.float32), fmt, scale_factor)
        assert offsets is not None
        err = _block_squared_error(blocks, scales, offsets, fmt, importance, scale_factor)
        better = err < best_err
        if not better.any():
            continue
        best_err = np.where(better, err, best_err)
        best_scales = np.where(better, scales, best_scales)
        best_offsets = np.where(better, offsets, best_offsets)
    return best_scales, best_offsets


def quantize_tensor(
    x: np.ndarray,
    fmt: BlockFormat,
    scale_search: bool = True,
    importance: np.ndarray | None = None,
    scale_factor: float | None = None,
) -> QuantizedTensor:
    """Blockwise-quantize a 2-D x [rows, D] along its last axis; with scale_search, per-block clipped scales.
    scale_factor: float8e4m3 scales' per-tensor factor (None: x's own).

    Without scale_search this equals ``block_format.quantize(x, fmt)``.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_tensor expects a 2-D array, got shape {x.shape}")
    rows, d = x.shape
    nb = fmt.num_blocks(d)
    codes_out = np.empty((rows, fmt.row_bytes(d)), dtype=np.uint8)
    scales_out = np.empty((rows, nb), dtype=fmt.scale_dtype)
    zp_out = None if fmt.zero_point_dtype is None else np.empty((rows, nb), dtype=fmt.zero_point_dtype)
    weights = None
    if importance is not None:
        weights = _pad_to_blocks(np.asarray(importance, dtype=np.float32).reshape(1, d), fmt.block_size)[0]
    elif fmt.float_offsets and d % fmt.block_size:
        # Float-offset padding repeats the last value: give it no weight in the scale search.
        weights = _pad_to_blocks(np.ones((1, d), dtype=np.float32), fmt.block_size)[0]
    factor = default_scale_factor(x, fmt) if scale_factor is None else scale_factor
    step = max(1, _CHUNK_ELEMENTS // max(1, nb * fmt.block_size))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        blocks = pad_to_blocks(x[start:stop], fmt)
        scales, zp = (
            search_scales(blocks, fmt, importance=weights, scale_factor=factor)
            if scale_search
            else choose_scales(blocks, fmt, factor)
        )
        codes = codes_for(blocks, scales, zp, fmt, factor)
        codes = codes.reshape(stop - start, -1)[:, :d]
        codes_out[start:stop] = pack_codes(codes, fmt.bits)
        scales_out[start:stop] = scales
        if zp_out is not None:
            assert zp is not None
            zp_out[start:stop] = zp
    return QuantizedTensor(codes_out, scales_out, zp_out, d, fmt, factor)
