"""EntropyCodeWeightsPass (--entropy-code): lossless, smaller, decoded by the kernels and the reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from bct_onnx.passes import EntropyCodeWeightsPass, compress_model
from support import run_bct_session, run_reference

import bct_onnx
from bct_onnx import code_entropy, ops
from bct_onnx.config import CompressConfig
from bct_onnx.inspect import inspect_model

V, D, H = 300, 64, 128
RNG = np.random.default_rng(4)
WEIGHTS = {
    "table": RNG.standard_normal((V, D)).astype(np.float32),
    "w1": RNG.standard_normal((D, H)).astype(np.float32),
    "w2": RNG.standard_normal((H, D)).astype(np.float32),
}


def encoder() -> ir.Model:
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"g (int64[N, S] input_ids) => (float[N, S, {D}] y) {{\n"
        "  e = Gather(table, input_ids)\n  h = MatMul(e, w1)\n  y = MatMul(h, w2)\n}"
    )
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in WEIGHTS.items())
    return ir.from_proto(proto)


def _coded_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == ops.DOMAIN and code_entropy.is_coded(n)]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_entropy_coded_model_gives_the_same_outputs_bit_for_bit(bits):
    config = CompressConfig(weight_bits=bits, act_bits=8, ops=frozenset({"MatMul", "Gather"}))
    plain = compress_model(encoder(), config).model
    coded_result = compress_model(encoder(), CompressConfig(**{**config.__dict__, "entropy_code": True}))
    coded = coded_result.model
    assert sorted(n.op_type for n in _coded_nodes(coded)) == ["BlockGather", "BlockMatMul", "BlockMatMul"]
    assert coded_result.rewritten["codes entropy-coded"] == 3
    feeds = {"input_ids": RNG.integers(0, V, (2, 7))}
    (want,) = run_bct_session(plain, feeds)
    (got,) = run_bct_session(coded, feeds)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    (reference,) = run_reference(coded, feeds)
    (reference_plain,) = run_reference(plain, feeds)
    np.testing.assert_array_equal(reference, reference_plain)
    summary = code_entropy.coded_summary(coded)
    assert summary is not None and summary["tensors"] == 3
    assert summary["values"] == V * D + D * H + H * D
    assert summary["bits_after"] < summary["bits_before"] == pytest.approx(bits)


def test_compress_reports_and_inspect_shows_bits_a_value(tmp_path):
    out = tmp_path / "coded.onnx"
    _, report = bct_onnx.compress(encoder(), out, entropy_code=True, calibration="none", weight_bits=4)
    assert report.entropy_coding is not None and report.entropy_coding["bits_before"] == 4.0
    assert f"{report.entropy_coding['bits_after']:.3f} bits a value" in report.summary()
    assert "entropy_coding" in report.to_dict() and report.config["entropy_code"] is True
    info = inspect_model(out, explain=False)
    assert info.entropy_coding == report.entropy_coding
    assert "entropy-coded codes: 3 tensor(s), 4.000 ->" in info.summary()
    gather = next(n for n in info.nodes if n.op_type == ops.BLOCK_GATHER)
    assert gather.float_bytes == 4 * V * D  # rows read from the stream's header
    _, plain_report = bct_onnx.compress(encoder(), calibration="none", weight_bits=4)
    assert plain_report.entropy_coding is None and report.output_bytes < plain_report.output_bytes


def test_codes_shared_with_another_reader_are_left_packed():
    model = compress_model(encoder(), CompressConfig(weight_bits=4, act_bits=None, ops=frozenset({"MatMul"}))).model
    matmul = next(n for n in model.graph if n.op_type == ops.BLOCK_MATMUL)
    codes = matmul.inputs[1]
    extra = ir.node("Identity", [codes], name="peek")
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    result = EntropyCodeWeightsPass()(model)
    assert any("also read by Identity 'peek'" in s.reason for s in result.skipped)
    assert not code_entropy.is_coded(matmul)


def test_entropy_code_needs_the_bct_format():
    with pytest.raises(ValueError, match="entropy_code applies to format 'bct' only"):
        CompressConfig(entropy_code=True, format="qdq")


def test_cli_flag_and_config_file_key(tmp_path, capsys):
    from bct_onnx import cli

    source = tmp_path / "encoder.onnx"
    ir.save(encoder(), source)
    out = tmp_path / "coded.onnx"
    assert cli.main(["compress", str(source), "-o", str(out), "--entropy-code", "--calibration", "none", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "entropy-coded codes:" in printed
    # A model this small cannot reach the encoder default's 8x: the report says so, not an error.
    assert "warning: target ratio 8 not reached" in printed
    assert code_entropy.coded_summary(ir.load(out)) is not None
    config = tmp_path / "bct.toml"
    config.write_text("entropy_code = true\nweight_bits = 3\n", encoding="utf-8")
    out = tmp_path / "coded_by_file.onnx"
    assert cli.main(["compress", str(source), "-o", str(out), "--config", str(config), "--calibration", "none", "-q"]) == 0
    assert code_entropy.coded_summary(ir.load(out))["bits_before"] == 3.0
