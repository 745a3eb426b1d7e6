"""BlockGather on CPU against the spec: rows of block_format.dequantize(table), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from bct_onnx.block_format import KERNEL_SCALE_KINDS, BlockFormat, ScaleKind, dequantize, quantize

CASES = [
    # (bits, block_size, axis_size): 4/8-bit fast paths, odd block sizes, odd D, every width
    (4, 32, 768),
    (4, 16, 70),
    (4, 8, 37),
    (8, 16, 100),
    (8, 5, 33),
    (4, 5, 33),
    (2, 8, 64),
    (3, 8, 37),
    (5, 6, 41),
    (6, 32, 96),
    (7, 3, 29),
]


def _table(fmt: BlockFormat, rows: int, axis_size: int, seed: int):
    x = np.random.default_rng(seed).standard_normal((rows, axis_size)).astype(np.float32)
    return quantize(x, fmt)


@pytest.mark.parametrize("bits,block_size,axis_size", CASES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kind", KERNEL_SCALE_KINDS, ids=lambda k: k.value)
def test_gather_matches_spec(kit, bits, block_size, axis_size, symmetric, kind) -> None:
    fmt = BlockFormat(bits, block_size, symmetric, kind)
    table = _table(fmt, 23, axis_size, seed=bits * 31 + axis_size)
    indices = np.array([[0, 22, -1, 5], [7, -23, 3, 3]], np.int64)
    (got,) = kit.run(kit.gather_model(fmt, axis_size, table), {"indices": indices})
    kit.assert_bits_equal(got, dequantize(table)[indices], "y")


@pytest.mark.parametrize("index_type", [TensorProto.INT32, TensorProto.INT64])
def test_gather_index_types_and_shapes(kit, index_type) -> None:
    fmt = BlockFormat(4, 32, True, ScaleKind.FLOAT16)
    table = _table(fmt, 50, 64, seed=1)
    dtype = np.int32 if index_type == TensorProto.INT32 else np.int64
    model = kit.gather_model(fmt, 64, table, index_type=index_type)
    full = dequantize(table)
    for indices in (
        np.array(7, dtype),
        np.array([], dtype),
        np.arange(-50, 50, dtype=dtype).reshape(2, 5, 10),
    ):
        (got,) = kit.run(model, {"indices": indices})
        kit.assert_bits_equal(got, full[indices], f"y for indices shape {indices.shape}")


def test_gather_many_rows_parallel(kit) -> None:
    """An embedding-sized lookup (many rows, split over threads)."""
    fmt = BlockFormat(4, 32, True, ScaleKind.FLOAT16)
    table = _table(fmt, 1000, 768, seed=2)
    indices = np.random.default_rng(3).integers(0, 1000, (8, 128))
    (got,) = kit.run(kit.gather_model(fmt, 768, table), {"indices": indices})
    kit.assert_bits_equal(got, dequantize(table)[indices], "y")


@pytest.mark.parametrize("bits,block_size,axis_size", CASES)
@pytest.mark.parametrize("kind", KERNEL_SCALE_KINDS, ids=lambda k: k.value)
def test_gather_float_offsets_matches_spec(kit, bits, block_size, axis_size, kind) -> None:
    """Float-offset tables (float16 offsets, float32 with float32 scales), partial blocks, every width."""
    fmt = BlockFormat(bits, block_size, False, kind, "float")
    table = _table(fmt, 23, axis_size, seed=bits * 37 + axis_size)
    assert table.zero_points is not None and table.zero_points.dtype == fmt.zero_point_dtype
    indices = np.array([[0, 22, -1, 5], [7, -23, 3, 3]], np.int64)
    (got,) = kit.run(kit.gather_model(fmt, axis_size, table), {"indices": indices})
    kit.assert_bits_equal(got, dequantize(table)[indices], "y")


def test_gather_float_offsets_bad_dtype(kit) -> None:
    fmt = BlockFormat(4, 8, False, ScaleKind.FLOAT16, "float")
    table = _table(fmt, 5, 16, seed=3)
    bad = type(table)(table.codes, table.scales, table.zero_points.astype(np.float64), 16, fmt)
    model = kit.gather_model(fmt, 16, bad, node_name="bad_gather")
    with pytest.raises(
        Exception, match="bct_onnx BlockGather node 'bad_gather': input 'zero_points' must be uint8"
    ):
        kit.run(model, {"indices": np.array([1], np.int64)})
