"""Canonicalization: GemmToMatMulPass (all attribute variants) and FoldConstantWeightsPass."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bct_onnx.passes import FoldConstantWeightsPass, GemmToMatMulPass
from support import model_from_text, op_types, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(7)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
@pytest.mark.parametrize("c_kind", ["none", "const_n", "const_mn", "input"])
def test_gemm_variants(trans_a, trans_b, alpha, beta, c_kind):
    m, k, n = 3, 6, 5
    a_shape = f"{k}, {m}" if trans_a else f"{m}, {k}"
    b = rand(n, k) if trans_b else rand(k, n)
    inits = {"Bmat": b}
    inputs = f"float[{a_shape}] A"
    c_arg = ""
    if c_kind == "const_n":
        inits["C"] = rand(n)
        c_arg = ", C"
    elif c_kind == "const_mn":
        inits["C"] = rand(m, n)
        c_arg = ", C"
    elif c_kind == "input":
        inputs += f", float[{n}] C"
        c_arg = ", C"
    text = f"""{HEADER}
    g ({inputs}) => (float[{m}, {n}] Y) {{
      Y = Gemm <alpha = {alpha}, beta = {beta}, transA = {trans_a}, transB = {trans_b}> (A, Bmat{c_arg})
    }}"""
    model = model_from_text(text, inits)
    feeds = {"A": rand(*(k, m) if trans_a else (m, k))}
    if c_kind == "input":
        feeds["C"] = rand(n)
    (expected,) = run_ort(model, feeds)
    result = GemmToMatMulPass()(model)
    assert result.modified and result.rewritten == {"Gemm": 1}
    expected_ops = ["Transpose"] if trans_a else []
    expected_ops.append("MatMul")
    if c_kind == "input" and beta not in (0.0, 1.0):
        expected_ops.append("Mul")
    if c_kind != "none" and beta != 0.0:
        expected_ops.append("Add")
    assert op_types(result.model) == expected_ops
    matmul = next(node for node in result.model.graph if node.op_type == "MatMul")
    weight = matmul.inputs[1].const_value
    assert weight is not None and weight.shape == (k, n)  # B transposed and scaled once, offline
    (actual,) = run_ort(result.model, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert [v.name for v in result.model.graph.outputs] == ["Y"]


def test_gemm_with_shared_b_keeps_one_copy():
    text = f"""{HEADER}
    g (int64[3] ids, float[3, 64] A) => (float[3, 64] E, float[3, 100] Y) {{
      E = Gather(T, ids)
      Y = Gemm <alpha = 2.0, transB = 1> (A, T)
    }}"""
    table = rand(100, 64)
    model = model_from_text(text, {"T": table})
    feeds = {"ids": np.array([0, 5, 99], np.int64), "A": rand(3, 64)}
    expected = run_ort(model, feeds)
    result = GemmToMatMulPass()(model)
    assert op_types(result.model) == ["Gather", "Transpose", "MatMul", "Mul"]
    assert sorted(result.model.graph.initializers) == ["T", "Y.alpha"]
    assert sum(v.const_value.size for v in result.model.graph.initializers.values()) == table.size + 1
    for got, want in zip(run_ort(result.model, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gemm_with_non_constant_b_is_skipped():
    text = f"""{HEADER}
    g (float[3, 4] A, float[4, 5] B) => (float[3, 5] Y) {{ Y = Gemm(A, B) }}"""
    model = model_from_text(text)
    result = GemmToMatMulPass()(model)
    assert not result.modified
    assert [(s.op_type, s.reason) for s in result.skipped] == [
        ("Gemm", "B is not a constant initializer; Gemm left as is")
    ]


def test_fold_transpose_cast_chain():
    text = f"""{HEADER}
    g (float[2, 6] A) => (float[2, 4] Y) {{
      t = Transpose <perm = [1, 0]> (W16)
      c = Cast <to = 1> (t)
      Y = MatMul(A, c)
    }}"""
    w16 = rand(4, 6).astype(np.float16)
    model = model_from_text(text, {"W16": w16})
    feeds = {"A": rand(2, 6)}
    (expected,) = run_ort(model, feeds)
    result = FoldConstantWeightsPass()(model)
    assert result.rewritten == {"fold Transpose": 1, "fold Cast": 1}
    assert op_types(result.model) == ["MatMul"]
    weight = next(iter(result.model.graph)).inputs[1]
    assert (
        weight.is_initializer() and weight.dtype == ir.DataType.FLOAT and weight.const_value.shape == (6, 4)
    )
    np.testing.assert_array_equal(weight.const_value.numpy(), w16.T.astype(np.float32))
    (actual,) = run_ort(result.model, feeds)
    np.testing.assert_array_equal(actual, expected)
    assert not FoldConstantWeightsPass()(result.model).modified


def test_fold_reshape_squeeze_unsqueeze():
    text = f"""{HEADER}
    g (float[2, 6] A) => (float[2, 4] Y) {{
      r = Reshape(W, shape)
      s = Squeeze(r, ax0)
      u = Unsqueeze(s, ax0)
      q = Squeeze(u, ax0)
      Y = MatMul(A, q)
    }}"""
    inits = {"W": rand(24), "shape": np.array([1, 6, -1], np.int64), "ax0": np.array([0], np.int64)}
    model = model_from_text(text, inits)
    feeds = {"A": rand(2, 6)}
    (expected,) = run_ort(model, feeds)
    result = FoldConstantWeightsPass()(model)
    assert op_types(result.model) == ["MatMul"]
    (actual,) = run_ort(result.model, feeds)
    np.testing.assert_array_equal(actual, expected)


def test_fold_leaves_activation_side_alone_and_reports_shared_sources():
    text = f"""{HEADER}
    g (float[2, 64] A, int64[3] ids) => (float[2, 100] Y, float[3, 64] E, float[64, 2] Z, float[100, 64] N) {{
      E = Gather(T, ids)
      WT = Transpose <perm = [1, 0]> (T)
      Y = MatMul(A, WT)
      Z = Transpose(A)
      C = Cast <to = 1> (T)
      N = Relu(C)
    }}"""
    model = model_from_text(text, {"T": rand(100, 64)})
    result = FoldConstantWeightsPass()(model)
    assert not result.modified
    assert [(s.op_type, s.reason) for s in result.skipped] == [
        (
            "Cast",
            (
                "constant 'T' is also read by Gather '<unnamed, output E>', Transpose '<unnamed, output WT>'; "
                "folding would duplicate it"
            ),
        )
    ]


def test_fold_identity_aliases_the_constant_without_copy():
    text = f"""{HEADER}
    g (float[2, 64] A, int64[3] ids) => (float[2, 100] Y, float[3, 64] E) {{
      E = Gather(T, ids)
      alias = Identity(T)
      WT = Transpose <perm = [1, 0]> (alias)
      Y = MatMul(A, WT)
    }}"""
    model = model_from_text(text, {"T": rand(100, 64)})
    table = model.graph.initializers["T"]
    result = FoldConstantWeightsPass()(model)
    assert result.rewritten == {"fold Identity": 1}
    assert result.skipped == []  # the Transpose of the shared table is QuantizeMatMulPass's business
    assert op_types(result.model) == ["Gather", "Transpose", "MatMul"]
    assert result.model.graph.node(1).inputs[0] is table
    assert list(result.model.graph.initializers) == ["T"]
