"""The visual compile report: one self-contained HTML file (plotly, its JavaScript inlined).

Charts: size by component and by layer (FP32 against compressed), the relative quantization error
of every weight, the relative error of every compressed node's output against FP32 (when inputs
were given), and the bits allocated per weight. Needs plotly: ``pip install 'bct-onnx[report]'``.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from bct_onnx.analysis import ModelAnalysis, layer_order
from bct_onnx.extras import MissingExtraError, install_hint
from bct_onnx.report import CompileReport, format_bytes, write_text_atomically

# The ids of the chart <div>s, in page order (tests and readers look them up).
CHART_IDS = (
    "bct-size-by-component",
    "bct-size-by-layer",
    "bct-weight-error",
    "bct-output-error",
    "bct-layer-output-error",
    "bct-bits",
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.note { color: #555; font-size: 0.9em; }
"""


def check_plotly() -> None:
    """Raise MissingExtraError naming the [report] extra when plotly cannot be imported."""
    _plotly()


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
    except ImportError as error:
        raise MissingExtraError(
            f"the HTML report needs the [report] extra (missing: plotly, {error}): {install_hint('report')}"
        ) from error
    return go, pio


def _short(node: str) -> str:
    """A node name without the exporter's module path prefix, for axis labels."""
    parts = [p for p in node.split("/") if p]
    return "/".join(parts[-3:]) if parts else node


def _labels(nodes: list[str], layers: list[str]) -> list[str]:
    """Short axis labels, made unique (layers repeat the same module names) by their layer."""
    short = [_short(n) for n in nodes]
    repeated = {label for label in short if short.count(label) > 1}
    labels = [f"{layer}: {label}" if label in repeated else label for label, layer in zip(short, layers, strict=True)]
    return [label if labels.count(label) == 1 else node for label, node in zip(labels, nodes, strict=True)]


def _size_by_component(go: Any, analysis: ModelAnalysis) -> Any:
    components = sorted({s.component for s in analysis.sizes})
    before = [sum(s.input_bytes or 0 for s in analysis.sizes if s.component == c) for c in components]
    after = [sum(s.output_bytes for s in analysis.sizes if s.component == c) for c in components]
    fig = go.Figure(
        [
            go.Bar(name="FP32", x=components, y=before),
            go.Bar(name="compressed", x=components, y=after),
        ]
    )
    fig.update_layout(barmode="group", yaxis_title="bytes", title="Size by component")
    return fig


def _size_by_layer(go: Any, analysis: ModelAnalysis) -> Any:
    layers = sorted({s.layer for s in analysis.sizes}, key=layer_order)
    fig = go.Figure()
    for component in sorted({s.component for s in analysis.sizes}):
        fig.add_bar(
            name=component,
            x=layers,
            y=[sum(s.output_bytes for s in analysis.sizes if s.layer == layer and s.component == component) for layer in layers],
        )
    fig.update_layout(barmode="stack", yaxis_title="compressed bytes", title="Size by layer")
    return fig


def _per_weight_layout(fig: Any, labels: list[str], title: str, value_title: str) -> None:
    """Horizontal bars, one row per weight in graph order (top to bottom), tall enough to read."""
    fig.update_layout(
        title=title,
        xaxis_title=value_title,
        yaxis={"categoryorder": "array", "categoryarray": labels, "autorange": "reversed", "automargin": True},
        height=max(460, 150 + 18 * len(labels)),
    )


def _weight_error(go: Any, analysis: ModelAnalysis) -> Any:
    fig = go.Figure()
    all_labels = _labels([e.node for e in analysis.weight_errors], [e.layer for e in analysis.weight_errors])
    label_of = dict(zip([e.node for e in analysis.weight_errors], all_labels, strict=True))
    for layer in sorted({e.layer for e in analysis.weight_errors}, key=layer_order):
        errors = [e for e in analysis.weight_errors if e.layer == layer]
        fig.add_bar(
            name=layer,
            orientation="h",
            y=[label_of[e.node] for e in errors],
            x=[e.relative_error for e in errors],
            hovertext=[f"{e.node}<br>{e.source}: {e.bits}-bit, block {e.block_size}, {e.elements} values" for e in errors],
        )
    _per_weight_layout(fig, all_labels, "Weight quantization error (relative, per weight)", "||W' - W|| / ||W||")
    return fig


def _output_error(go: Any, analysis: ModelAnalysis) -> Any:
    errors = analysis.output_errors
    labels = _labels([e.node for e in errors], [e.layer for e in errors])
    fig = go.Figure()
    for op_type in sorted({e.op_type for e in errors}):
        chosen = [(label, e) for label, e in zip(labels, errors, strict=True) if e.op_type == op_type]
        fig.add_scatter(
            name=op_type,
            mode="markers",
            x=[label for label, _ in chosen],
            y=[e.relative_error for _, e in chosen],
            hovertext=[f"{e.node} ({e.layer})<br>output {e.output}" for _, e in chosen],
        )
    fig.update_layout(
        xaxis={"categoryorder": "array", "categoryarray": labels, "showticklabels": len(labels) <= 40},
        xaxis_title="compressed node (graph order)", yaxis_title="||y' - y|| / ||y||",
        title="Output error against FP32, per compressed node",
    )
    return fig


def _layer_output_error(go: Any, analysis: ModelAnalysis) -> Any:
    """Per layer, the error of its last compressed node: what the layer hands on."""
    last: dict[str, float] = {}
    for e in analysis.output_errors:
        last[e.layer] = e.relative_error
    layers = sorted(last, key=layer_order)
    fig = go.Figure(go.Bar(x=layers, y=[last[layer] for layer in layers]))
    fig.update_layout(yaxis_title="||y' - y|| / ||y||", title="Output error against FP32 at the end of each layer")
    return fig


def _bits(go: Any, analysis: ModelAnalysis) -> Any:
    stored = {s.name: s.output_bytes for s in analysis.sizes}
    errors = analysis.weight_errors
    labels = _labels([e.node for e in errors], [e.layer for e in errors])
    fig = go.Figure(
        [
            go.Bar(name="code bits", orientation="h", y=labels, x=[e.bits for e in errors]),
            go.Bar(
                name="stored bits per value (codes + scales)",
                orientation="h",
                y=labels,
                x=[8 * stored.get(e.source, 0) / e.elements for e in errors],
            ),
        ]
    )
    fig.update_layout(barmode="group")
    _per_weight_layout(fig, labels, "Bits allocated per weight", "bits")
    return fig


def render_html(report: CompileReport, analysis: ModelAnalysis) -> str:
    """The whole HTML page as a string (plotly.js inlined once, in the first chart)."""
    go, pio = _plotly()
    figures = {
        "bct-size-by-component": _size_by_component(go, analysis),
        "bct-size-by-layer": _size_by_layer(go, analysis),
        "bct-weight-error": _weight_error(go, analysis),
        "bct-output-error": _output_error(go, analysis),
        "bct-layer-output-error": _layer_output_error(go, analysis),
        "bct-bits": _bits(go, analysis),
    }
    notes = {
        "bct-weight-error": "" if analysis.weight_errors else "No quantized weight could be matched to its FP32 source.",
        "bct-output-error": analysis.output_error_note,
        "bct-layer-output-error": "",
    }
    sections = []
    for i, chart_id in enumerate(CHART_IDS):
        div = pio.to_html(
            figures[chart_id], full_html=False, include_plotlyjs=i == 0, div_id=chart_id,
            default_height="460px", config={"displaylogo": False, "responsive": True},
        )
        note = f'<p class="note">{html.escape(notes[chart_id])}</p>' if notes.get(chart_id) else ""
        sections.append(f"<section>{note}{div}</section>")
    title = f"bct-onnx report: {Path(report.input).name}"
    data = json.dumps({"report": report.to_dict(), "analysis": analysis.to_dict()}).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{format_bytes(report.input_bytes)} &rarr; {format_bytes(report.output_bytes)} "
        f"(<b>{report.compression_ratio:.2f}x</b> smaller)</p>"
        f"<pre>{html.escape(report.summary())}</pre>"
        + "".join(sections)
        + f'<script type="application/json" id="bct-data">{data}</script>'
        "</body></html>\n"
    )


def write_html_report(report: CompileReport, analysis: ModelAnalysis, path: str | os.PathLike[str]) -> Path:
    """Write the report page to ``path`` (atomically) and return it."""
    return write_text_atomically(path, render_html(report, analysis))
