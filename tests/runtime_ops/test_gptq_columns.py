"""BlockGptqColumns (GPTQ's walk over one block's columns in the library): every CPU path gives the levels and
errors of its numpy specification, gptq.numpy_columns (the per-column loop with OpenBLAS's dger), bit for bit;
gptq_quantize gives the same codes, scales and zero points with and without it."""

from __future__ import annotations

import numpy as np
import pytest

from bct_onnx import gptq
from bct_onnx.block_format import BlockFormat, ScaleKind

ISAS = ["scalar", "avx2", "avx512", "avx512vnni"]


def rounder(scale: np.ndarray, zero: np.ndarray | None, fmt: BlockFormat) -> gptq._BlockRounder:
    """A _BlockRounder of the given float32 scales (their float32 inverses) and zero points."""
    r = gptq._BlockRounder.__new__(gptq._BlockRounder)
    r.fmt, r.scale, r.zero = fmt, scale, zero
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        r.inverse = (np.float32(1.0) / scale).astype(np.float32)
    r.low, r.high = np.float32(fmt.qmin), np.float32(fmt.qmax)
    return r


def hard_case(length: int, n: int, fmt: BlockFormat, seed: int):
    """A block [L, N] (float64) with the edges: ties of w / scale at .5, values rounding to -0.0, NaN and infinite
    weights, zero, tiny, negative and NaN scales; an upper-triangular hinv with a positive diagonal."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((length, n)) * np.exp(rng.uniform(-3, 1, n))
    scale = (np.abs(block).max(axis=0) / fmt.qmax * rng.uniform(0.4, 1.2, n)).astype(np.float32)
    if n > 12:
        block[:, 0] = scale[0] * (np.arange(length) % 9 - 4 + 0.5)  # exact ties
        block[:, 1] = -0.3 * scale[1]  # rounds to -0.0
        scale[2], scale[3], scale[4] = 0.0, 1e-42, -scale[4]
        scale[5] = np.nan
        block[length // 2, 6], block[-1, 7], block[0, 8] = np.nan, np.inf, -np.inf
        block[:, 9] = 0.0
    zero = None if fmt.symmetric else rng.integers(0, fmt.qmax + 1, n).astype(np.float32)
    h = np.triu(rng.standard_normal((length, length)) * 0.3, 1)
    h[np.diag_indices(length)] = rng.uniform(0.2, 2.0, length)
    return block, h, 1.0 / np.diag(h), scale, zero


@pytest.mark.parametrize("isa", ISAS)
def test_gptq_columns_isa_paths_match_the_numpy_walk(isa: str, force_isa) -> None:
    force_isa(isa)
    for bits, symmetric in ((4, True), (2, True), (8, True), (6, True), (5, False), (8, False)):
        fmt = BlockFormat(bits, 32, symmetric, ScaleKind.FLOAT32)
        session = gptq._gptq_columns_session(bits, symmetric)  # created now: the forced path
        for length, n in ((32, 600), (32, 257), (16, 33), (5, 13), (1, 1)):
            block, h, d, scale, zero = hard_case(length, n, fmt, seed=bits * 100 + n + int(symmetric))
            r = rounder(scale, zero, fmt)
            want_levels = np.empty((length, n), np.float32)
            want_errors = np.empty((length, n))
            with np.errstate(all="ignore"):
                gptq.numpy_columns(block.copy(), h, d, 0, [r] * length, want_levels, want_errors)
            feeds = {"block": block, "hinv": h, "inverse_diagonal": d, "scale": scale, "inverse": r.inverse}
            if zero is not None:
                feeds["zero_points"] = zero
            levels, errors = session.run(None, feeds)
            assert levels.dtype == np.float32 and errors.dtype == np.float64
            np.testing.assert_array_equal(levels.view(np.uint32), want_levels.view(np.uint32))  # -0.0 and NaN bits too
            np.testing.assert_array_equal(np.isnan(errors), np.isnan(want_errors))
            finite = ~np.isnan(want_errors)
            np.testing.assert_array_equal(errors[finite].view(np.uint64), want_errors[finite].view(np.uint64))


@pytest.mark.parametrize("isa", ["scalar", "avx512"])
def test_gptq_quantize_gives_the_same_codes_with_and_without_the_library(isa: str, force_isa, monkeypatch) -> None:
    """Integer formats (symmetric and zero points, dead inputs kept or zeroed) through _library_columns; act-order
    and float offsets walk in numpy either way."""
    force_isa(isa)
    rng = np.random.default_rng(5)
    for fmt in (BlockFormat(4, 32, True, ScaleKind.FLOAT8E4M3), BlockFormat(5, 32, False, ScaleKind.FLOAT16),
                BlockFormat(3, 16, True, ScaleKind.FLOAT32)):
        for n, k in ((96, 160), (7, 45)):
            x = rng.standard_normal((3 * k, k)).astype(np.float32) * rng.uniform(0.1, 3, k).astype(np.float32)
            x[:, 3] = 0.0  # a dead input
            h = (x.T @ x).astype(np.float32)
            w = rng.standard_normal((n, k)).astype(np.float32)
            for keep in (False, True):
                got = []
                for failed in (False, True):
                    monkeypatch.setattr(gptq, "_COLUMN_SESSIONS", gptq._ColumnSessions())
                    gptq._COLUMN_SESSIONS.failed = failed
                    used = []
                    real = gptq._library_columns
                    monkeypatch.setattr(gptq, "_library_columns", lambda *a, real=real, used=used: used.append(real(*a)) or used[-1])
                    got.append(gptq.gptq_quantize(w, h, fmt, damping=0.1, keep_dead_inputs=keep))
                    monkeypatch.setattr(gptq, "_library_columns", real)
                    assert any(used) != failed  # the library walked the blocks, or numpy did
                a, b = got
                np.testing.assert_array_equal(a.codes, b.codes)
                np.testing.assert_array_equal(a.scales.view(np.uint8), b.scales.view(np.uint8))
                if a.zero_points is not None:
                    np.testing.assert_array_equal(a.zero_points, b.zero_points)
