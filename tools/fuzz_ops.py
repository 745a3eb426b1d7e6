"""Kernel-input fuzzer over every custom op of ai.bct_onnx: one-node graphs with bad and extreme inputs.

Every case is one node of one op (valid inputs built from the numpy spec, then mutated: dtypes, ranks,
shapes, attributes out of range / missing / of the wrong type, empty tensors, NaN and +-inf, extreme
magnitudes, out-of-range Gather indices, truncated packed codes, scale and zero-point shapes that do
not match, weights as constants or as graph inputs), run by ONNX Runtime with the compiled library on
one forced CPU path (BCT_ONNX_ISA) in a forked child with a timeout and an address-space limit, and
classified:

  ok             the session ran and every output equals the numpy spec (bct_onnx.reference): bit for
                 bit (NaN payloads aside), BlockMatMul within its documented tolerance (docs/ops.md)
  clean-error    ONNX Runtime refused the model or the run with an error naming the node
  unclear-error  an error that does not name the node, or a Python exception of our own code
  refused        an error on an input the spec defines (valid shapes and attributes, values anything)
  wrong-result   the session ran, but an output differs from the spec, or the spec rejects the input
  crash          the child died of a signal (or a sanitizer report)
  hang           no result within the timeout

Usage:
  python tools/fuzz_ops.py                     # the CI seed set (seeds 0..CI_SEEDS-1), table on stdout
  python tools/fuzz_ops.py --seeds 3000        # a longer run: seeds 0..2999
  python tools/fuzz_ops.py --op BlockMatMul --json results.json
Under the sanitized build (docs/reliability.md; tests/runtime_ops/test_sanitizers.py):
  LD_PRELOAD=$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libstdc++.so) ASAN_OPTIONS=detect_leaks=0 \
  BCT_ONNX_LIBRARY=build-asan/libbct_onnx_ops.so python tools/fuzz_ops.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort  # imported before the children fork: each case then starts in milliseconds
from fuzz_common import run_forked, table
from onnx import helper, numpy_helper

from bct_onnx import ops, reference, reference_ops
from bct_onnx.block_format import (
    BlockFormat,
    QuantizedTensor,
    ScaleKind,
    ZeroPointKind,
    dequantize,
    quantize,
    scales_to_float32,
)
from bct_onnx.runtime import session

NODE = "fuzz_node"
TIMEOUT_SECONDS = 60.0  # a case needs about a second; a 2-core machine under heavy load, much more
CI_SEEDS = 400
OUTCOMES = ("ok", "clean-error", "unclear-error", "refused", "wrong-result", "crash", "hang")
FAILURES = ("unclear-error", "refused", "wrong-result", "crash", "hang", "fuzzer-error")
ISAS = ("scalar", "avx2", "avx512", "avx512vnni")
ISA_FLAGS = {
    "scalar": set(),
    "avx2": {"avx2", "fma"},
    "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512vnni": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
}
OTHER_DTYPES = (np.float64, np.float16, np.int32, np.int64, np.uint8, np.int8, np.float32)
SCALE_KINDS = (ScaleKind.FLOAT16, ScaleKind.FLOAT32, ScaleKind.POW2)


@dataclasses.dataclass
class OpCase:
    """One node: inputs by slot (None: absent, an empty name), attributes, outputs, which inputs are
    constants (initializers), the CPU path, and whether the inputs are valid (``valid``: only values
    were changed, so an error is 'refused', not 'clean-error')."""

    name: str
    op_type: str
    inputs: list[tuple[str, np.ndarray | None]]
    attrs: dict[str, Any]
    outputs: list[str]
    constants: set[str] = dataclasses.field(default_factory=set)
    isa: str = "scalar"
    valid: bool = True
    declare_shapes: bool = True

    def model(self) -> onnx.ModelProto:
        names = [name if value is not None else "" for name, value in self.inputs]
        while names and not names[-1]:
            names.pop()
        attrs = {k: v for k, v in self.attrs.items() if v is not None}
        node = helper.make_node(self.op_type, names, self.outputs, domain=ops.DOMAIN, name=NODE)
        node.attribute.extend(_attribute(k, v) for k, v in attrs.items())
        inputs, inits = [], []
        for name, value in self.inputs:
            if value is None or name not in names:
                continue
            if name in self.constants:
                inits.append(numpy_helper.from_array(value, name))
            else:
                shape = list(value.shape) if self.declare_shapes else None
                inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), shape))
        outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in self.outputs]
        graph = helper.make_graph([node], "fuzz", inputs, outputs, initializer=inits)
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)], ir_version=9
        )

    def feeds(self) -> dict[str, np.ndarray]:
        return {n: v for n, v in self.inputs if v is not None and n not in self.constants}


def _attribute(name: str, value: Any) -> onnx.AttributeProto:
    if isinstance(value, onnx.AttributeProto):
        copy_ = copy.deepcopy(value)
        copy_.name = name
        return copy_
    return helper.make_attribute(name, value)


# ---- valid cases of every op (built with the spec) ----------------------------------------------------

def _floats(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) * rng.choice([0.1, 1.0, 10.0])).astype(np.float32)


def _fmt(r: random.Random, symmetric: bool | None = None, offsets: bool = False) -> BlockFormat:
    sym = r.random() < 0.6 if symmetric is None else symmetric
    kind = ZeroPointKind.FLOAT if (offsets and not sym and r.random() < 0.5) else ZeroPointKind.INTEGER
    scale_kind = r.choice(SCALE_KINDS)
    if kind is ZeroPointKind.FLOAT and scale_kind is ScaleKind.POW2:
        scale_kind = ScaleKind.FLOAT16
    return BlockFormat(r.randint(2, 8), r.choice([1, 3, 4, 8, 16, 32, 64]), sym, scale_kind, kind)


def _operand(r: random.Random, rng: np.random.Generator, prefix: str, x: np.ndarray, attrs: dict[str, Any]):
    """Inputs 0..2 of the operand convention for x: float, or quantized (in_* attributes set)."""
    if r.random() < 0.6:
        return [(prefix, x), (f"{prefix}_scales", None), (f"{prefix}_zero_points", None)]
    fmt = _fmt(r)
    q = quantize(x, fmt)
    attrs.update(in_bits=fmt.bits, in_block_size=fmt.block_size, in_symmetric=int(fmt.symmetric))
    d = x.shape[-1]
    attrs["in_axis_size"] = d if (r.random() < 0.7 or d * fmt.bits % 8) else 0
    return [(prefix, q.codes), (f"{prefix}_scales", q.scales), (f"{prefix}_zero_points", q.zero_points)]


def _out_attrs(r: random.Random, attrs: dict[str, Any]) -> list[str]:
    if r.random() < 0.6:
        return ["Y"]
    fmt = _fmt(r)
    attrs.update(out_bits=fmt.bits, out_block_size=fmt.block_size, out_symmetric=int(fmt.symmetric),
                 out_scale_kind=fmt.scale_kind.value)
    return ["Y", "Y_scales"] + ([] if fmt.symmetric else ["Y_zero_points"])


def _batch(r: random.Random) -> tuple[int, ...]:
    return tuple(r.choice([1, 2, 3]) for _ in range(r.randint(0, 2)))


def base_quantize(r, rng) -> OpCase:
    fmt = _fmt(r)
    x = _floats(rng, _batch(r) + (r.randint(1, 70),))
    attrs = dict(bits=fmt.bits, block_size=fmt.block_size, symmetric=int(fmt.symmetric), scale_kind=fmt.scale_kind.value)
    outputs = ["codes", "scales"] + ([] if fmt.symmetric else ["zero_points"])
    return OpCase("", ops.BLOCK_QUANTIZE, [("X", x)], attrs, outputs)


def _stored(r, rng, rows: tuple[int, ...], d: int) -> tuple[BlockFormat, QuantizedTensor]:
    fmt = _fmt(r, offsets=True)
    return fmt, quantize(_floats(rng, rows + (d,)), fmt)


def base_dequantize(r, rng) -> OpCase:
    d = r.randint(1, 70)
    fmt, q = _stored(r, rng, _batch(r) + (r.randint(1, 4),), d)
    attrs = dict(bits=fmt.bits, block_size=fmt.block_size, symmetric=int(fmt.symmetric), axis_size=d)
    inputs = [("codes", q.codes), ("scales", q.scales), ("zero_points", q.zero_points)]
    return OpCase("", ops.BLOCK_DEQUANTIZE, inputs, attrs, ["Y"], constants=_some_constants(r, inputs))


def _some_constants(r: random.Random, inputs) -> set[str]:
    return {name for name, value in inputs if value is not None} if r.random() < 0.5 else set()


def base_gather(r, rng) -> OpCase:
    d, v = r.randint(1, 70), r.randint(1, 12)
    fmt, q = _stored(r, rng, (v,), d)
    index_type = r.choice([np.int64, np.int32])
    indices = np.asarray(rng.integers(-v, v, size=_batch(r) + (r.randint(1, 5),)), index_type)
    attrs = dict(bits=fmt.bits, block_size=fmt.block_size, symmetric=int(fmt.symmetric), axis_size=d)
    table_inputs = [("codes", q.codes), ("scales", q.scales), ("zero_points", q.zero_points)]
    constants = {n for n, value in table_inputs if value is not None} if r.random() < 0.7 else set()
    return OpCase("", ops.BLOCK_GATHER, [("indices", indices), *table_inputs], attrs, ["Y"], constants=constants)


def base_matmul(r, rng) -> OpCase:
    k, n = r.randint(1, 80), r.randint(1, 24)
    fmt, w = _stored(r, rng, (n,), k)
    act_bits = r.choice([0, 0, 8, 8, 4, 6])
    attrs = dict(K=k, N=n, bits=fmt.bits, block_size=fmt.block_size, symmetric=int(fmt.symmetric), act_bits=act_bits)
    if act_bits and fmt.block_size * ((1 << fmt.bits) - 1) * (1 << (act_bits - 1)) >= 2**31:
        attrs["act_bits"] = 0
    a = _floats(rng, _batch(r) + (r.randint(1, 5), k))
    a_in = _operand(r, rng, "A", a, attrs)
    if "in_axis_size" in attrs:  # BlockMatMul's D is K; the operand's slots 1, 2 move to inputs 5, 6
        attrs["in_axis_size"] = r.choice([0, k]) if k * attrs["in_bits"] % 8 == 0 else k
        if r.random() < 0.4 and attrs["act_bits"]:  # the kernel's own run-time format: codes used as they are
            q = quantize(a, BlockFormat(attrs["act_bits"], fmt.block_size, True, ScaleKind.FLOAT32))
            attrs.update(in_bits=attrs["act_bits"], in_block_size=fmt.block_size, in_symmetric=1)
            a_in = [("A", q.codes), ("A_scales", q.scales), ("A_zero_points", None)]
    bias = _floats(rng, (n,)) if r.random() < 0.5 else None
    weights = [("W_codes", w.codes), ("W_scales", w.scales), ("W_zero_points", w.zero_points)]
    inputs = [a_in[0], *weights, ("bias", bias), a_in[1], a_in[2]]
    outputs = _out_attrs(r, attrs)
    constants = {name for name, value in weights if value is not None} if r.random() < 0.6 else set()
    if bias is not None and constants and r.random() < 0.5:
        constants.add("bias")
    return OpCase("", ops.BLOCK_MATMUL, inputs, attrs, outputs, constants=constants)


def _row_op(op_type: str, extra) -> Any:
    def build(r, rng) -> OpCase:
        x = _floats(rng, _batch(r) + (r.randint(1, 4), r.randint(1, 70)))
        attrs: dict[str, Any] = {}
        inputs = _operand(r, rng, "X", x, attrs)
        inputs += extra(r, rng, x.shape[-1], attrs)
        return OpCase("", op_type, inputs, attrs, _out_attrs(r, attrs))
    return build


def _gelu_extra(r, rng, d, attrs):
    attrs["approximate"] = r.choice(["none", "tanh", None])
    return []


def _norm_extra(with_bias: bool):
    def extra(r, rng, d, attrs):
        attrs["epsilon"] = r.choice([1e-5, 1e-6, 0.0, None])
        scale = [("scale", _floats(rng, (d,)))]
        return scale + ([("bias", _floats(rng, (d,)) if r.random() < 0.7 else None)] if with_bias else [])
    return extra


def base_act_matmul(r, rng) -> OpCase:
    m, k, n = r.randint(1, 6), r.randint(1, 70), r.randint(1, 8)
    batch = _batch(r)
    transpose_b = r.random() < 0.5
    a = _floats(rng, batch + (m, k))
    b = _floats(rng, batch + ((n, k) if transpose_b else (k, n)))
    attrs: dict[str, Any] = dict(act_bits=r.randint(2, 8), block_size=r.choice([1, 4, 16, 32, 64]), transpose_b=int(transpose_b))
    inputs = _operand(r, rng, "A", a, attrs) + [("B", b)]
    return OpCase("", ops.BLOCK_ACT_MATMUL, inputs, attrs, _out_attrs(r, attrs))


BASES = {
    ops.BLOCK_QUANTIZE: base_quantize,
    ops.BLOCK_DEQUANTIZE: base_dequantize,
    ops.BLOCK_GATHER: base_gather,
    ops.BLOCK_MATMUL: base_matmul,
    ops.BLOCK_GELU: _row_op(ops.BLOCK_GELU, _gelu_extra),
    ops.BLOCK_SILU: _row_op(ops.BLOCK_SILU, lambda r, rng, d, attrs: []),
    ops.BLOCK_SOFTMAX: _row_op(ops.BLOCK_SOFTMAX, lambda r, rng, d, attrs: []),
    ops.BLOCK_LAYER_NORM: _row_op(ops.BLOCK_LAYER_NORM, _norm_extra(True)),
    ops.BLOCK_RMS_NORM: _row_op(ops.BLOCK_RMS_NORM, _norm_extra(False)),
    ops.BLOCK_ACT_MATMUL: base_act_matmul,
}
if set(BASES) != set(ops.OP_TYPES):
    raise ImportError(f"fuzz_ops has no base case for {sorted(set(ops.OP_TYPES) - set(BASES))}")


# ---- mutations ---------------------------------------------------------------------------------------

def _present(case: OpCase) -> list[int]:
    return [i for i, (_, v) in enumerate(case.inputs) if v is not None]


def _set(case: OpCase, i: int, value: np.ndarray | None) -> None:
    case.inputs[i] = (case.inputs[i][0], value)


def _float_inputs(case: OpCase) -> list[int]:
    return [i for i in _present(case) if case.inputs[i][1].dtype == np.float32]


def mutate_nonfinite(case: OpCase, r: random.Random) -> str:
    spots = _float_inputs(case)
    if not spots:
        return "none"
    i = r.choice(spots)
    value = case.inputs[i][1].copy()
    if value.size:
        special = r.choice([np.nan, np.inf, -np.inf])
        flat = value.reshape(-1)
        for _ in range(r.randint(1, 3)):
            flat[r.randrange(flat.size)] = special
    _set(case, i, value)
    return f"non-finite {case.inputs[i][0]}"


def mutate_magnitude(case: OpCase, r: random.Random) -> str:
    spots = _float_inputs(case)
    if not spots:
        return "none"
    i = r.choice(spots)
    factor = r.choice([1e30, 1e36, 3e37, 1e38, 3.3e38, 1e-30, 1e-40, 1e-45, 0.0])
    with np.errstate(all="ignore"):
        value = (case.inputs[i][1].astype(np.float64) * factor).astype(np.float32)
    if r.random() < 0.5 and value.size:  # one big element among normal ones
        value = case.inputs[i][1].copy()
        value.reshape(-1)[r.randrange(value.size)] = np.float32(r.choice([3.4e38, -3.4e38, 1e38, 1.5e-45]))
    _set(case, i, value)
    return f"magnitude {case.inputs[i][0]} x{factor:g}"


def mutate_empty(case: OpCase, r: random.Random) -> str:
    """A zero leading (batch) dim on the run-time operands, consistently: still a valid call."""
    per_row = {ops.BLOCK_GATHER: ["indices"], ops.BLOCK_MATMUL: ["A", "A_scales", "A_zero_points"],
               ops.BLOCK_ACT_MATMUL: ["A", "A_scales", "A_zero_points"]}.get(case.op_type)
    names = per_row or [n for n in ("X", "X_scales", "X_zero_points", "codes", "scales", "zero_points") if n]
    if case.op_type == ops.BLOCK_ACT_MATMUL:
        batch_nd = case.inputs[0][1].ndim - 2 if case.inputs[0][1] is not None else 0
        if batch_nd == 0 or r.random() < 0.5:  # M = 0
            for i, (n, v) in enumerate(case.inputs):
                if n in names and v is not None and v.ndim >= 2:
                    _set(case, i, v[..., :0, :])
            return "empty M"
        names = ["A", "A_scales", "A_zero_points", "B"]
    for i, (n, v) in enumerate(case.inputs):
        if n in names and v is not None and v.ndim >= (1 if case.op_type == ops.BLOCK_GATHER else 2):
            _set(case, i, v[:0])
    case.constants -= set(names)
    return "empty batch"


def mutate_dtype(case: OpCase, r: random.Random) -> str:
    if not _present(case):
        return "none"
    i = r.choice(_present(case))
    value = case.inputs[i][1]
    dtype = r.choice([d for d in OTHER_DTYPES if np.dtype(d) != value.dtype])
    with np.errstate(invalid="ignore", over="ignore"):
        _set(case, i, value.astype(dtype))
    case.valid = False
    return f"dtype {case.inputs[i][0]} {np.dtype(dtype).name}"


def mutate_rank(case: OpCase, r: random.Random) -> str:
    if not _present(case):
        return "none"
    i = r.choice(_present(case))
    value = case.inputs[i][1]
    choice = r.choice(["scalar", "flat", "extra"])
    if choice == "scalar":
        value = np.asarray(value.reshape(-1)[0] if value.size else np.zeros((), value.dtype))
    elif choice == "flat":
        value = value.reshape(-1)
    else:
        value = value[None]
    _set(case, i, value)
    case.valid = False
    return f"rank {case.inputs[i][0]} {choice}"


def mutate_shape(case: OpCase, r: random.Random) -> str:
    """Change one dim of one input: truncated packed codes, scales or zero points one block short or
    long, a weight of the wrong N or K ..."""
    if not _present(case):
        return "none"
    i = r.choice([j for j in _present(case) if case.inputs[j][1].ndim > 0] or _present(case))
    value = case.inputs[i][1]
    if value.ndim == 0:
        return mutate_rank(case, r)
    axis = r.choice([value.ndim - 1, value.ndim - 1, r.randrange(value.ndim)])
    delta = r.choice([-1, 1, 2]) if value.shape[axis] > 1 else r.choice([1, 2])
    if delta < 0:
        value = np.take(value, range(value.shape[axis] - 1), axis=axis)
    else:
        pad = [(0, 0)] * value.ndim
        pad[axis] = (0, delta)
        value = np.pad(value, pad, mode="edge" if value.size else "constant")
    _set(case, i, value)
    case.valid = False
    return f"shape {case.inputs[i][0]} axis {axis} {delta:+d}"


def mutate_missing_input(case: OpCase, r: random.Random) -> str:
    if not _present(case):
        return "none"
    i = r.choice(_present(case))
    _set(case, i, None)
    case.valid = False
    return f"missing {case.inputs[i][0]}"


def mutate_extra_input(case: OpCase, r: random.Random) -> str:
    """An optional slot filled although the attributes say it is absent (zero points of a symmetric
    format, scales of a float operand)."""
    absent = [j for j, (_, v) in enumerate(case.inputs) if v is None]
    if not absent:
        return mutate_missing_input(case, r)
    i = r.choice(absent)
    _set(case, i, np.ones((1, 1), r.choice([np.uint8, np.float16, np.float32])))
    case.valid = False
    return f"unexpected {case.inputs[i][0]}"


_OPERAND = ["in_bits", "in_block_size", "in_symmetric", "in_axis_size", "out_bits", "out_block_size", "out_symmetric",
            "out_scale_kind"]
# Attributes an op reads although its base case may not set them (an attribute the op does not know
# is ignored, as ONNX Runtime does for custom ops, and the spec refuses: not a finding).
OPTIONAL_ATTRIBUTES = {
    ops.BLOCK_QUANTIZE: ["symmetric", "scale_kind"],
    ops.BLOCK_DEQUANTIZE: ["symmetric"],
    ops.BLOCK_GATHER: ["symmetric"],
    ops.BLOCK_MATMUL: ["symmetric", "act_bits", *_OPERAND],
    ops.BLOCK_GELU: ["approximate", *_OPERAND],
    ops.BLOCK_SILU: _OPERAND,
    ops.BLOCK_SOFTMAX: ["axis", *_OPERAND],
    ops.BLOCK_LAYER_NORM: ["axis", "epsilon", *_OPERAND],
    ops.BLOCK_RMS_NORM: ["axis", "epsilon", *_OPERAND],
    ops.BLOCK_ACT_MATMUL: ["transpose_b", *_OPERAND],
}
BAD_INTS = [-(2**63), -(2**31) - 1, -1, 0, 1, 9, 65537, 2**31, 2**31 + 1, 2**40, 2**63 - 1]


def mutate_attribute(case: OpCase, r: random.Random) -> str:
    names = list(case.attrs) + OPTIONAL_ATTRIBUTES.get(case.op_type, [])
    name = r.choice(names)
    how = r.choice(["int", "int", "missing", "float", "string", "ints", "tensor"])
    old = case.attrs.get(name)
    if how == "int":
        value: Any = r.choice(BAD_INTS + [2, 3, 8])
    elif how == "missing":
        value = None
    elif how == "float":
        value = r.choice([0.5, -1.0, float("nan"), float("inf"), 1e30])
    elif how == "string":
        value = r.choice(["", "float64", "none", "\u00e9", "x" * 300])
    elif how == "ints":
        value = [1, 2]
    else:
        value = helper.make_attribute(name, numpy_helper.from_array(np.ones(2, np.float32), "t"))
    case.attrs[name] = value
    case.valid = False
    shown = "tensor" if how == "tensor" else repr(value)[:24]
    return f"attribute {name}: {how} {shown} (was {str(old)[:16]})"


def mutate_index(case: OpCase, r: random.Random) -> str:
    if case.op_type != ops.BLOCK_GATHER or case.inputs[0][1] is None or case.inputs[0][1].dtype.kind != "i":
        return mutate_shape(case, r)
    v = case.inputs[1][1].shape[0] if case.inputs[1][1] is not None and case.inputs[1][1].ndim else 1
    indices = case.inputs[0][1].copy()
    bad = r.choice([v, v + 1, -v - 1, 2**31 - 1, -(2**31), 2**40, -(2**63), 2**63 - 1])
    if indices.dtype == np.int32:
        bad = int(np.clip(bad, -(2**31), 2**31 - 1))
    if indices.size:
        indices.reshape(-1)[r.randrange(indices.size)] = bad
    _set(case, 0, indices)
    case.valid = False  # refused with a message, never read
    return f"index {bad} of {v} rows"


MUTATIONS = {
    "valid": lambda case, r: "valid",
    "nonfinite": mutate_nonfinite,
    "magnitude": mutate_magnitude,
    "empty": mutate_empty,
    "dtype": mutate_dtype,
    "rank": mutate_rank,
    "shape": mutate_shape,
    "missing": mutate_missing_input,
    "extra": mutate_extra_input,
    "attribute": mutate_attribute,
    "index": mutate_index,
}


def available_isas() -> list[str]:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return [isa for isa in ISAS if ISA_FLAGS[isa] <= flags]


def make_case(seed: int, op_type: str | None = None, isas: list[str] | None = None) -> OpCase:
    """Case ``seed``: the op, its valid base, one mutation (two now and then) and the CPU path, all
    chosen by the seed."""
    r = random.Random(seed)
    rng = np.random.default_rng(seed)
    op = op_type or ops.OP_TYPES[seed % len(ops.OP_TYPES)]
    case = BASES[op](r, rng)
    kinds = list(MUTATIONS)
    done = [MUTATIONS[kind](case, r) for kind in [r.choice(kinds) for _ in range(1 if r.random() < 0.85 else 2)]]
    isas = isas or available_isas()
    case.isa = isas[(seed // len(ops.OP_TYPES)) % len(isas)]
    case.declare_shapes = r.random() < 0.7
    case.name = f"{seed}:{op}:{case.isa}:" + "+".join(done)
    return case


# ---- running one case (in the forked child) ----------------------------------------------------------

def _same(got: np.ndarray, want: np.ndarray) -> str | None:
    """None when got equals want bit for bit (any NaN equals any NaN), else the first difference."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"dtype/shape {got.dtype}{got.shape} != spec {want.dtype}{want.shape}"
    if got.dtype.kind == "f":
        g, w = got.astype(np.float32), want.astype(np.float32)
        gb, wb = g.view(np.uint32), w.view(np.uint32)
        bad = (gb != wb) & ~(np.isnan(g) & np.isnan(w))
    else:
        bad = got != want
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad.reshape(-1))[0])
    return f"{int(bad.sum())} of {bad.size} differ; first {got.reshape(-1)[i]!r} != spec {want.reshape(-1)[i]!r}"


def _matmul_check(case: OpCase, got: list[np.ndarray], want: list[np.ndarray]) -> str | None:
    """BlockMatMul: Y within (K + 4) * 2**-24 * (|A'| @ |W'|^T) of the spec; non-finite where it is."""
    attrs = {k: v for k, v in case.attrs.items() if v is not None}
    values = dict(case.inputs)
    k = int(attrs["K"])
    a = reference._operand(values["A"], values.get("A_scales"), values.get("A_zero_points"), attrs.get("in_bits"),
                           attrs.get("in_block_size"), attrs.get("in_symmetric"), k)
    with np.errstate(all="ignore"):
        a_used, weight = reference_ops.matmul_operands(
            a, values["W_codes"], values["W_scales"], values.get("W_zero_points"), k=k, bits=int(attrs["bits"]),
            block_size=int(attrs["block_size"]), symmetric=bool(attrs.get("symmetric", 1)),
            act_bits=int(attrs.get("act_bits") or 0))
        magnitude = np.abs(a_used) @ np.abs(weight).T
        if values.get("bias") is not None:
            magnitude = magnitude + np.abs(values["bias"].astype(np.float64))
        tolerance = (k + 4) * 2.0**-24 * magnitude
        # plus one rounding of a subnormal per term: the relative bound does not hold below 2**-126
        tolerance = np.where(np.isnan(tolerance), 0.0, tolerance) + (k + 4) * 2.0**-149
        if attrs.get("out_bits"):  # requantized Y: compare the values, one code step apart at most
            fmt = BlockFormat(int(attrs["out_bits"]), int(attrs["out_block_size"]), bool(attrs.get("out_symmetric", 1)),
                              ScaleKind(attrs.get("out_scale_kind") or "float16"))
            def value_of(outs: list[np.ndarray]) -> np.ndarray:
                zero_points = outs[2] if len(outs) > 2 else None
                return dequantize(QuantizedTensor(outs[0], outs[1], zero_points, int(attrs["N"]), fmt))

            for j, (g, w) in enumerate(zip(got, want)):
                if g.dtype != w.dtype or g.shape != w.shape:
                    return f"output {j}: dtype/shape {g.dtype}{g.shape} != spec {w.dtype}{w.shape}"
            y_got, y_want = value_of(got), value_of(want)
            steps = _block_steps(got[1], fmt, int(attrs["N"])) + _block_steps(want[1], fmt, int(attrs["N"]))
            tolerance = tolerance + steps
        else:
            y_got, y_want = got[0], want[0]
            if y_got.dtype != y_want.dtype or y_got.shape != y_want.shape:
                return f"dtype/shape {y_got.dtype}{y_got.shape} != spec {y_want.dtype}{y_want.shape}"
        finite = np.isfinite(y_want)
        # Weights whose dequantized value overflows float32 are outside the guarantee (docs/ops.md).
        outside = np.broadcast_to(~np.isfinite(weight).all(axis=-1), y_want.shape)
        diff = np.abs(y_got.astype(np.float64) - y_want.astype(np.float64))
        bad = finite & ~(np.isfinite(y_got) & (diff <= tolerance))
        # non-finite in the spec: the same NaN / infinity
        bad |= ~finite & ~((np.isnan(y_want) & np.isnan(y_got)) | (y_got == y_want))
        bad &= ~outside
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad.reshape(-1))[0])
    return (f"{int(bad.sum())} of {bad.size} outside the tolerance; first {y_got.reshape(-1)[i]!r} vs spec "
            f"{y_want.reshape(-1)[i]!r} (tolerance {np.broadcast_to(tolerance, bad.shape).reshape(-1)[i]:.3g})")


def _block_steps(scales: np.ndarray, fmt: BlockFormat, n: int) -> np.ndarray:
    """One code step of each element's block (|scale|), as float64 [..., N]."""
    s = np.abs(scales_to_float32(scales, fmt.scale_kind).astype(np.float64))
    return np.repeat(s, fmt.block_size, axis=-1)[..., :n]


def _names_the_node(message: str) -> bool:
    return NODE in message


def run_case(case: OpCase) -> dict[str, Any]:
    """Runs in the child: session + run, then the spec; the outcome."""
    os.environ["BCT_ONNX_ISA"] = case.isa
    model = case.model()
    result: dict[str, Any] = {"case": case.name}
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        got = session(model.SerializeToString(), ["CPUExecutionProvider"], options).run(None, case.feeds())
    except Exception as exc:  # noqa: BLE001  # classified below
        message = str(exc).strip()
        result["detail"] = message.splitlines()[-1][:300] if message else type(exc).__name__
        ort_error = type(exc).__module__.startswith("onnxruntime")
        if not ort_error or not _names_the_node(message):
            result["outcome"] = "unclear-error"
        else:
            result["outcome"] = "refused" if case.valid else "clean-error"
        return result
    try:
        with np.errstate(all="ignore"):
            want = reference.run(model, case.feeds() | {n: v for n, v in case.inputs if n in case.constants})
    except Exception as exc:  # noqa: BLE001
        result.update(outcome="wrong-result", detail=f"the kernel ran but the spec rejects the input: {exc}"[:300])
        return result
    if len(got) != len(want):
        result.update(outcome="wrong-result", detail=f"{len(got)} outputs, spec {len(want)}")
        return result
    if case.op_type == ops.BLOCK_MATMUL:
        problem = _matmul_check(case, [np.asarray(g) for g in got], want)
    else:
        problem = next((f"output {case.outputs[j]}: {p}" for j, (g, w) in enumerate(zip(got, want))
                        if (p := _same(np.asarray(g), np.asarray(w)))), None)
    result.update(outcome="wrong-result" if problem else "ok", detail=problem or "")
    return result


def run_cases(cases: list[OpCase], jobs: int = 2, echo: bool = False) -> list[dict[str, Any]]:
    def show(case: OpCase, result: dict[str, Any]) -> None:
        result.setdefault("case", case.name)
        if echo and result["outcome"] not in ("ok", "clean-error"):
            print(f"{result['outcome']:13s} {case.name}  {result.get('detail', '')[:200]}", flush=True)

    results = run_forked(run_case, cases, jobs=jobs, timeout=TIMEOUT_SECONDS)
    # A case that took the whole timeout on a loaded machine runs once more, alone, with twice the time.
    again = [i for i, r in enumerate(results) if r["outcome"] == "hang"]
    for i, result in zip(again, run_forked(run_case, [cases[i] for i in again], jobs=1, timeout=2 * TIMEOUT_SECONDS)):
        results[i] = result
    for case, result in zip(cases, results):
        show(case, result)
    return results


def ci_cases() -> list[OpCase]:
    return [make_case(seed) for seed in range(CI_SEEDS)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=CI_SEEDS, metavar="N", help=f"cases 0..N-1 (default {CI_SEEDS}: the CI set)")
    parser.add_argument("--first-seed", type=int, default=0, metavar="S")
    parser.add_argument("--op", help="only this op type")
    parser.add_argument("--isa", action="append", choices=ISAS, help="only these CPU paths (repeatable)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="write every case's result here")
    parser.add_argument("--show", type=int, metavar="SEED", help="print the model and inputs of one case")
    args = parser.parse_args(argv)
    if args.show is not None:
        case = make_case(args.show, args.op, args.isa)
        print(case.name)
        print(onnx.printer.to_text(case.model().graph))
        for name, value in case.inputs:
            print(name, None if value is None else f"{value.dtype}{value.shape}")
        return 0
    cases = [make_case(s, args.op, args.isa) for s in range(args.first_seed, args.first_seed + args.seeds)]
    results = run_cases(cases, args.jobs, echo=True)
    print()
    print(table(results, OUTCOMES))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 1 if any(r["outcome"] in FAILURES for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
