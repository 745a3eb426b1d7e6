"""Pass infrastructure: a result that says what changed, typed precondition errors, node rewrites.

Every bct-onnx pass is an onnx-ir in-place pass (requires -> call -> ensures). ``call`` returns a
:class:`CompressPassResult` whose ``modified`` is computed by comparing a fingerprint of the graph
before and after, never assumed, plus counts per rewrite rule and one :class:`Skip` (with a reason)
for every node a rule looked at and left alone. Passes keep no state between calls: node rewrites
are declared as ``match`` (returns a match object, a Skip, or None for "not my business") and
``rewrite`` (receives that match object), so the data flows through the match.
"""

from __future__ import annotations

import abc
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import onnx_ir as ir
from bct_onnx.passes.infer_shapes import ensure_shapes
from onnx_ir.passes import PreconditionError

from bct_onnx import ops

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
# Reason prefix of a Skip for a node that WAS rewritten but whose result stays float32 (its reader
# needs floats): reports list these apart from nodes left uncompressed.
FLOAT_RESULT_REASON = "result stays float32: "

# Set by the pipeline while a pass runs: node_progress(candidates_done, candidates_total), so a
# bar can move inside a long pass (GPTQ rounds one MatMul per candidate).
NODE_PROGRESS: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "bct_onnx_node_progress", default=None
)
MIN_ONNX_OPSET = 11  # Gemm's C is optional from 11 on; older models need a version converter first


class UnsupportedModelError(PreconditionError):
    """The model does not meet a pass's preconditions; the message names the problem."""


class MissingGraphError(UnsupportedModelError):
    """The model has no main graph."""


class OpsetTooOldError(UnsupportedModelError):
    """The model imports an ONNX opset older than a pass supports (never bumped silently)."""


class DomainVersionError(UnsupportedModelError):
    """The model already imports the ai.bct_onnx domain at a version this package does not emit."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """A node a rule examined and did not rewrite, and why."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} '{self.node}': {self.reason}"


@dataclasses.dataclass
class CompressPassResult(ir.passes.PassResult):
    """PassResult with counts per rewrite rule and the reasons of every skip."""

    rewritten: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[Skip] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PassReport:
    """Collects what one call of a pass did; lives only for that call."""

    rewritten: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[Skip] = dataclasses.field(default_factory=list)

    def count(self, rule: str, times: int = 1) -> None:
        self.rewritten[rule] = self.rewritten.get(rule, 0) + times

    def skip(self, node: ir.Node, reason: str) -> None:
        self.skipped.append(Skip(node_label(node), node.op_type, reason))


def node_label(node: ir.Node) -> str:
    """A name for messages: the node's name, else its first output's name."""
    if node.name:
        return node.name
    for output in node.outputs:
        if output.name:
            return f"<unnamed, output {output.name}>"
    return "<unnamed>"


def node_name(node: ir.Node, fallback: str = "") -> str:
    """The node's name, else its first output's name, else fallback: what config overrides match,
    and the base name of the nodes and initializers a rewrite makes from it."""
    if node.name:
        return node.name
    return node.outputs[0].name if node.outputs and node.outputs[0].name else fallback


def all_nodes(graph: ir.Graph | ir.Function) -> list[ir.Node]:
    """The nodes of graph and of its subgraphs (If/Loop/Scan bodies), in the order of
    ir.traversal.RecursiveGraphIterator: each node, then the nodes of its subgraphs (iter_nodes).

    2-4x faster on a graph of a few thousand nodes (SmolLM2: 7365 nodes): only a node with an
    attribute can hold a subgraph, and the iterator's generators and protocol checks cost more than
    the nodes. The passes walk the graph several times each (fingerprints before and after,
    candidates, postconditions).
    """
    return list(iter_nodes(graph))


def iter_nodes(graph: ir.Graph | ir.Function) -> Iterator[ir.Node]:
    """all_nodes one at a time, for a walk that stops at the first node it wants."""
    for node in graph:
        yield node
        attributes = node.attributes
        if attributes:
            # Attributes is a UserDict: its dict's values, not the mapping view's (8x slower).
            for attr in getattr(attributes, "data", attributes).values():
                kind = getattr(attr, "type", None)
                if kind is ir.AttributeType.GRAPH and isinstance(attr, ir.Attr):
                    yield from iter_nodes(attr.value)
                elif kind is ir.AttributeType.GRAPHS and isinstance(attr, ir.Attr):
                    for subgraph in attr.value:
                        yield from iter_nodes(subgraph)


def graph_fingerprint(model: ir.Model) -> tuple[Any, ...]:
    """Identity of everything a pass may change: nodes (and their wiring), initializers, opsets.

    Two equal fingerprints mean no node was added, removed, reordered or rewired and no
    initializer or opset import changed (passes replace nodes rather than edit them in place).
    """
    items: list[Any] = []
    for node in all_nodes(model.graph):
        items.append((id(node), tuple(map(id, node.inputs)), tuple(map(id, node.outputs))))
    initializers = tuple((name, id(value.const_value)) for name, value in model.graph.initializers.items())
    outputs = tuple(id(v) for v in model.graph.outputs)
    return (tuple(items), initializers, outputs, tuple(sorted(model.opset_imports.items())))


def onnx_opset(model: ir.Model) -> int | None:
    for domain in DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


def check_model_basics(model: ir.Model, pass_name: str, min_opset: int = MIN_ONNX_OPSET) -> None:
    """Preconditions shared by all passes; raises a typed UnsupportedModelError."""
    if getattr(model, "graph", None) is None:
        raise MissingGraphError(f"{pass_name}: the model has no graph")
    version = onnx_opset(model)
    if version is None:
        raise OpsetTooOldError(f"{pass_name}: the model imports no default ONNX opset")
    if version < min_opset:
        raise OpsetTooOldError(
            f"{pass_name}: the model uses ONNX opset {version}; this pass needs >= {min_opset}. "
            "Convert it first (onnx.version_converter); bct-onnx never changes the opset itself."
        )
    custom = model.opset_imports.get(ops.DOMAIN)
    if custom is not None and custom != ops.DOMAIN_VERSION and uses_domain(model):
        raise DomainVersionError(
            f"{pass_name}: the model imports {ops.DOMAIN} version {custom}; "
            f"this package emits version {ops.DOMAIN_VERSION}"
        )


def uses_domain(model: ir.Model) -> bool:
    """Whether a node of the model (subgraphs included) is in the ai.bct_onnx domain."""
    return any(node.domain == ops.DOMAIN for node in all_nodes(model.graph))


def register_domain(model: ir.Model) -> None:
    """Import the ai.bct_onnx domain (adding a custom domain is not an opset change).

    An import no node used (check_model_basics let it through) is replaced: ONNX Runtime's
    transformer optimizer, run in a process that registered the library, imports every custom
    domain it knows at version 1000.
    """
    model.opset_imports[ops.DOMAIN] = ops.DOMAIN_VERSION


class CompressPass(ir.passes.InPlacePass, abc.ABC):
    """Base of bct-onnx passes: in place, stateless, reports rewrites and skips."""

    min_opset: ClassVar[int] = MIN_ONNX_OPSET

    def requires(self, model: ir.Model) -> None:
        check_model_basics(model, type(self).__name__, self.min_opset)

    def ensures(self, model: ir.Model) -> None:
        for node in all_nodes(model.graph):
            if node.domain == ops.DOMAIN and model.opset_imports.get(ops.DOMAIN) != ops.DOMAIN_VERSION:
                raise ir.passes.PostconditionError(
                    f"{type(self).__name__}: node '{node_label(node)}' is in {ops.DOMAIN} "
                    f"but the model does not import that domain at version {ops.DOMAIN_VERSION}"
                )

    def call(self, model: ir.Model) -> CompressPassResult:
        before = graph_fingerprint(model)
        report = PassReport()
        self.run(model, report)
        modified = graph_fingerprint(model) != before
        if report.rewritten and not modified:
            raise ir.passes.PassError(f"{type(self).__name__} counted rewrites but the graph did not change")
        for skip in report.skipped:
            logger.debug("%s skipped %s", type(self).__name__, skip)
        return CompressPassResult(model, modified, dict(report.rewritten), list(report.skipped))

    @abc.abstractmethod
    def run(self, model: ir.Model, report: PassReport) -> None:
        """Edit the model in place, recording rewrites and skips in report."""


class NodeRewritePass(CompressPass):
    """A rule applied to every node of some op types: ``match`` then ``rewrite``.

    ``match`` returns a match object (any value; it carries everything ``rewrite`` needs), a
    :class:`Skip`-worthy reason string, or None when the node is not a candidate at all.
    Nodes inside subgraphs (If/Loop/Scan bodies, e.g. optimum's merged decoders) are visited too;
    rewrites replace them in their own graph and put new initializers in the main graph, which
    subgraphs may read (outer scope).
    """

    op_types: ClassVar[frozenset[str]] = frozenset()
    # True: ranks and last dims are inferred first (ensure_shapes: value.meta, not the model).
    needs_shapes: ClassVar[bool] = False

    def candidates(self, model: ir.Model) -> Iterator[ir.Node]:
        for node in all_nodes(model.graph):
            if node.op_type in self.op_types and node.domain in DEFAULT_DOMAINS:
                yield node

    def run(self, model: ir.Model, report: PassReport) -> None:
        if self.needs_shapes:
            ensure_shapes(model)
        nodes = list(self.candidates(model))
        node_progress = NODE_PROGRESS.get()
        for done, node in enumerate(nodes, start=1):
            if node_progress is not None:
                node_progress(done - 1, len(nodes))
            if node.graph is None:
                continue  # removed by an earlier rewrite of this call
            matched = self.match(model, node)
            if matched is None:
                continue
            if isinstance(matched, str):
                report.skip(node, matched)
                continue
            self.rewrite(model, matched, report)

    @abc.abstractmethod
    def match(self, model: ir.Model, node: ir.Node) -> Any:
        """A match object for rewrite, a skip reason (str), or None (not a candidate)."""

    @abc.abstractmethod
    def rewrite(self, model: ir.Model, matched: Any, report: PassReport) -> None:
        """Apply the rewrite described by matched and count it in report."""
