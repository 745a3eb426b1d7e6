"""Builders of one-node models for the custom-op kernels, run through bct_onnx.session.

The numpy module bct_onnx.block_format is the specification: tests compare every kernel output with
it bit-exactly (as raw bits, NaN-safe), each output on its own.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from support import assert_bits_equal, run

from bct_onnx.block_format import BlockFormat, ScaleKind
from bct_onnx.ops import BLOCK_DEQUANTIZE, BLOCK_GATHER, BLOCK_QUANTIZE, DOMAIN

SCALE_TENSOR_TYPES = {
    ScaleKind.FLOAT16: TensorProto.FLOAT16,
    ScaleKind.FLOAT32: TensorProto.FLOAT,
    ScaleKind.POW2: TensorProto.UINT8,
    ScaleKind.FLOAT8E5M2: TensorProto.FLOAT8E5M2,
    ScaleKind.FLOAT8E4M3: TensorProto.FLOAT8E4M3FN,
}
NUMPY_TO_ONNX = {
    np.dtype(ml_dtypes.float8_e5m2): TensorProto.FLOAT8E5M2,
    np.dtype(ml_dtypes.float8_e4m3fn): TensorProto.FLOAT8E4M3FN,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
}


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return model.SerializeToString()


def _value(name: str, elem_type: int, shape: Sequence[Any] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, None if shape is None else list(shape))


def quantize_model(
    fmt: BlockFormat,
    rank: int = 2,
    node_name: str = "quantize_node",
    x_type: int = TensorProto.FLOAT,
    **extra_attrs: Any,
) -> bytes:
    """BlockQuantize(x) -> codes, scales[, zero_points] with symbolic input dims."""
    outputs = ["codes", "scales"] + ([] if fmt.symmetric else ["zero_points"])
    attrs = {
        "bits": fmt.bits,
        "block_size": fmt.block_size,
        "symmetric": int(fmt.symmetric),
        "scale_kind": fmt.scale_kind.value,
    }
    attrs.update(extra_attrs)
    node = helper.make_node(BLOCK_QUANTIZE, ["x"], outputs, domain=DOMAIN, name=node_name, **attrs)
    out_info = [
        _value("codes", TensorProto.UINT8, None),
        _value("scales", SCALE_TENSOR_TYPES[fmt.scale_kind], None),
    ]
    if not fmt.symmetric:
        out_info.append(_value("zero_points", TensorProto.UINT8, None))
    dims = [f"d{i}" for i in range(rank)]
    return _model([node], [_value("x", x_type, dims)], out_info)


def dequantize_model(
    fmt: BlockFormat,
    axis_size: int,
    scale_type: int | None = None,
    node_name: str = "dequantize_node",
    with_zero_points: bool | None = None,
    zero_point_type: int | None = None,
    **extra_attrs: Any,
) -> bytes:
    """BlockDequantize(codes, scales[, zero_points]) -> y (zero_points typed by fmt unless given)."""
    with_zp = (not fmt.symmetric) if with_zero_points is None else with_zero_points
    inputs = ["codes", "scales"] + (["zero_points"] if with_zp else [])
    attrs = {
        "bits": fmt.bits,
        "block_size": fmt.block_size,
        "symmetric": int(fmt.symmetric),
        "axis_size": axis_size,
    }
    attrs.update(extra_attrs)
    node = helper.make_node(BLOCK_DEQUANTIZE, inputs, ["y"], domain=DOMAIN, name=node_name, **attrs)
    st = SCALE_TENSOR_TYPES[fmt.scale_kind] if scale_type is None else scale_type
    in_info = [_value("codes", TensorProto.UINT8, None), _value("scales", st, None)]
    if with_zp:
        zp_dtype = fmt.zero_point_dtype or np.dtype(np.uint8)  # float offsets: float16 / float32
        zp_type = NUMPY_TO_ONNX[zp_dtype] if zero_point_type is None else zero_point_type
        in_info.append(_value("zero_points", zp_type, None))
    return _model([node], in_info, [_value("y", TensorProto.FLOAT, None)])


def gather_model(
    fmt: BlockFormat,
    axis_size: int,
    table: Any,
    index_type: int = TensorProto.INT64,
    node_name: str = "gather_node",
    codes_type: int | None = None,
    **extra_attrs: Any,
) -> bytes:
    """BlockGather(indices, codes, scales[, zero_points]) -> y with the table as initializers."""
    inits = [
        onnx.numpy_helper.from_array(table.codes, "codes"),
        onnx.numpy_helper.from_array(table.scales, "scales"),
    ]
    inputs = ["indices", "codes", "scales"]
    if table.zero_points is not None:
        inits.append(onnx.numpy_helper.from_array(table.zero_points, "zero_points"))
        inputs.append("zero_points")
    attrs = {
        "bits": fmt.bits,
        "block_size": fmt.block_size,
        "symmetric": int(fmt.symmetric),
        "axis_size": axis_size,
    }
    attrs.update(extra_attrs)
    node = helper.make_node(BLOCK_GATHER, inputs, ["y"], domain=DOMAIN, name=node_name, **attrs)
    return _model(
        [node], [_value("indices", index_type, None)], [_value("y", TensorProto.FLOAT, None)], inits
    )


# The kernels' instruction-set paths (BCT_ONNX_ISA, runtime_ops/cpu/isa.h) and the CPU flags each needs.
ISA_NEEDS = {
    "scalar": set(),
    "avx2": {"avx2", "fma"},
    "avxvnni": {"avx2", "fma", "avx_vnni"},
    "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512vnni": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    "amx": {
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512_vnni",
        "amx_tile",
        "amx_int8",
    },
    # The amx path with its tile instructions emulated in C++ (BCT_ONNX_AMX_EMULATE, cpu/isa.h): the AMX
    # kernels' blocking and epilogue on any CPU with AVX-512 VNNI.
    "amx-emulated": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CPU_FLAGS = _cpu_flags()


@pytest.fixture
def force_isa(monkeypatch: pytest.MonkeyPatch) -> Any:
    """force_isa(name): kernels created afterwards run that path (BCT_ONNX_ISA, read at kernel creation);
    a path this CPU cannot run skips the test with the flags it lacks (a forced path the CPU lacks is
    an error of the kernel, tested in test_matmul.py)."""

    def force(isa: str) -> None:
        missing = ISA_NEEDS[isa] - CPU_FLAGS
        if missing:
            pytest.skip(f"CPU lacks {sorted(missing)} for the {isa} path")
        if isa == "amx-emulated":
            monkeypatch.setenv("BCT_ONNX_AMX_EMULATE", "1")
            isa = "amx"
        monkeypatch.setenv("BCT_ONNX_ISA", isa)

    return force


@pytest.fixture
def kit() -> types.SimpleNamespace:
    """The builders above and the checks of tests/support.py, for test modules."""
    return types.SimpleNamespace(
        quantize_model=quantize_model,
        dequantize_model=dequantize_model,
        gather_model=gather_model,
        run=run,
        assert_bits_equal=assert_bits_equal,
        SCALE_TENSOR_TYPES=SCALE_TENSOR_TYPES,
        ISA_NEEDS=ISA_NEEDS,
        CPU_FLAGS=CPU_FLAGS,
    )
