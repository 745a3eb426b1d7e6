"""SmolLM2-135M in torch with weights fake-quantized by the block format: which tensors carry the 4-bit loss.

Each plan maps weight names to a BlockFormat (rounded by bct_onnx.weight_quantizer with its scale search,
read back by block_format.dequantize, so the weights equal what the compressed model stores); the tied
embedding / output table is one tensor. Activations stay float (on this model weight-only and every
component cost the same, docs/results.md). Reports perplexity and mean KL(FP32 || plan) of the
next-token distributions on non-overlapping windows of a text: Moby-Dick (never the Austen evaluation
text) for choosing, an Austen novel only to check.

    python benchmarks/decoder_fake_quant.py --text moby-dick --tokens 1024 --plan t5-v6 --plan t5a-v6
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from bct_onnx.block_format import BlockFormat, dequantize
from bct_onnx.gptq import gptq_quantize
from bct_onnx.weight_quantizer import quantize_tensor


def fmt(bits: int, kind: str = "float8e5m2", symmetric: bool = True, block: int = 32, zero_points: str = "packed") -> BlockFormat:
    """A plan's format; asymmetric ones store integer zero points, packed at the code width unless named."""
    return BlockFormat(bits, block, symmetric, kind, zero_points)


# name -> (format of the tied table, format of other weights, [(name regex, format)])
PLANS: dict[str, tuple[BlockFormat, BlockFormat, list[tuple[str, BlockFormat]]]] = {
    "w4": (fmt(4, "float16"), fmt(4, "float16"), []),  # the previous default, 7.0x
    "w4-f8": (fmt(4), fmt(4), []),
    "t8": (fmt(8, "float16"), fmt(4, "float16"), []),
    "t5-f16": (fmt(5, "float16"), fmt(4, "float16"), []),
    "t5": (fmt(5), fmt(4), []),
    "t6": (fmt(6), fmt(4), []),
    "t5-asym": (fmt(5), fmt(4, symmetric=False, zero_points="integer"), []),  # uint8 zero points
    "t6-b64": (fmt(6), fmt(4, block=64), []),
    "t5-down-asym": (fmt(5), fmt(4), [("down_proj", fmt(4, symmetric=False, zero_points="integer"))]),
    "t5-v6": (fmt(5), fmt(4), [("v_proj", fmt(6))]),  # the decoder default before packed zero points
    "t5-v8": (fmt(5), fmt(4), [("v_proj", fmt(8))]),
    "t6-v6-q3-k3-gate3": (fmt(6), fmt(4), [("v_proj", fmt(6)), ("(q_proj|k_proj|gate_proj)", fmt(3))]),
    "t6-v6-q3-k3-o3": (fmt(6), fmt(4), [("v_proj", fmt(6)), ("(q_proj|k_proj|o_proj)", fmt(3))]),
    "t5-v8-q3-k3": (fmt(5), fmt(4), [("v_proj", fmt(8)), ("(q_proj|k_proj)", fmt(3))]),
    "t5-v5-ends5": (fmt(5), fmt(4), [("v_proj", fmt(5)), (r"layers\.(0|29)\.", fmt(5))]),
    # "a": asymmetric, integer zero points packed at the code width (4-bit: two a byte).
    "t5-a4-v6": (fmt(5), fmt(4, symmetric=False), [("v_proj", fmt(6))]),
    "t5-a4-v5a": (fmt(5), fmt(4, symmetric=False), [("v_proj", fmt(5, symmetric=False))]),
    "t4a-a4-v6": (fmt(4, symmetric=False), fmt(4, symmetric=False), [("v_proj", fmt(6))]),
    "t4a-a4-v8": (fmt(4, symmetric=False), fmt(4, symmetric=False), [("v_proj", fmt(8))]),
    "t5-v6-mlp-a4": (fmt(5), fmt(4), [("v_proj", fmt(6)), ("(gate_proj|up_proj)", fmt(4, symmetric=False))]),
    "t5-v6-attn-a4": (fmt(5), fmt(4), [("v_proj", fmt(6)), ("(q_proj|k_proj|o_proj)", fmt(4, symmetric=False))]),
    "t5-v6-down-a4": (fmt(5), fmt(4), [("v_proj", fmt(6)), ("down_proj", fmt(4, symmetric=False))]),
    "t5-v6-up-a4": (fmt(5), fmt(4), [("v_proj", fmt(6)), ("up_proj", fmt(4, symmetric=False))]),
    "t5-v6-gate-a4": (fmt(5), fmt(4), [("v_proj", fmt(6)), ("gate_proj", fmt(4, symmetric=False))]),
    "t5-v5-mlp-a4": (fmt(5), fmt(4), [("v_proj", fmt(5)), ("(gate_proj|up_proj)", fmt(4, symmetric=False))]),
    "t5a-v6": (fmt(5, symmetric=False), fmt(4), [("v_proj", fmt(6))]),  # the decoder default
    "t5-v6a": (fmt(5), fmt(4), [("v_proj", fmt(6, symmetric=False))]),
    "t5a-v5": (fmt(5, symmetric=False), fmt(4), [("v_proj", fmt(5))]),
    "t5a64-v6": (fmt(5, symmetric=False, block=64), fmt(4), [("v_proj", fmt(6))]),
    "t5a64-v6-up-a4": (fmt(5, symmetric=False, block=64), fmt(4), [("v_proj", fmt(6)), ("up_proj", fmt(4, symmetric=False))]),
    "t4a-v6": (fmt(4, symmetric=False), fmt(4), [("v_proj", fmt(6))]),
    "t5a-v5-up-a4": (fmt(5, symmetric=False), fmt(4), [("v_proj", fmt(5)), ("up_proj", fmt(4, symmetric=False))]),
    "t5a-v5-gate-a4": (fmt(5, symmetric=False), fmt(4), [("v_proj", fmt(5)), ("gate_proj", fmt(4, symmetric=False))]),
}
# Bits of a compressed file besides the linear weights and the table (norm weights, graph, metadata):
# the decoder default's measured 7.04x file minus its weight bits.
OTHER_MBIT = 5.0
GROUPS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", r"layers\.(0|1)\.", r"layers\.(28|29)\.")
for _group in GROUPS:  # one group at 8 bits, the rest as "w4": per-group sensitivity
    PLANS[f"8bit:{_group}"] = (fmt(4, "float16"), fmt(4, "float16"), [(_group, fmt(8, "float16"))])
PLANS["8bit:table"] = PLANS["t8"]


IMPORTANCE_MODES = ("none", "gamma", "gamma-notable", "random[:BxL[:seed]]", "text", "MODE^power", "gptq-full[@damping]", "gptq-mean[@damping]")


def _silu_square_mean(std: np.ndarray) -> np.ndarray:
    """E[silu(g)^2] for g ~ N(0, std^2), by quadrature over a standard normal."""
    z = np.linspace(-6, 6, 241, dtype=np.float64)
    pdf = np.exp(-0.5 * z * z)
    pdf /= pdf.sum()
    g = std[:, None] * z[None, :]
    return ((g / (1 + np.exp(-g))) ** 2 * pdf).sum(-1)


def gamma_importance(model) -> dict[str, np.ndarray]:
    """Data-free input-channel importance per weight: norm gamma^2 for q/k/v/gate/up (and the table as the
    output projection), the value projection's output variance for o_proj, E[silu(gate)^2] * var(up) for
    down_proj, both under inputs gamma * z with z of unit variance."""
    out: dict[str, np.ndarray] = {}
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        g_attn = layer.input_layernorm.weight.detach().double().numpy() ** 2
        g_mlp = layer.post_attention_layernorm.weight.detach().double().numpy() ** 2
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[f"{pre}self_attn.{proj}.weight"] = g_attn
        for proj in ("gate_proj", "up_proj"):
            out[f"{pre}mlp.{proj}.weight"] = g_mlp
        wv = layer.self_attn.v_proj.weight.detach().double().numpy()
        v_var = (wv**2) @ g_attn  # [kv_heads * head_dim]
        head_dim = wv.shape[0] // cfg.num_key_value_heads
        out[f"{pre}self_attn.o_proj.weight"] = np.repeat(v_var.reshape(-1, head_dim), group, axis=0).reshape(-1)
        up_var = (layer.mlp.up_proj.weight.detach().double().numpy() ** 2) @ g_mlp
        gate_var = (layer.mlp.gate_proj.weight.detach().double().numpy() ** 2) @ g_mlp
        out[f"{pre}mlp.down_proj.weight"] = up_var * _silu_square_mean(np.sqrt(gate_var))
    out["model.embed_tokens.weight"] = model.model.norm.weight.detach().double().numpy() ** 2
    return {k: (v / v.mean()).astype(np.float32) for k, v in out.items()}


def linear_input_stats(model, ids) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per weight name (the tied table as lm_head): (X^T X / n, mean of X) of its Linear's input rows on ids."""
    import torch

    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = "model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"

            def hook(_m, inputs, _o, weight=weight):
                x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1]).numpy()
                stats[weight] = (x.T @ x / len(x), x.mean(0))

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return stats


def measured_importance(model, ids) -> dict[str, np.ndarray]:
    """Mean square of each Linear's input channels on ids (the diagonal of X^T X / n)."""
    stats = linear_input_stats(model, ids)
    return {k: (np.diag(h) / np.diag(h).mean()).astype(np.float32) for k, (h, _) in stats.items()}


GPTQ_DAMPING = 0.3  # synthetic_calibration.SYNTHETIC_DAMPING


def gptq_hessians(model, mode: str) -> dict[str, np.ndarray]:
    """GPTQ Hessians per weight from 4 random-id sequences of 128: "gptq-full" X^T X as measured,
    "gptq-mean" only its diagonal and mean: diag(E[x^2] - mu^2) + mu mu^T (the common-mode part)."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    stats = linear_input_stats(model, ids)
    mode = mode.split("@")[0]  # "@damping" applies to the rounding, not to the Hessian
    if mode == "gptq-full":
        return {k: h.astype(np.float32) for k, (h, _) in stats.items()}
    if mode == "gptq-mean":
        out = {}
        for k, (h, mu) in stats.items():
            out[k] = (np.diag(np.diag(h) - mu * mu) + np.outer(mu, mu)).astype(np.float32)
        return out
    raise ValueError(f"unknown GPTQ mode {mode!r}: gptq-full or gptq-mean")


def channel_importance(model, mode: str, text_ids) -> dict[str, np.ndarray]:
    """Importance per weight name; a suffix "^p" raises every importance to the power p (then mean 1)."""
    if "^" in mode:
        base, power = mode.rsplit("^", 1)
        raised = {k: v.astype(np.float64) ** float(power) for k, v in channel_importance(model, base, text_ids).items()}
        return {k: (v / v.mean()).astype(np.float32) for k, v in raised.items()}
    return _channel_importance(model, mode, text_ids)


def _channel_importance(model, mode: str, text_ids) -> dict[str, np.ndarray]:
    import torch

    if mode == "none":
        return {}
    if mode == "gamma":
        return gamma_importance(model)
    if mode == "gamma-notable":
        return {k: v for k, v in gamma_importance(model).items() if "embed_tokens" not in k}
    if mode.startswith("random"):
        parts = mode.split(":")
        b, length = (int(v) for v in (parts[1] if len(parts) > 1 else "4x128").split("x"))
        seed = int(parts[2]) if len(parts) > 2 else 0
        ids = torch.randint(0, model.config.vocab_size, (b, length), generator=torch.Generator().manual_seed(seed))
        return measured_importance(model, ids)
    if mode == "text":
        return measured_importance(model, text_ids)
    raise ValueError(f"unknown importance mode {mode!r}: one of {', '.join(IMPORTANCE_MODES)}")


def plan_function(name: str) -> Callable[[str], BlockFormat]:
    table, default, rules = PLANS[name]

    def format_of(weight: str) -> BlockFormat:
        if "embed_tokens" in weight:
            return table
        return next((f for pattern, f in rules if re.search(pattern, weight)), default)

    return format_of


def main(argv: list[str] | None = None) -> int:
    import torch
    from bct_onnx.models import smollm2, text_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="moby-dick", help="moby-dick or an Austen book (e.g. emma)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--plan", action="append", choices=sorted(PLANS), default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clip-ratios",
        help="comma-separated clip ratios of the scale search instead of weight_quantizer.CLIP_RATIOS (1.0 first)",
    )
    parser.add_argument(
        "--importance",
        action="append",
        default=[],
        help="per-input-channel weights of the scale search: none, gamma (data-free: norm weights and"
        " proxies), random[:BxL[:seed]] (mean square inputs on B random-id sequences of L tokens, default 4x128), text (on the first window of the text itself: an oracle)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clip_ratios:
        import bct_onnx.weight_quantizer as wq

        wq.CLIP_RATIOS = tuple(float(Fraction(r)) for r in args.clip_ratios.split(","))
    model = smollm2.load_torch_model()
    tokenizer = smollm2.load_tokenizer()
    # Moby-Dick from its middle (past the front matter); an Austen book from its start.
    text = text_data.moby_dick_text()[200_000:260_000] if args.text == "moby-dick" else text_data.austen_text(args.text)
    ids = tokenizer(text)["input_ids"][: args.tokens // args.window * args.window]
    batch = torch.tensor(ids).reshape(-1, args.window)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2}
    params = dict(model.named_parameters())

    modes = args.importance or ["none"]
    importances = {mode: channel_importance(model, mode, batch[:1]) for mode in modes if not mode.startswith("gptq")}
    hessians = {mode: gptq_hessians(model, mode) for mode in modes if mode.startswith("gptq")}

    @functools.cache
    def rounded(weight: str, f: BlockFormat, mode: str) -> torch.Tensor:
        w = originals[weight].numpy()
        if mode in hessians:
            damping = float(mode.split("@")[1]) if "@" in mode else GPTQ_DAMPING
            q = gptq_quantize(w, hessians[mode][weight], f, damping=damping, keep_dead_inputs=True)
        else:
            q = quantize_tensor(w, f, importance=importances[mode].get(weight))
        return torch.from_numpy(dequantize(q).reshape(w.shape))

    def log_probs() -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(batch).logits.float(), -1)

    def perplexity(lp: torch.Tensor) -> float:
        return float((-lp[:, :-1].gather(-1, batch[:, 1:, None]).mean()).exp())

    reference = log_probs()
    fp32 = perplexity(reference)
    print(f"FP32 perplexity {fp32:.3f} on {batch.numel()} tokens of {args.text}", flush=True)
    counts = {n: w.numel() for n, w in originals.items()}
    total = sum(counts.values())
    print("| plan | weight Mbit | est. ratio | perplexity | change | KL | seconds |\n|---|---|---|---|---|---|---|", flush=True)
    for name, mode in [(p, m) for p in args.plan or ["w4"] for m in modes]:
        start = time.perf_counter()
        format_of = plan_function(name)
        mbit = sum(c * format_of(n).storage_bits_per_value() for n, c in counts.items()) / 1e6
        for weight, original in originals.items():
            params[weight].data = rounded(weight, format_of(weight), mode)
        lp = log_probs()
        kl = float((reference.exp() * (reference - lp)).sum(-1).mean())
        ppl = perplexity(lp)
        for weight, original in originals.items():
            params[weight].data = original
        print(f"| {name} {mode} | {mbit:.1f} | {32 * total / 1e6 / (mbit + OTHER_MBIT):.2f}x | {ppl:.3f} | {100 * (ppl / fp32 - 1):+.2f}% | {kl:.4f} | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
