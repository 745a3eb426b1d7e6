"""The compile report: what a compression did, as JSON for tools and a few lines for people."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bct_onnx.passes.framework import FLOAT_RESULT_REASON

REPORT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SkippedNode:
    """A node a pass looked at and left alone, with the reason."""

    node: str
    op_type: str
    reason: str


def _skip_line(label: str, noun: str, skips: list[SkippedNode], prefix: str) -> str:
    """'label: N nodes (top 3 reasons grouped by their wording; all in the JSON report)'."""
    if not skips:
        return f"{label}: none"
    reasons: dict[str, int] = {}
    for skip in skips:
        reason = re.sub(r"'[^']*'", "'...'", skip.reason[len(prefix):])  # group reasons that differ by a name
        reason = reason if len(reason) <= 60 else reason[:57] + "..."
        reasons[f"{skip.op_type}: {reason}"] = reasons.get(f"{skip.op_type}: {reason}", 0) + 1
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = "; ".join(f"{reason} (x{n})" for reason, n in top[:3])
    more = f"; {len(top) - 3} more reasons" if len(top) > 3 else ""
    nouns = noun if len(skips) == 1 else noun + "s"
    return f"{label}: {len(skips)} {nouns} ({shown}{more}; all in the JSON report)"


@dataclasses.dataclass
class CompileReport:
    """Sizes, rewrites, skips, the config and per-step timings of one compression.

    ``input_bytes`` and ``output_bytes`` count whole models: the .onnx file plus its external
    data. When a model was never written to disk (in-memory input, or no output path) they are
    the size it serializes to, and ``sizes_measured_on`` says which ("file" or "serialized").
    """

    input: str
    output: str | None
    input_bytes: int
    output_bytes: int
    rewritten: dict[str, int]  # op type -> nodes rewritten into bct-onnx ops
    skipped: list[SkippedNode]
    config: dict[str, Any]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per step
    rules: dict[str, int] = dataclasses.field(default_factory=dict)  # every rewrite rule's count
    passes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per pass: name, seconds...
    sizes_measured_on: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"input": "file", "output": "file"}
    )
    exported_from: str | None = None  # the Hugging Face directory, when the input was one
    calibration: dict[str, Any] = dataclasses.field(default_factory=lambda: {"method": "none"})
    # {"kind": encoder/decoder/other, "applied": fields bct_onnx.model_defaults set (encoders),
    #  "changed": bct_onnx.model_defaults.apply_decoder_plan's adjustments that applied}
    model_kind: dict[str, Any] = dataclasses.field(default_factory=dict)
    budget: dict[str, Any] | None = None  # bct_onnx.budget's plan, when a budget chose the bits
    # bct_onnx.code_entropy.coded_summary of the output (None: codes not entropy-coded)
    entropy_coding: dict[str, Any] | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    # format "qdq": opset, code types, and what standard ONNX could not hold (None for "bct")
    standard_onnx: dict[str, Any] | None = None
    # What the user should know: input repairs, tensors that needed wider scales, ...
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "input": self.input,
            "output": self.output,
            "exported_from": self.exported_from,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "compression_ratio": round(self.compression_ratio, 4),
            "sizes_measured_on": self.sizes_measured_on,
            "rewritten": dict(sorted(self.rewritten.items())),
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "config": self.config,
            "model_kind": self.model_kind,
            "calibration": self.calibration,
            "budget": self.budget,
            "entropy_coding": self.entropy_coding,
            "timings": {step: round(seconds, 4) for step, seconds in self.timings.items()},
            "rules": dict(sorted(self.rules.items())),
            "passes": self.passes,
            "versions": self.versions,
            "standard_onnx": self.standard_onnx,
            "warnings": self.warnings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON report (atomically, like the model)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomically(out, self.to_json())

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = []
        target = self.output if self.output else "(not saved)"
        lines.append(f"{self.input} -> {target}")
        lines.append(
            f"size: {format_bytes(self.input_bytes)} -> {format_bytes(self.output_bytes)} "
            f"({self.compression_ratio:.2f}x smaller)"
        )
        if self.model_kind.get("applied"):
            applied = ", ".join(f"{name} {value}" for name, value in self.model_kind["applied"].items())
            lines.append(f"defaults for an {self.model_kind['kind']}: {applied} (bct_onnx/model_defaults.py)")
        if self.calibration.get("method") == "gptq":
            lines.append(f"calibration: GPTQ on {self.calibration.get('batches')} batches of {self.calibration.get('source')}")
            if self.calibration.get("tokenizer_would_add"):
                lines.append(f"  {self.calibration['tokenizer_would_add']}")
        elif self.calibration.get("method") == "channel-importance":
            lines.append(
                f"calibration: channel importance (data-free) on {self.calibration.get('batches')} batches of "
                f"{self.calibration.get('source')}: {self.calibration.get('reason', '')}"
            )
            if self.calibration.get("tokenizer_would_add"):
                lines.append(f"  {self.calibration['tokenizer_would_add']}")
        elif self.calibration.get("reason"):
            lines.append(f"calibration: none ({self.calibration['reason']})")
        if self.model_kind.get("changed"):
            lines.append(f"{self.model_kind['kind']} defaults: {', '.join(self.model_kind['changed'])}")
        if self.budget is not None:
            lines.append(budget_summary(self.budget))
        if self.entropy_coding is not None:
            lines.append(entropy_coding_line(self.entropy_coding))
        rewritten = ", ".join(f"{op} {n}" for op, n in sorted(self.rewritten.items()) if n) or "nothing"
        lines.append(f"rewritten: {rewritten}")
        if self.standard_onnx is not None:
            types = ", ".join(f"{name} {n}" for name, n in self.standard_onnx["code_types"].items()) or "none"
            lines.append(
                f"standard ONNX (opset {self.standard_onnx['opset']}, runs without the bct-onnx library): "
                f"DequantizeLinear codes {types}"
            )
            lines += [f"  not expressible: {text}" for text in self.standard_onnx["not_expressible"]]
        # A rewritten node whose result stays float32 (its reader needs floats) is not a node left
        # uncompressed: the summary says the two apart.
        float_results = [skip for skip in self.skipped if skip.reason.startswith(FLOAT_RESULT_REASON)]
        not_rewritten = [skip for skip in self.skipped if not skip.reason.startswith(FLOAT_RESULT_REASON)]
        lines.append(_skip_line("not rewritten", "node", not_rewritten, ""))
        if float_results:
            lines.append(_skip_line("compressed, result kept float32", "node", float_results, FLOAT_RESULT_REASON))
        lines += [f"warning: {warning}" for warning in self.warnings]
        total = sum(self.timings.values())
        steps = ", ".join(f"{step} {format_seconds(seconds)}" for step, seconds in self.timings.items())
        lines.append(f"time: {format_seconds(total)} ({steps})")
        slowest = sorted(self.passes, key=lambda record: -float(record.get("seconds", 0.0)))[:3]
        if slowest:
            shown = ", ".join(f"{record['name']} {format_seconds(float(record['seconds']))}" for record in slowest)
            lines.append(f"slowest passes: {shown} (every pass in the JSON report)")
        return "\n".join(lines)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    out = Path(path)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return out


def budget_summary(budget: Mapping[str, Any]) -> str:
    """One line: the bits a budget gave how many values, and its predicted / measured error."""
    if "skipped" in budget:
        return f"budget: not applied, the config's bit widths are used ({budget['skipped']})"
    counts: dict[str, int] = {}
    for unit in budget.get("units", []):
        key = f"{unit['bits']}-bit b{unit['block_size']}"
        counts[key] = counts.get(key, 0) + int(unit["elements"])
    total = max(1, sum(counts.values()))
    mix = ", ".join(f"{key} {100 * n / total:.0f}%" for key, n in sorted(counts.items()))
    measured = budget.get("measured_error")
    error = f"predicted output error {budget.get('predicted_error', 0.0):.2e}"
    if measured is not None:
        error += f", measured {measured:.2e}"
    floor = "; floored: the ratio's plan predicted more error than the fixed widths" if budget.get("floored") else ""
    target = f"target {budget['target_ratio']:g}x: " if budget.get("target_ratio") is not None else ""
    return f"budget: {target}{mix} of weight values; {error} ({budget.get('inputs')} inputs{floor}; per tensor in the JSON)"


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def entropy_coding_line(summary: dict[str, Any]) -> str:
    """One line on entropy-coded codes: tensors, bits a value packed -> coded, bytes."""
    return (
        f"entropy-coded codes: {summary['tensors']} tensor(s), {summary['bits_before']:.3f} -> "
        f"{summary['bits_after']:.3f} bits a value ({format_bytes(summary['packed_bytes'])} packed -> "
        f"{format_bytes(summary['coded_bytes'])}; decoded once at session creation)"
    )


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready fields of a config dataclass (frozensets sorted, enums by value)."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (frozenset, set)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.metadata.get("report", True)
            }
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return str(value)  # anything else JSON cannot hold (a compiled pattern, a path ...)

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return plain(config)  # type: ignore[no-any-return]
    if isinstance(config, Mapping):
        return plain(config)  # type: ignore[no-any-return]
    return {"repr": repr(config)}


class StepTimer:
    """Wall-clock seconds per named step, in the order the steps ran."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def versions() -> dict[str, str]:
    """Versions of the packages that shape the output, for reproducing a report."""
    found: dict[str, str] = {}
    from importlib import metadata

    for dist in ("bct-onnx", "onnx", "onnx-ir", "onnxruntime", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found
