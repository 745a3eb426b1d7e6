"""A Llama-shaped decoder of any size, random weights, written straight to ONNX with external data.

Exporting a multi-gigabyte model through torch needs the model in memory two or three times; this
builder writes the graph with onnx helpers and the weights tensor by tensor into the external data
file, so building a model larger than 4 GB takes the memory of one weight. The graph has the
operators a Llama export has where weights live (Gather embedding; per layer RMSNorm written out as
Pow/ReduceMean/Add/Sqrt/Div/Mul, Q/K/V/O projections, SwiGLU MLP with SiLU written out as
x * Sigmoid(x), residual Adds; final RMSNorm and an untied LM head) and plain multi-head attention
without rotary embedding or causal mask: what compile memory and time depend on, not a faithful
language model. Used by the bounded-memory tests and benchmarks/compile_memory.py.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 18


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """Sizes of the synthetic decoder (defaults: a few hundred MB)."""

    hidden: int = 512
    intermediate: int = 1408
    layers: int = 12
    heads: int = 8
    vocab: int = 8192
    seed: int = 0

    def layer_bytes(self) -> int:
        """float32 bytes of one decoder layer's weights."""
        return 4 * (4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate + 2 * self.hidden)

    def total_bytes(self) -> int:
        """float32 bytes of all weights (both vocabulary tables included)."""
        return self.layers * self.layer_bytes() + 4 * (2 * self.vocab * self.hidden + self.hidden)


class _Writer:
    """Appends weights to the external data file and makes their external-data TensorProtos."""

    def __init__(self, data_path: Path, rng: np.random.Generator) -> None:
        self.data_path = data_path
        self.file = open(data_path, "wb")  # noqa: SIM115 (closed by close())
        self.rng = rng
        self.initializers: list[TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> str:
        array = (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype("<f4")
        return self._add(name, array)

    def ones(self, name: str, size: int) -> str:
        return self._add(name, np.ones(size, dtype="<f4"))

    def _add(self, name: str, array: np.ndarray) -> str:
        offset = self.file.tell()
        pad = -offset % 64  # aligned offsets, as onnx writes them
        self.file.write(b"\0" * pad)
        offset += pad
        array.tofile(self.file)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


def build(path: str | os.PathLike[str], shape: LlamaShape = LlamaShape()) -> Path:
    """Write the model to ``path`` (.onnx) and ``path``.data; return the .onnx path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out.with_name(out.name + ".data"), np.random.default_rng(shape.seed))
    nodes: list[onnx.NodeProto] = []
    consts: list[TensorProto] = []
    h, heads = shape.hidden, shape.heads
    head_dim = h // heads

    def const(name: str, values: list[int] | list[float], dtype: int = TensorProto.INT64) -> str:
        consts.append(helper.make_tensor(name, dtype, [len(values)], values))
        return name

    axes = const("axes_last", [-1])
    eps = const("eps", [1e-5], TensorProto.FLOAT)
    two = const("two", [2.0], TensorProto.FLOAT)
    split_heads = const("split_heads", [0, 0, heads, head_dim])
    merge_heads = const("merge_heads", [0, 0, h])
    scale = const("attn_scale", [1.0 / float(np.sqrt(head_dim))], TensorProto.FLOAT)

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def rms_norm(x: str, prefix: str) -> str:
        squared = node("Pow", [x, two], f"{prefix}.pow")
        mean = node("ReduceMean", [squared, axes], f"{prefix}.mean", keepdims=1)
        root = node("Sqrt", [node("Add", [mean, eps], f"{prefix}.add_eps")], f"{prefix}.sqrt")
        normed = node("Div", [x, root], f"{prefix}.div")
        return node("Mul", [writer.ones(f"{prefix}.weight", h), normed], f"{prefix}.mul")

    std = 0.02
    x = node("Gather", [writer.weight("embed_tokens.weight", (shape.vocab, h), std), "input_ids"], "embed")
    for i in range(shape.layers):
        p = f"layers.{i}"
        n = rms_norm(x, f"{p}.input_layernorm")
        q, k, v = (
            node("MatMul", [n, writer.weight(f"{p}.self_attn.{name}_proj.weight", (h, h), std)], f"{p}.{name}")
            for name in ("q", "k", "v")
        )
        q, k, v = (
            node("Transpose", [node("Reshape", [t, split_heads], f"{t}.split")], f"{t}.heads", perm=[0, 2, 1, 3])
            for t in (q, k, v)
        )
        k_t = node("Transpose", [k], f"{p}.k_t", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, k_t], f"{p}.qk"), scale], f"{p}.scores")
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], f"{p}.pv")], f"{p}.context", perm=[0, 2, 1, 3])
        merged = node("Reshape", [context, merge_heads], f"{p}.merged")
        attn = node("MatMul", [merged, writer.weight(f"{p}.self_attn.o_proj.weight", (h, h), std)], f"{p}.o")
        x = node("Add", [x, attn], f"{p}.residual1")
        n = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = node("MatMul", [n, writer.weight(f"{p}.mlp.gate_proj.weight", (h, shape.intermediate), std)], f"{p}.gate")
        up = node("MatMul", [n, writer.weight(f"{p}.mlp.up_proj.weight", (h, shape.intermediate), std)], f"{p}.up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
        act = node("Mul", [silu, up], f"{p}.gated")
        down = node("MatMul", [act, writer.weight(f"{p}.mlp.down_proj.weight", (shape.intermediate, h), std)], f"{p}.down")
        x = node("Add", [x, down], f"{p}.residual2")
    x = rms_norm(x, "norm")
    node("MatMul", [x, writer.weight("lm_head.weight", (h, shape.vocab), std)], "logits")
    writer.close()
    graph = helper.make_graph(
        nodes,
        "synthetic_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", shape.vocab])],
        initializer=consts + writer.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bct_onnx.synthetic_llama")
    model.ir_version = 10
    onnx.save(model, out)
    return out
