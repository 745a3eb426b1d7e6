"""GPTQ (Frantar et al., 2022) rounding of a MatMul weight into the block format, post-training.

Plain rounding picks each code on its own. GPTQ walks along the reduction axis K and, after each
column is rounded, spreads that column's rounding error over the columns not yet rounded, weighted
by the inverse Hessian ``H = X^T X`` of the layer's calibration inputs, so the layer's *output*
error is what is minimised. Scales (and zero points) of a block are chosen, with the same clipped
scale search as plain rounding, when the walk reaches the block's first column. The result is an
ordinary spec-conform QuantizedTensor: the runtime never knows how the codes were chosen.

The walk is the paper's lazy-batch form, two levels deep: a column's error reaches the rest of its
quantization block at once (a rank-1 update of at most ``block_size`` columns), the rest of its
lazy batch once per block (one matmul) and the rest of the weight once per batch (one matmul).
Each column still sees every earlier column's correction before it is rounded, so the codes are
those of the textbook per-column loop (up to floating-point summation order). The matmuls are
float64 BLAS; a column costs a few in-place numpy calls on preallocated float32 arrays and one BLAS
rank-1 update; the inverse-Hessian factor is float32 LAPACK, computed once per Hessian. With
act_order the walk takes the channels by decreasing Hessian diagonal, the blocks' scales fixed
beforehand (gptq_quantize).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
from threadpoolctl import ThreadpoolController

from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    _inverse,
    choose_scales,
    default_scale_factor,
    pack_codes,
    pad_to_blocks,
    scales_to_float32,
)
from bct_onnx.weight_quantizer import search_block_column, search_scales

logger = logging.getLogger(__name__)

# Columns corrected together before the rest of the weight is (the paper's "lazy batch").
_LAZY_BATCH = 128
# Bytes of the float64 working copy of weight rows walked at once.
_CHUNK_BYTES = 1 << 25
# Threads walking chunks of rows at once. Rows are independent, so the codes do not depend on it; the
# walk's numpy calls on a column of a few hundred rows or more release the GIL, and BLAS runs on one
# thread per call (blas_controller), so two threads use both cores of a small machine.
GPTQ_THREADS = min(2, os.cpu_count() or 1)
# Fewer rows than this per thread: one thread (a column's numpy calls would be mostly interpreter time).
_MIN_THREAD_ROWS = 256


class _CoreSharing:
    """How many jobs (calibration.collect_hessians running in the background) keep the cores busy beside GPTQ.

    While one runs, GPTQ walks each weight on one thread in one chunk of rows: the float model's forward
    and the Hessian updates already use the cores, and a second GPTQ thread would only add its own cost
    (SmolLM2's weights: about a sixth more CPU on two threads, twice the per-column calls with two
    chunks) without finishing sooner. Alone, GPTQ uses GPTQ_THREADS.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs = 0

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count a job that keeps the cores busy while the block runs."""
        with self._lock:
            self._jobs += 1
        try:
            yield
        finally:
            with self._lock:
                self._jobs -= 1

    def threads(self) -> int:
        """The threads GPTQ walks a weight's rows on now."""
        return 1 if self._jobs else GPTQ_THREADS


CORE_SHARING = _CoreSharing()


@functools.cache
def blas_controller() -> ThreadpoolController:
    """The process's BLAS thread pools. GPTQ and the Hessian sums run on one BLAS thread: their
    matrices are small (K <= a few thousand) and OpenBLAS's spinning threads make Cholesky and
    triangular inversion about 8x slower on a machine whose cores are busy (measured on 2 cores).

    scipy's OpenBLAS (a library of its own, beside numpy's) is loaded first: a controller only
    limits the libraries loaded when it is made, and an unlimited scipy made every rank-1 update of
    the GPTQ walk wake a second BLAS thread (20x slower on a busy machine)."""
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS; here, not at import: see inverse_hessian_factor)

    return ThreadpoolController()


def inverse_hessian_factor(hessian: np.ndarray, damping: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of the dampened H^-1 (H^-1 = U^T U, float64), and the mask of dead inputs.

    U is computed without forming H^-1: with J the reversal permutation and J H J = L L^T,
    H^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper triangular with a positive diagonal, so it
    is the Cholesky factor (one Cholesky and one triangular inverse, a third of inv + cholesky).
    Both run through LAPACK (potrf, trtri) in float32, as in the GPTQ paper's code (2.5x faster than
    float64 at K = 1536; the codes differ in about 0.3% of the bytes, the layer's output error by
    noise: docs/results.md), and in float64 when float32 cannot factor the dampened H.
    """
    import scipy.linalg  # here, not at import: 0.3 s of every CLI start that never calibrates

    # J H J in float32 for the first attempt, the dampened diagonal summed in float64 and rounded once (as
    # the float64 matrix cast to float32 would be); the float64 matrix is built only if float32 fails.
    h32 = _tiled_copy(hessian[::-1, ::-1], np.float32, "F")
    diagonal = np.diag_indices_from(h32)
    h_diagonal = np.diagonal(hessian).astype(np.float64)[::-1].copy()
    dead = h_diagonal[::-1] == 0
    h_diagonal[h_diagonal == 0] = 1.0
    mean_diag = float(np.mean(h_diagonal))
    damp = damping * (mean_diag if mean_diag > 0 else 1.0)
    h_diagonal += damp
    lapack = scipy.linalg.lapack
    # One BLAS thread, also when called on its own: multithreaded LAPACK rounds differently.
    with blas_controller().limit(limits=1, user_api="blas"):
        for _ in range(4):  # grow the damping until H is positive definite
            for potrf, trtri, dtype in (
                (lapack.spotrf, lapack.strtri, np.float32),
                (lapack.dpotrf, lapack.dtrtri, np.float64),
            ):
                if dtype is np.float32:
                    h32[diagonal] = h_diagonal.astype(np.float32)
                    h = h32
                else:
                    h = np.array(hessian[::-1, ::-1], dtype=np.float64, order="F")
                    h[diagonal] = h_diagonal
                inverse_lower = _inverse_cholesky_without_gil(h) if dtype is np.float32 else None
                if inverse_lower is None:
                    lower, info = potrf(h, lower=1, clean=1, overwrite_a=0)
                    if info != 0:
                        continue
                    inverse_lower, info = trtri(lower, lower=1, overwrite_c=1)
                    if info != 0:
                        continue
                elif inverse_lower.size == 0:  # not positive definite, or a singular factor
                    continue
                if np.isfinite(inverse_lower).all():
                    return _tiled_copy(inverse_lower[::-1, ::-1], np.float64, "C"), dead
            h_diagonal += damp
            damp *= 10
    raise np.linalg.LinAlgError("GPTQ: the calibration Hessian is not positive definite even after damping")


def _inverse_cholesky_without_gil(h: np.ndarray) -> np.ndarray | None:
    """The float32 attempt of inverse_hessian_factor: L^-1 of the lower Cholesky factor L of h (float32,
    Fortran order, not changed), its strict upper triangle zero, by the LAPACK routines (spotrf, strtri)
    that scipy.linalg.lapack's wrappers run, the same arguments (so the same bits; clean=1's zeroing of the
    upper triangle included), called through ctypes, which releases the GIL meanwhile (the calibration
    forward's and Hessian updates' Python go on). An empty array when spotrf or strtri fails; None when the
    routines are not found (the caller then uses the wrappers)."""
    potrf, trtri = _lapack_routine("spotrf"), _lapack_routine("strtri")
    n = h.shape[0]
    if potrf is None or trtri is None or h.dtype != np.float32 or not h.flags.f_contiguous or not 0 < n < 2**31:
        return None
    a = np.array(h, order="F")
    size, info = ctypes.c_int(n), ctypes.c_int(0)
    potrf(ctypes.byref(_LOWER), ctypes.byref(size), a.ctypes.data, ctypes.byref(size), ctypes.byref(info))
    if info.value != 0:
        return np.empty(0, np.float32)
    rows = a.T  # C order: row i of a.T is column i of a; its entries before i are a's strict upper triangle
    for i in range(1, n):
        rows[i, :i] = 0.0
    trtri(ctypes.byref(_LOWER), ctypes.byref(_NON_UNIT), ctypes.byref(size), a.ctypes.data, ctypes.byref(size),
          ctypes.byref(info))
    if info.value != 0:
        return np.empty(0, np.float32)
    return a


_LOWER, _NON_UNIT = ctypes.c_char(b"L"), ctypes.c_char(b"N")


@functools.cache
def _lapack_routine(name: str) -> Callable[..., None] | None:
    """A routine of scipy.linalg.cython_lapack (the LAPACK of scipy.linalg.lapack's wrappers) as a ctypes
    function of pointer arguments, which releases the GIL while it runs; None when scipy does not export it."""
    try:
        from scipy.linalg import cython_lapack

        return _capsule_function(cython_lapack.__pyx_capi__[name])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001  (another scipy: its wrappers are used)
        return None


def _capsule_function(capsule: object) -> Callable[..., None] | None:
    """The C function (void, pointer arguments only) a Cython C-API capsule holds, as a ctypes function
    (ctypes releases the GIL for the call)."""
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    signature = api.PyCapsule_GetName(capsule)
    address = api.PyCapsule_GetPointer(capsule, signature)
    if not address or signature is None or not signature.startswith(b"void ("):
        return None
    arguments = signature.count(b"*")  # every argument is a pointer
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * arguments))(address)


# Rows and columns of the tiles _tiled_copy copies at once.
_COPY_TILE = 64


def _tiled_copy(source: np.ndarray, dtype: type, order: str) -> np.ndarray:
    """np.array(source, dtype=dtype, order=order) of a 2-D array, copied tile by tile.

    A copy whose source is laid out across the destination's order (a transpose, a reversed
    Hessian into Fortran order) reads one element per cache line when done in one pass; in tiles of
    _COPY_TILE x _COPY_TILE both sides stay in cache (K = 1536: 33 -> 13 ms). The same values.
    """
    rows, columns = source.shape
    out = np.empty(source.shape, dtype=dtype, order=order)
    if rows * columns <= _COPY_TILE * _COPY_TILE:
        out[...] = source
        return out
    for i in range(0, rows, _COPY_TILE):
        for j in range(0, columns, _COPY_TILE):
            out[i : i + _COPY_TILE, j : j + _COPY_TILE] = source[i : i + _COPY_TILE, j : j + _COPY_TILE]
    return out


class _FactorOfLastHessian:
    """inverse_hessian_factor of the last Hessian array asked for, while that array lives.

    MatMuls reading one activation (a layer's q, k and v projections; its gate and up projections)
    are handed one Hessian object (calibration.HessianStore returns the array it loaded last), so
    its factor is computed once. Hessians are never modified in place once measured.
    """

    def __init__(self) -> None:
        self._hessian: weakref.ref[np.ndarray] | None = None
        self._key: tuple[float, bool] = (0.0, False)
        self._factor: tuple[np.ndarray, np.ndarray] | None = None

    def get(self, hessian: np.ndarray, damping: float, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """inverse_hessian_factor of hessian with its rows and columns in order (None: as they are);
        the dead mask in the original order."""
        key = (damping, order is not None)  # the order is a function of the Hessian
        if self._factor is not None and self._hessian is not None and self._hessian() is hessian and self._key == key:
            return self._factor
        self._factor = None  # drop the old factor before computing the new one
        factor, dead = inverse_hessian_factor(hessian if order is None else hessian[np.ix_(order, order)], damping)
        if order is not None:
            dead = dead[np.argsort(order)]
        try:
            self._hessian = weakref.ref(hessian, self._forget)
        except TypeError:  # not weak-referenceable (an array subclass or a view's owner): no caching
            return factor, dead
        self._key, self._factor = key, (factor, dead)
        return factor, dead

    def _forget(self, _: object) -> None:
        self._hessian, self._factor = None, None


_LAST_FACTOR = _FactorOfLastHessian()


# np.maximum then np.minimum in one ufunc call for symmetric levels (NaN passes as through those two,
# and with qmin < 0 also -0.0; with a bound of 0 clip keeps a -0.0 that np.maximum makes +0.0): np.clip's
# own wrapper costs more than the clip on a column of a few hundred rows, and the walk clips every column.
_clip = np.clip if not hasattr(np, "_core") or not hasattr(np._core, "umath") else np._core.umath.clip


class _BlockRounder:
    """Rounds the columns [n] of one quantization block (n weight rows) with the block's stored scales.

    The arithmetic of block_format.codes_for followed by dequantize_codes, in float32, written into
    preallocated arrays: the per-block work (float32 scale, its inverse, zero point) is done once,
    and each column costs a few in-place numpy calls. A column's rounded *level* is codes_for's
    value before its final cast, so the block's codes are formed once, after its last column.
    """

    def __init__(
        self, scales: np.ndarray, zero_points: np.ndarray | None, fmt: BlockFormat, scale_factor: float | None = None
    ) -> None:
        self.fmt = fmt
        self.scale = scales_to_float32(scales, fmt.scale_kind, scale_factor)
        self.inverse = _inverse(self.scale)
        self.zero = None if fmt.symmetric else np.asarray(zero_points).astype(np.float32)
        self.low = np.float32(fmt.qmin)  # 0 unless symmetric
        self.high = np.float32(fmt.qmax)

    def round(self, column: np.ndarray, level: np.ndarray, value: np.ndarray) -> None:
        """level = the column's rounded level, value = its dequantized float32 value (all [n])."""
        if self.zero is None:  # symmetric: q = clip(rne(x / scale), qmin, qmax); value = q * scale
            np.multiply(column, self.inverse, out=level, dtype=np.float32)
            np.rint(level, out=level)
            _clip(level, self.low, self.high, out=level)
            np.multiply(level, self.scale, out=value)
        elif self.fmt.float_offsets:  # q = rne(clip((x - offset) / scale, 0, qmax)); value = q * scale + offset
            np.subtract(column, self.zero, out=level, dtype=np.float32)
            np.multiply(level, self.inverse, out=level)
            np.maximum(level, self.low, out=level)
            np.minimum(level, self.high, out=level)
            np.rint(level, out=level)
            np.multiply(level, self.scale, out=value)
            np.add(value, self.zero, out=value)
        else:  # integer zero point: q = clip(rne(x / scale) + zero, 0, qmax); value = (q - zero) * scale
            np.multiply(column, self.inverse, out=level, dtype=np.float32)
            np.rint(level, out=level)
            np.add(level, self.zero, out=level)
            np.maximum(level, self.low, out=level)
            np.minimum(level, self.high, out=level)
            np.subtract(level, self.zero, out=value)
            np.multiply(value, self.scale, out=value)

    @staticmethod
    def codes_of(levels: np.ndarray, fmt: BlockFormat) -> np.ndarray:
        """Unsigned codes of rounded levels (of any blocks of fmt)."""
        if fmt.symmetric:
            levels = levels + np.float32(fmt.implicit_zero_point)
        return levels.astype(np.uint8)


def gptq_quantize(
    weight_nk: np.ndarray,
    hessian: np.ndarray,
    fmt: BlockFormat,
    *,
    damping: float = 0.01,
    scale_search: bool = True,
    keep_dead_inputs: bool = False,
    act_order: bool = False,
    weighted_scales: bool = True,
    scale_factor: float | None = None,
) -> QuantizedTensor:
    """Quantize a transposed MatMul weight [N, K] (rows are output columns) along K with GPTQ.

    hessian is the [K, K] sum of x^T x over calibration rows x of the MatMul's activation input.
    Inputs never active in calibration (zero Hessian diagonal) contribute nothing to the output, so
    their weights are zeroed, unless keep_dead_inputs (a tied embedding table, whose Gather reads
    those values too): then they are rounded plainly (no error flows into them either way).

    act_order walks the input channels in order of decreasing Hessian diagonal (the paper's
    "act-order") with "static groups": every block's scale is chosen from the weights before the
    walk, so blocks stay the format's consecutive channels. Otherwise channels go in order and a
    block's scale is chosen from the corrected weights when the walk reaches the block; with
    weighted_scales (the default; channels in order only) that search weighs each channel's squared
    rounding error by the loss GPTQ counts for it, 1 / [H^-1]_kk (_obs_weights), not equally: on
    SmolLM2-135M it lowers every layer's output error on held-out text (docs/results.md). Not with
    keep_dead_inputs: a tied table's Gather reads every channel, however little the MatMul uses it.
    scale_factor: float8e4m3 scales' per-tensor factor (None: the weight's own, from its values before
    any correction).
    """
    weight = np.asarray(weight_nk)
    if weight.ndim != 2:
        raise ValueError(f"gptq_quantize expects a 2-D weight [N, K], got shape {weight.shape}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"gptq_quantize: Hessian shape {hessian.shape} does not match K={k}")
    codes = np.empty((n, fmt.row_bytes(k)), dtype=np.uint8)
    scales = np.empty((n, fmt.num_blocks(k)), dtype=fmt.scale_dtype)
    zero_points = None if fmt.zero_point_dtype is None else np.empty(scales.shape, dtype=fmt.zero_point_dtype)
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else None
    # float8e4m3: one factor for the whole weight, from its values before any correction
    factor = default_scale_factor(weight, fmt) if scale_factor is None else scale_factor
    # Rows (output columns) are independent: walk them in chunks so the float64 working copy stays
    # small (an output projection of 49152 x 576 would take 226 MB at once) and cache-friendly; the
    # chunk's codes are packed before the next one (unpacked codes of the whole weight, and
    # pack_codes' bit planes of them, would take 10x the packed bytes).
    rows = max(1, _CHUNK_BYTES // (8 * k))
    threads = CORE_SHARING.threads()
    if n >= 2 * _MIN_THREAD_ROWS:  # one chunk per thread at least: the threads share the rows
        rows = min(rows, -(-n // threads))
        # as many chunks per thread (the output projection's 49152 rows: 8 chunks, not 7 for 2 threads)
        chunks = threads * -(-n // (threads * rows))
        rows = -(-n // chunks)

    def quantize_rows(r: int) -> None:
        # K-major: a column of the weight (one input channel over the chunk's rows) is contiguous.
        w_t = _tiled_copy(weight[r : r + rows].T, np.float64, "C")
        if not keep_dead_inputs:
            w_t[dead] = 0.0
        chunk_scales = scales[r : r + rows]
        chunk_zero_points = None if zero_points is None else zero_points[r : r + rows]
        if order is None:
            rounders: _Rounders = _ScalesWhenReached(
                fmt, scale_search, chunk_scales, chunk_zero_points, factor,
                _obs_weights(hinv) if weighted_scales and not keep_dead_inputs else None,
            )
        else:
            rounders = _StaticScales(w_t, order, fmt, scale_search, chunk_scales, chunk_zero_points, factor)
            w_t = w_t[order]
        codes_t = np.empty(w_t.shape, dtype=np.uint8)
        _gptq_walk(w_t, hinv, fmt, rounders, codes_t)
        if order is not None:
            codes_t[order] = codes_t.copy()  # back to the weight's channel order
        codes[r : r + rows] = pack_codes(codes_t.T, fmt.bits)

    with blas_controller().limit(limits=1, user_api="blas"):
        hinv, dead = _LAST_FACTOR.get(hessian, damping, order)
        starts = range(0, n, rows)
        if threads > 1 and len(starts) > 1:
            with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                list(pool.map(quantize_rows, starts))  # list(): re-raise a chunk's exception here
        else:
            for r in starts:
                quantize_rows(r)
    return QuantizedTensor(codes, scales, zero_points, k, fmt, factor)


class _Rounders(Protocol):
    def __call__(self, first: int, block: np.ndarray) -> list[_BlockRounder]:
        """The rounder of every column of the walk's block of channels [first, first + len(block))."""
        ...


class _ScalesWhenReached:
    """Each block's scale chosen from the corrected weights when the walk reaches the block (written
    into scales and zero_points [rows, nb])."""

    def __init__(
        self,
        fmt: BlockFormat,
        scale_search: bool,
        scales: np.ndarray,
        zero_points: np.ndarray | None,
        scale_factor: float | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        self.fmt, self.scale_search, self.scales, self.zero_points = fmt, scale_search, scales, zero_points
        self.scale_factor = scale_factor
        self.weights = weights  # [K] weight of each channel's squared rounding error in the scale search

    def __call__(self, first: int, block: np.ndarray) -> list[_BlockRounder]:
        fmt = self.fmt
        b = first // fmt.block_size
        factor = self.scale_factor
        importance = None
        if self.weights is not None:
            importance = np.zeros(fmt.block_size, np.float32)
            importance[: len(block)] = self.weights[first : first + len(block)]
        if self.scale_search:  # the block K-major, as the walk holds it (search_scales' picks)
            s, zp = search_block_column(block, fmt, importance=importance, scale_factor=factor)
        else:
            padded_s, padded_zp = choose_scales(pad_to_blocks(block.T.astype(np.float32), fmt), fmt, factor)
            s, zp = padded_s[:, 0], None if padded_zp is None else padded_zp[:, 0]
        self.scales[:, b] = s
        if self.zero_points is not None:
            assert zp is not None
            self.zero_points[:, b] = zp
        zero = None if zp is None else self.zero_points[:, b]
        return [_BlockRounder(self.scales[:, b], zero, fmt, factor)] * len(block)


def _obs_weights(hinv: np.ndarray) -> np.ndarray:
    """1 / [H^-1]_kk of each channel when the walk reaches it (U_kk^2 of the factor U): the loss a
    rounding error of 1 in that channel adds once the later channels have absorbed what they can
    (the OBS cost GPTQ minimises), scaled to mean 1."""
    weights = 1.0 / np.square(np.diag(hinv))
    return (weights / weights.mean()).astype(np.float32)


class _StaticScales:
    """Every block's scale chosen before the walk from the weights w_t [K, rows] (K-major, channel
    order), for a walk over the channels in ``order``."""

    def __init__(
        self,
        w_t: np.ndarray,
        order: np.ndarray,
        fmt: BlockFormat,
        scale_search: bool,
        scales: np.ndarray,
        zero_points: np.ndarray | None,
        scale_factor: float | None = None,
    ) -> None:
        padded = pad_to_blocks(w_t.T.astype(np.float32), fmt)
        factor = scale_factor
        s, zp = search_scales(padded, fmt, scale_factor=factor) if scale_search else choose_scales(padded, fmt, factor)
        scales[:] = s
        if zero_points is not None:
            assert zp is not None
            zero_points[:] = zp
        self.blocks = [
            _BlockRounder(scales[:, b], None if zero_points is None else zero_points[:, b], fmt, factor)
            for b in range(scales.shape[1])
        ]
        self.block_of_step = order // fmt.block_size  # the block of the walk's i-th channel

    def __call__(self, first: int, block: np.ndarray) -> list[_BlockRounder]:
        return [self.blocks[b] for b in self.block_of_step[first : first + len(block)]]


class _ColumnSessions:
    """One ONNX Runtime session per (bits, symmetric) running one BlockGptqColumns node on one thread, opened on
    first use; None (the numpy walk instead) where the custom-op library cannot be loaded or a run fails, said
    once in the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[tuple[int, bool], Any] = {}
        self.failed = os.environ.get(NUMPY_WALK_ENV, "") not in ("", "0")

    def get(self, bits: int, symmetric: bool) -> Any:
        key = (bits, symmetric)
        with self._lock:
            if self.failed:
                return None
            if key not in self._sessions:
                try:
                    self._sessions[key] = _gptq_columns_session(bits, symmetric)
                except Exception as error:  # noqa: BLE001  (no library, or an ONNX Runtime without it)
                    logger.info("BlockGptqColumns unavailable (%s): GPTQ's columns are walked in numpy", error)
                    self.failed = True
                    return None
            return self._sessions[key]


# Set (to anything but 0) to walk every block's columns in numpy, the specification of BlockGptqColumns.
NUMPY_WALK_ENV = "BCT_ONNX_GPTQ_NUMPY_WALK"
_COLUMN_SESSIONS = _ColumnSessions()


def _gptq_columns_session(bits: int, symmetric: bool) -> Any:
    import onnx

    from bct_onnx import ops, runtime

    helper = onnx.helper
    double, single = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
    inputs = [("block", double, ["L", "N"]), ("hinv", double, ["L", "L"]), ("inverse_diagonal", double, ["L"]),
              ("scale", single, ["N"]), ("inverse", single, ["N"])]
    if not symmetric:
        inputs.append(("zero_points", single, ["N"]))
    node = helper.make_node(
        ops.BLOCK_GPTQ_COLUMNS, [name for name, _, _ in inputs], ["levels", "errors"], domain=ops.DOMAIN,
        bits=bits, symmetric=int(symmetric),
    )
    graph = helper.make_graph(
        [node], "gptq_columns", [helper.make_tensor_value_info(*spec) for spec in inputs],
        [helper.make_tensor_value_info("levels", single, ["L", "N"]),
         helper.make_tensor_value_info("errors", double, ["L", "N"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)]
    )
    return runtime.session(model.SerializeToString(), ["CPUExecutionProvider"], threads=1, quiet=True)


def _library_columns(
    block: np.ndarray, hinv: np.ndarray, inverse_diagonal: np.ndarray, first: int, column_rounders: list[_BlockRounder],
    levels: np.ndarray, errors: np.ndarray,
) -> bool:
    """The per-column walk of _gptq_walk over one block by the library's BlockGptqColumns: levels[:L] and
    errors[:L] written as the numpy loop writes them (the same bits; the block's own corrected values, which
    the walk never reads again, are not written back). False (nothing done) where the op does not apply
    (float offsets, per-column rounders of act_order, no library): the numpy loop then runs."""
    rounder = column_rounders[0]
    fmt = rounder.fmt
    if fmt.float_offsets or any(other is not rounder for other in column_rounders):
        return False
    session = _COLUMN_SESSIONS.get(fmt.bits, fmt.symmetric)
    if session is None:
        return False
    length, n = block.shape
    last = first + length
    feeds = {
        "block": np.ascontiguousarray(block), "hinv": np.ascontiguousarray(hinv[first:last, first:last]),
        "inverse_diagonal": np.ascontiguousarray(inverse_diagonal[first:last]),
        "scale": np.ascontiguousarray(rounder.scale, dtype=np.float32).reshape(n),
        "inverse": np.ascontiguousarray(rounder.inverse, dtype=np.float32).reshape(n),
    }
    if rounder.zero is not None:
        feeds["zero_points"] = np.ascontiguousarray(rounder.zero, dtype=np.float32).reshape(n)
    try:
        got_levels, got_errors = session.run(None, feeds)
    except Exception as error:  # noqa: BLE001  (onnxruntime raises its own exception types)
        logger.warning("BlockGptqColumns failed (%s): GPTQ's columns are walked in numpy from now on", error)
        _COLUMN_SESSIONS.failed = True
        return False
    levels[:length] = got_levels
    errors[:length] = got_errors
    return True


def numpy_columns(
    block: np.ndarray, hinv: np.ndarray, inverse_diagonal: np.ndarray, first: int, column_rounders: list[_BlockRounder],
    levels: np.ndarray, errors: np.ndarray,
) -> None:
    """The walk over one block's columns block [L, rows] (float64, K-major, corrected in place; the walk's
    channels first .. first + L): column i rounded by column_rounders[i] into levels[i], its scaled error
    (w - value) / [H^-1]_ii into errors[i] (float64), spread over the block's later columns by one BLAS
    rank-1 update. The numpy specification of the library's BlockGptqColumns (_library_columns)."""
    import scipy.linalg

    value = np.empty(block.shape[1], dtype=np.float32)  # dequantized values of the current column
    last = first + block.shape[0]
    for col in range(first, last):
        i = col - first
        err = errors[i]
        column_rounders[i].round(block[i], levels[i], value)
        np.subtract(block[i], value, out=err)
        np.multiply(err, inverse_diagonal[col], out=err)
        if col + 1 < last:  # block[i + 1:] -= outer(hinv[col, col + 1:last], err), in place
            scipy.linalg.blas.dger(-1.0, err, hinv[col, col + 1 : last], a=block[i + 1 :].T, overwrite_a=1)


def _gptq_walk(w_t: np.ndarray, hinv: np.ndarray, fmt: BlockFormat, rounders: _Rounders, codes_t: np.ndarray) -> None:
    """The GPTQ walk over a K-major working copy w_t [K, rows] of weight rows (corrected in place; in
    walk order, hinv's order) writing their unpacked codes codes_t [K, rows] (in walk order)."""
    k, n = w_t.shape
    bs = fmt.block_size
    batch = bs * max(1, _LAZY_BATCH // bs)  # a multiple of the block size: blocks never straddle batches
    errors = np.empty((batch, n), dtype=w_t.dtype)  # scaled rounding errors of the current batch
    levels = np.empty((bs, n), dtype=np.float32)  # rounded levels of the current block
    inverse_diagonal = 1.0 / np.diag(hinv)

    for start in range(0, k, batch):
        stop = min(k, start + batch)
        for first in range(start, stop, bs):
            last = min(first + bs, k)
            block = w_t[first:last]  # a view: corrections inside the block land in w_t
            column_rounders = rounders(first, block)
            if not _library_columns(block, hinv, inverse_diagonal, first, column_rounders, levels, errors[first - start :]):
                numpy_columns(block, hinv, inverse_diagonal, first, column_rounders, levels, errors[first - start :])
            codes_t[first:last] = _BlockRounder.codes_of(levels[: last - first], fmt)
            if last < stop:  # the rest of the batch, once per block
                w_t[last:stop] -= hinv[first:last, last:stop].T @ errors[first - start : last - start]
        if stop < k:  # the rest of the weight, once per batch
            w_t[stop:] -= hinv[start:stop, stop:].T @ errors[: stop - start]
