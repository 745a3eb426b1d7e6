"""format "qdq": standard DequantizeLinear(block_size) weights that plain ONNX Runtime runs, bit-exact to the spec."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bct_onnx.passes import ConvertOpsetPass
from bct_onnx.passes.convert_to_qdq import dequantize_linear, standard_block_tensor
from onnx import helper, numpy_helper

import bct_onnx
from bct_onnx.block_format import BlockFormat, dequantize, quantize
from bct_onnx.ops import DOMAIN

RNG = np.random.default_rng(2024)
K, N, V = 40, 24, 100  # K is not a multiple of the block size: a partial last block


def plain_session(proto: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    """A session WITHOUT the bct-onnx library (any custom op left would fail to load)."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_dequantize_linear(codes: np.ndarray, scales: np.ndarray, zero_points, axis: int, block_size: int, opset: int):
    """ONNX Runtime's own DequantizeLinear of one tensor, no library."""
    inits = [numpy_helper.from_array(codes, "q"), numpy_helper.from_array(scales, "s")]
    inputs = ["q", "s"]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "z"))
        inputs.append("z")
    node = helper.make_node("DequantizeLinear", inputs, ["w"], axis=axis, block_size=block_size)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 11 if opset >= 25 else 10
    return plain_session(model, optimize=False).run(None, {})[0]


FORMATS = [
    BlockFormat(4, 32, True, "float16"),
    BlockFormat(2, 32, True, "float16"),
    BlockFormat(8, 16, True, "pow2"),
    BlockFormat(3, 32, True, "float8e5m2"),
    BlockFormat(4, 32, False, "float16"),
    BlockFormat(2, 16, False, "float32"),
    BlockFormat(6, 32, False, "pow2"),
    BlockFormat(4, 32, False, "float16", "float"),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.bits}b{f.block_size}{'s' if f.symmetric else f.zero_point_kind.value}_{f.scale_kind.value}")
@pytest.mark.parametrize("transposed", [False, True])
def test_dequantize_linear_equals_the_spec_bit_for_bit(fmt, transposed):
    x = RNG.standard_normal((N, K)).astype(np.float32) * 3
    q = quantize(x, fmt)
    expected = dequantize(q)
    t = standard_block_tensor(q.codes, q.scales, q.zero_points, fmt, K, transposed)
    assert t.axis == (0 if transposed else 1)
    assert t.scales.dtype == np.float32
    standard_types = {(2, True): ml_dtypes.int2, (4, True): ml_dtypes.int4, (8, True): np.int8,
                      (2, False): ml_dtypes.uint2, (4, False): ml_dtypes.uint4}
    expected_type = standard_types.get((fmt.bits, fmt.symmetric), np.int8 if fmt.symmetric else np.uint8)
    assert t.codes.dtype == np.dtype(expected_type)
    assert t.container == (fmt.bits not in (2, 4, 8))
    want = expected.T if transposed else expected
    np.testing.assert_array_equal(dequantize_linear(t), want)
    # ONNX Runtime's DequantizeLinear (no library) computes the same floats; offsets are added after it.
    opset = 25 if fmt.bits == 2 else 21
    got = run_dequantize_linear(t.codes, t.scales, t.zero_points, t.axis, t.block_size, opset)
    if t.offsets is not None:
        got = got + np.repeat(t.offsets, t.block_size, axis=t.axis).take(range(K), axis=t.axis)
    np.testing.assert_array_equal(got.astype(np.float32), want)


MODEL_TEXT = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, {K}] A, int64[B, S] ids) => (float[B, S, {N}] Y, float[B, S, {K}] E, float[B, S, {V}] L) {{
  mm = MatMul(A, W)
  b = Add(mm, bias)
  r = ReduceMean<axes=[-1]>(b)
  Y = Add(b, r)
  E = Gather(T, ids)
  Tt = Transpose<perm=[1, 0]>(T)
  L = MatMul(A, Tt)
}}"""


def small_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(MODEL_TEXT)
    model.graph.initializer.extend([
        numpy_helper.from_array(RNG.standard_normal((K, N)).astype(np.float32), "W"),
        numpy_helper.from_array(RNG.standard_normal((N,)).astype(np.float32), "bias"),
        numpy_helper.from_array(RNG.standard_normal((V, K)).astype(np.float32), "T"),
    ])
    return model


FEEDS = {"A": RNG.standard_normal((2, 3, K)).astype(np.float32), "ids": RNG.integers(0, V, (2, 3))}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_bits": 2},
        {"weight_bits": 3, "symmetric": False},
        {"symmetric": False, "zero_points": "float"},
        {"weight_bits": 3, "symmetric": False, "zero_points": "packed"},
    ],
    ids=["int4", "int2", "3bit-asym", "float-offsets", "3bit-packed-zero-points"],
)
def test_qdq_model_runs_without_the_library_and_matches_the_custom_model(options):
    source = small_model()
    custom = bct_onnx.compress(source, calibration="none", act_bits=None, **options)
    qdq = bct_onnx.compress(source, calibration="none", act_bits=None, format="qdq", **options)
    proto = ir.serde.serialize_model(qdq.model)
    onnx.checker.check_model(proto, full_check=True)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    assert DOMAIN not in {op.domain for op in proto.opset_import}
    opset = {op.domain: op.version for op in proto.opset_import}[""]
    assert opset == (25 if options.get("weight_bits") == 2 else 21)
    assert proto.ir_version >= (11 if opset == 25 else 10)
    # ReduceMean's axes attribute became an input: the opset was converted, not just bumped.
    (reduce_mean,) = [n for n in proto.graph.node if n.op_type == "ReduceMean"]
    assert len(reduce_mean.input) == 2 and not reduce_mean.attribute
    report = qdq.report.standard_onnx
    assert report is not None and report["opset_converted"] and report["matmuls"] == 2 and report["gathers"] == 1

    # Every DequantizeLinear output (ORT, no library, unfused) equals the custom model's weight.
    weights = _custom_weights(custom.model)
    dq_outputs = [n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in dq_outputs)
    values = dict(zip([o.name for o in probe.graph.output], plain_session(probe, optimize=False).run(None, FEEDS)))
    compared = 0
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gather"):
            continue
        weight = _float_weight(proto, node, values)
        if weight is None:
            continue
        np.testing.assert_array_equal(weight, weights[node.name])
        compared += 1
    assert compared == 3

    # The outputs agree with the custom-op model (float summation order aside).
    expected = bct_onnx.session(ir.serde.serialize_model(custom.model).SerializeToString()).run(None, FEEDS)
    got = plain_session(proto, optimize=False).run(None, FEEDS)
    for name, want, have in zip(["Y", "E", "L"], expected, got):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5, err_msg=name)


def _custom_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """node name -> the float weight the custom op uses ([K, N] for BlockMatMul, [V, D] for BlockGather)."""
    from bct_onnx.passes.convert_to_qdq import block_format_of
    from bct_onnx.passes.quantized_weights import node_zero_points

    found = {}
    for node in model.graph:
        if node.domain != DOMAIN:
            continue
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        codes, scales = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()
        zp = node.inputs[3].const_value.numpy() if len(node.inputs) > 3 and node.inputs[3] is not None else None
        zp = node_zero_points(node, zp, scales)  # packed at the code width: one a block
        fmt = block_format_of(attrs["bits"], attrs["block_size"], bool(attrs["symmetric"]), scales, zp)
        axis_size = attrs["K"] if node.op_type == "BlockMatMul" else attrs["axis_size"]
        from bct_onnx.block_format import QuantizedTensor

        value = dequantize(QuantizedTensor(codes, scales, zp, axis_size, fmt))
        found[node.name] = value.T if node.op_type == "BlockMatMul" else value
    return found


def _float_weight(proto: onnx.ModelProto, node: onnx.NodeProto, values: dict[str, np.ndarray]) -> np.ndarray | None:
    """The weight input of a MatMul / Gather, evaluated (following Transpose and the offset Add chain)."""
    name = node.input[1] if node.op_type == "MatMul" else node.input[0]
    producers = {out: n for n in proto.graph.node for out in n.output}
    transpose = False
    producer = producers.get(name)
    if producer is not None and producer.op_type == "Transpose":
        transpose, name = True, producer.input[0]
        producer = producers.get(name)
    if producer is None:
        return None
    if producer.op_type != "DequantizeLinear":  # float offsets: evaluate the chain's end
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        value = plain_session(probe, optimize=False).run([name], FEEDS)[0]
    else:
        value = values[name]
    return value.T if transpose else value


def test_activation_ops_and_act_bits_are_reported_as_not_expressible():
    result = bct_onnx.compress(small_model(), calibration="none", act_bits=8, format="qdq")
    notes = " | ".join(result.report.standard_onnx["not_expressible"])
    assert "act_bits=8" in notes and "2 MatMul(s)" in notes
    assert "Softmax" in notes and "stay float" in notes
    assert "standard ONNX (opset 21" in result.report.summary()
    assert result.report.to_dict()["standard_onnx"]["code_types"] == {"int4": 3}


def test_format_is_validated():
    with pytest.raises(ValueError, match="format must be one of bct, qdq"):
        bct_onnx.CompressConfig(format="nope")


def test_convert_opset_pass_converts_nodes_and_leaves_newer_models_alone():
    model = ir.serde.deserialize_model(small_model())
    result = ConvertOpsetPass(21)(model)
    assert result.modified and result.model.opset_imports[""] == 21
    assert result.model.ir_version >= 10
    (reduce_mean,) = [n for n in result.model.graph if n.op_type == "ReduceMean"]
    assert len(reduce_mean.inputs) == 2
    # the tensors are the original objects, not copies
    assert result.model.graph.initializers["W"].const_value.numpy().shape == (K, N)
    again = ConvertOpsetPass(18)(result.model)
    assert not again.modified and again.model.opset_imports[""] == 21


def test_tied_table_is_stored_once_and_transposed_for_the_matmul():
    from bct_onnx.passes import ConvertToQDQPass, QuantizeGatherPass, QuantizeMatMulPass

    from bct_onnx.config import CompressConfig

    source = small_model()
    custom = ir.serde.deserialize_model(source)
    config = CompressConfig(act_bits=None, embedding_scale_kind=None)
    for pass_ in (QuantizeMatMulPass(config), QuantizeGatherPass(config)):  # no folding: the tie stays
        custom = pass_(custom).model
    gather = next(n for n in custom.graph if n.op_type == "BlockGather")
    tied = next(n for n in custom.graph if n.op_type == "BlockMatMul" and n.inputs[1] is gather.inputs[1])
    expected = bct_onnx.session(ir.serde.serialize_model(custom).SerializeToString()).run(None, FEEDS)
    result = ConvertToQDQPass()(custom)
    assert result.rewritten["DequantizeLinear shared by a Gather and a MatMul (tied table)"] == 1
    proto = ir.serde.serialize_model(result.model)
    dq_nodes = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq_nodes) == 2  # W's and the table's, stored once
    (transpose,) = [n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] == dq_nodes[1].output[0]]
    matmul = next(n for n in proto.graph.node if n.name == tied.name)
    assert matmul.input[1] == transpose.output[0]
    got = plain_session(proto, optimize=False).run(None, FEEDS)
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_convert_opset_copies_no_tensor_and_keeps_external_data(tmp_path):
    proto = small_model()
    want = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.data",
              size_threshold=0)
    model = ir.load(path)
    before = {name: value.const_value for name, value in model.graph.initializers.items()}
    assert all(isinstance(t, ir.ExternalTensor) for t in before.values())
    assert ConvertOpsetPass(21)(model).modified
    for name, tensor in before.items():
        assert model.graph.initializers[name].const_value is tensor  # the same object, still on disk
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), want[name])


@pytest.mark.parametrize("act_bits", [8, 4, 3])
def test_qdq_activations_are_the_spec_fake_quantization_bit_for_bit(act_bits):
    from bct_onnx.block_format import fake_quantize

    source = small_model()
    options = {"calibration": "none", "act_bits": act_bits, "ops": ["MatMul", "Gather"]}
    custom = bct_onnx.compress(source, **options)
    qdq = bct_onnx.compress(source, format="qdq", qdq_activations=True, **options)
    proto = ir.serde.serialize_model(qdq.model)
    onnx.checker.check_model(proto, full_check=True)
    assert qdq.report.rules["run-time activation quantization as in-graph scales + QuantizeLinear/DequantizeLinear"] == 2
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == 2
    # the activation each MatMul reads (A is shared by both MatMuls here) equals the spec's fake quantization
    matmul_inputs = [n.input[0] for n in proto.graph.node if n.op_type == "MatMul"]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in matmul_inputs)
    got = plain_session(probe, optimize=False).run(matmul_inputs, FEEDS)
    want = fake_quantize(FEEDS["A"], BlockFormat(act_bits, 32, True, "float32"))
    assert not np.array_equal(want, FEEDS["A"])
    for value in got:
        np.testing.assert_array_equal(value, want)
    expected = bct_onnx.session(ir.serde.serialize_model(custom.model).SerializeToString()).run(None, FEEDS)
    for want_out, have in zip(expected, plain_session(proto, optimize=False).run(None, FEEDS)):
        np.testing.assert_allclose(have, want_out, rtol=1e-5, atol=2e-5)
    # ONNX Runtime's graph optimizations (Q/DQ rewrites, MatMulNBits fusion) must accept it too; at
    # accuracy level 0 the fused MatMul keeps A' as it is.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    optimized = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for want_out, have in zip(expected, optimized.run(None, FEEDS)):
        np.testing.assert_allclose(have, want_out, rtol=1e-5, atol=2e-5)
