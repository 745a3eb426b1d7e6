"""The Python entry point: ``bct_onnx.compress(input, output=None, *, config=None, **overrides)``.

The input is a path to an .onnx file, a Hugging Face model directory (exported with optimum into a
temporary directory first), or a model already in memory (onnx.ModelProto or onnx_ir.Model). The
input is never modified. The result holds the compressed onnx-ir model and the compile report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from bct_onnx import code_entropy, model_io, model_metadata
from bct_onnx.budget import BudgetError, BudgetPlanner
from bct_onnx.calibration import Calibration, CalibrationError, HessianStore, calibration_texts, text_feeds
from bct_onnx.channel_importance import IMPORTANCE_METHOD, ImportanceCalibration, random_token_importance
from bct_onnx.config import SUPPORTED_OPS, CompressConfig
from bct_onnx.errors import BctOnnxError, ModelFileError
from bct_onnx.extras import install_hint, module_available, require
from bct_onnx.hub import parse_hub_id, resolve_hub_id
from bct_onnx.input_check import check_input, check_runtime_loads
from bct_onnx.kv_cache import PAST_PREFIX
from bct_onnx.model_defaults import apply_decoder_plan, apply_model_kind_defaults, model_kind
from bct_onnx.models.export import ExportError, ModelDirError, export_hf_directory, is_hf_model_dir
from bct_onnx.output_dir import (
    add_feature_extraction_output,
    copy_companions,
    is_directory_output,
    model_file,
    sentence_transformers_folder,
)
from bct_onnx.passes import PipelineResult, canonicalize_passes, compress_model
from bct_onnx.passes.pipeline import save_snapshot, start_hessians
from bct_onnx.passes.quantized_weights import RULE_WIDE_SCALES
from bct_onnx.report import CompileReport, SkippedNode, StepTimer, config_to_dict, versions
from bct_onnx.tokenizer import find_tokenizer_dir, load_text_tokenizer

CalibrationArg = Any  # "auto" | "text" | "data-free" | "none" | None | bct_onnx.calibration.Calibration

logger = logging.getLogger(__name__)

ModelInput = str | os.PathLike[str] | onnx.ModelProto | ir.Model


@dataclasses.dataclass
class CompressResult:
    """The compressed model (onnx-ir) and the report of what was done."""

    model: ir.Model
    report: CompileReport

    def __iter__(self) -> Iterator[Any]:  # model, report = bct_onnx.compress(...)
        return iter((self.model, self.report))


# Giving a bit width explicitly (and no budget) means that width: it switches a default budget off.
BIT_WIDTH_FIELDS = frozenset({"weight_bits", "embedding_bits"})
BUDGET_FIELDS = frozenset({"target_ratio", "max_error"})


def make_config(config: CompressConfig | None = None, **overrides: Any) -> CompressConfig:
    """``config`` (default: the generic defaults) with ``overrides`` applied; unknown names are an error.

    Overriding weight_bits or embedding_bits without target_ratio / max_error drops the budget, so
    an explicit bit width is what the model gets. With no ``config`` (or one made here), the result
    records the fields named (explicit_fields): bct_onnx.compress fills the others from the model
    kind's defaults (bct_onnx/model_defaults.py).
    """
    base = config if config is not None else CompressConfig(explicit_fields=frozenset())
    if not overrides:
        return base
    if BIT_WIDTH_FIELDS & overrides.keys() and not BUDGET_FIELDS & overrides.keys():
        overrides = {**overrides, "target_ratio": None, "max_error": None}  # explicit widths: no budget
    if overrides.get("target_ratio") is not None and "budget_floor" not in overrides:
        overrides = {**overrides, "budget_floor": False}  # an explicit ratio is what the file gets
    known = {f.name for f in dataclasses.fields(CompressConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown config option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "ops" in overrides and overrides["ops"] is not None and not isinstance(overrides["ops"], frozenset):
        ops = overrides["ops"]
        overrides["ops"] = frozenset([ops] if isinstance(ops, str) else ops)
    if base.explicit_fields is not None and "explicit_fields" not in overrides:
        overrides["explicit_fields"] = base.explicit_fields | overrides.keys()
    return dataclasses.replace(base, **overrides)


class _Progress:
    """tqdm bars on stderr for the long steps, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextlib.contextmanager
    def bar(
        self, desc: str, total: int | None = None, unit: str = "step", tick: bool = False
    ) -> Iterator[Any]:
        """A bar for one step; ``tick`` refreshes it twice a second (a step with no progress events)."""
        if not self.enabled:
            yield None
            return
        with tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True) as pbar:
            stop = threading.Event()
            ticker = threading.Thread(target=_tick, args=(pbar, stop), daemon=True) if tick else None
            if ticker is not None:
                ticker.start()
            try:
                yield pbar
            finally:
                stop.set()
                if ticker is not None:
                    ticker.join()
            if pbar.total is not None and pbar.n < pbar.total:
                pbar.update(pbar.total - pbar.n)


def _tick(pbar: Any, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        pbar.refresh()


def _serialized_bytes(model: ir.Model) -> int:
    """Bytes ``model`` takes once saved (measured by saving to a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="bct_onnx_size_") as tmp:
        path = Path(tmp) / "model.onnx"
        model_io.save(model, path)
        return model_io.file_bytes(path)


def _run_pipeline(
    model: ir.Model, config: CompressConfig, progress: _Progress, debug_dir: Path | None,
    calibration: Calibration | None = None, debug_weights: bool = False, hessians: HessianStore | None = None,
) -> Any:
    """bct_onnx.passes.compress_model, with a bar advanced after every pass and moving inside one."""
    with progress.bar("compress", unit="pass") as pbar:
        if pbar is None:
            return compress_model(
                model, config, debug_dir=debug_dir, calibration=calibration, debug_weights=debug_weights,
                hessians=hessians,
            )

        def pass_done(name: str, done: int, total: int) -> None:
            pbar.total = total
            pbar.n = done
            pbar.set_postfix_str(name, refresh=True)

        shown = [0.0]

        def node_done(name: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - shown[0] >= NODE_PROGRESS_SECONDS or done == 0:
                shown[0] = now
                pbar.set_postfix_str(f"{name} {done}/{total} nodes", refresh=True)

        return compress_model(
            model, config, progress=pass_done, debug_dir=debug_dir, calibration=calibration,
            node_progress=node_done, debug_weights=debug_weights, hessians=hessians,
        )


NODE_PROGRESS_SECONDS = 0.25  # redraw the bar's node count at most this often


# A budget's first plan counts codes and scales exactly but not the graph's own bytes: when the result
# is larger than the target, the plan is made again for that many bytes (plus a margin) fewer.
BUDGET_ATTEMPTS = 3
BUDGET_MARGIN_BYTES = 4096


def _calibration(
    model: ir.Model,
    calibration: CalibrationArg,
    tokenizer: str | os.PathLike[str] | None,
    *folders: Path | None,
    text_source: str = "auto",
    budgeted: bool = False,
) -> tuple[Calibration | None, dict[str, Any]]:
    """The calibration to run GPTQ with, and what the report says about it.

    "auto": text calibration (``text_source``, see calibration.calibration_texts) when
    a tokenizer is found next to the model, in the Hugging Face directory, or given; otherwise plain
    rounding, with the reason.
    """
    if calibration is None or calibration == "none":
        return None, {"method": "none", "reason": "calibration switched off"}
    if isinstance(calibration, ImportanceCalibration):
        return calibration, {"method": IMPORTANCE_METHOD, "batches": len(calibration.feeds), "source": "given inputs"}
    if isinstance(calibration, Calibration):
        return calibration, {"method": "gptq", "batches": len(calibration.feeds), "source": "given inputs"}
    if calibration == "data-free":
        return _data_free_calibration(model, budgeted)
    if calibration not in ("auto", "text"):
        raise BctOnnxError(
            f"calibration must be 'auto', 'text', 'data-free', 'none' or a Calibration, not {calibration!r}"
        )
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise BctOnnxError(f"--tokenizer {tokenizer}: no such directory (give the folder that holds tokenizer.json)")
    folder = Path(tokenizer) if tokenizer is not None else find_tokenizer_dir(*folders)
    # An explicit tokenizer that cannot be used is the caller's error, never a silent fallback.
    explicit = calibration == "text" or tokenizer is not None
    if folder is None:
        if calibration == "text":
            raise BctOnnxError("text calibration needs a tokenizer: pass tokenizer=DIR (CLI: --tokenizer DIR)")
        return _data_free_calibration(model, budgeted)
    # A tokenizer.json is read with the core's `tokenizers`; other tokenizer files need transformers.
    readable = (folder / "tokenizer.json").is_file() and module_available("tokenizers")
    if not readable and not module_available("transformers"):
        if calibration == "text" or tokenizer is not None:
            require("hf", f"text calibration with the tokenizer in {folder} (no tokenizer.json)")
        return None, {
            "method": "none",
            "reason": f"the tokenizer in {folder} has no tokenizer.json and transformers is not installed; "
            f"to calibrate: {install_hint('hf')}",
        }
    try:
        loaded = load_text_tokenizer(folder)
    except (OSError, ValueError) as error:
        if explicit:
            raise BctOnnxError(f"cannot load the tokenizer in {folder}: {_first_line(error)}") from error
        return None, {"method": "none", "reason": f"text calibration not possible: {error}"}
    try:
        texts, max_tokens, description = calibration_texts(text_source)
    except CalibrationError as error:  # a missing file or an unknown name: the caller's error
        raise BctOnnxError(str(error)) from error
    try:
        feeds = text_feeds(model, loaded, texts, max_length=_max_length(loaded, max_tokens))
    except (CalibrationError, ValueError) as error:
        if explicit:
            raise BctOnnxError(f"text calibration with the tokenizer in {folder} failed: {_first_line(error)}") from error
        return None, {"method": "none", "reason": f"text calibration not possible: {error}"}
    return feeds, {
        "method": "gptq",
        "batches": len(feeds.feeds),
        "tokens": _token_count(feeds),
        "source": description,
        "tokenizer": str(folder),
        "damping": feeds.damping,
    }


def _save_debug(model: ir.Model, path: Path, weights: bool, protected: set[Path]) -> None:
    """The input or output model in the debug directory, its large tensors left out unless weights."""
    if weights:
        model_io.save(model, path, protected=protected)
    else:
        model_io.check_output_path(path, protected)
        save_snapshot(model, path, weights=False)


def _check_overrides_match(model: ir.Model, cfg: CompressConfig, label: str) -> None:
    """An override whose pattern names no node is a typo, not a no-op: say so before compressing."""
    if not cfg.overrides:
        return
    names = [node.name or "" for node in ir.traversal.RecursiveGraphIterator(model.graph)]
    for override in cfg.overrides:
        if not any(override.matches(override.op or "", name) for name in names if name):
            examples = ", ".join(repr(name) for name in names[:3] if name)
            raise BctOnnxError(
                f"override pattern {override.pattern!r} matches no node of {label} "
                f"({len(names)} nodes; names look like {examples or 'nothing: the nodes have no names'})"
            )


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (transformers' loaders append pages of hints)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _data_free_calibration(model: ir.Model, budgeted: bool = False) -> tuple[Calibration | None, dict[str, Any]]:
    """No tokenizer: GPTQ on token ids made up from the model file alone, where that measurably wins.

    ``budgeted``: a budget will measure sensitivities on these inputs too (the report says so).
    """
    from bct_onnx.calibration import CalibrationError
    from bct_onnx.synthetic_calibration import data_free_calibration

    hint = "pass --tokenizer DIR to calibrate GPTQ on real text"
    if budgeted:
        hint = "pass --tokenizer DIR to calibrate GPTQ and the budget's sensitivities on real text"
        gain = "all-MiniLM-L6-v2 at 8x: embedding cosine 0.982 data-free, 0.984 with its tokenizer"
    else:
        gain = "its Hessians then describe real inputs"
    try:
        feeds, description = data_free_calibration(model)
        if feeds is None and not budgeted:
            return _data_free_importance(model, description, hint)
    except CalibrationError as error:
        return None, {"method": "none", "reason": f"no tokenizer next to the model and no data-free calibration ({error}); {hint}"}
    if feeds is None:
        return None, {"method": "none", "reason": f"no tokenizer next to the model ({description}); {hint}"}
    return feeds, {
        "method": "gptq",
        "batches": len(feeds.feeds),
        "tokens": _token_count(feeds),
        "source": f"{description} (data-free: no tokenizer found)",
        "damping": feeds.damping,
        "tokenizer_would_add": f"{hint} ({gain}; docs/results.md)",
    }


def _data_free_importance(model: ir.Model, why_no_gptq: str, hint: str) -> tuple[Calibration, dict[str, Any]]:
    """A decoder without a tokenizer: no GPTQ (why_no_gptq), but its scale search weighs each input
    channel by the mean square measured on random token ids (bct_onnx.channel_importance)."""
    feeds = random_token_importance(model)
    length = feeds.feeds[0]["input_ids"].shape[1]
    return feeds, {
        "method": IMPORTANCE_METHOD,
        "batches": len(feeds.feeds),
        "tokens": _token_count(feeds),
        "source": f"random token ids ({len(feeds.feeds)} sequences of {length}; data-free: no tokenizer found)",
        "reason": f"no GPTQ ({why_no_gptq}); scale search weighted by each MatMul input channel's mean square",
        "tokenizer_would_add": f"{hint} (on SmolLM2-135M at 7.0x: perplexity +7.4% on Pride and Prejudice "
        "against +13.3% data-free; docs/results.md)",
    }


def _token_count(feeds: Calibration) -> int:
    """Tokens the calibration batches hold (padding excluded when there is an attention mask)."""
    total = 0
    for batch in feeds.feeds:
        mask = batch.get("attention_mask")
        total += int(np.asarray(mask).sum()) if mask is not None else int(np.asarray(batch["input_ids"]).size)
    return total


def _max_length(tokenizer: Any, wanted: int) -> int:
    """wanted, capped by the tokenizer's model_max_length when that is a real limit."""
    limit = getattr(tokenizer, "model_max_length", None)
    return min(wanted, int(limit)) if isinstance(limit, int) and 0 < limit < 1_000_000 else wanted


def _rewritten_op_types(rules: dict[str, int]) -> dict[str, int]:
    """Op type -> nodes rewritten, from the pipeline's per-rule counts.

    The quantize passes count one rule named after the op type per rewritten node ("MatMul",
    "Gather") and extra rules for variants ("MatMul+Add(bias)") and canonicalization ("Gemm").
    """
    return {rule: count for rule, count in sorted(rules.items()) if rule in SUPPORTED_OPS and count}


def _pass_records(result: PipelineResult) -> list[dict[str, Any]]:
    """Per pass: name, modified, seconds, its rule counts and number of skips (JSON-ready)."""
    return [{**dataclasses.asdict(record), "seconds": round(record.seconds, 4)} for record in result.passes]


def _skips(result: PipelineResult) -> list[SkippedNode]:
    return [SkippedNode(node=skip.node, op_type=skip.op_type, reason=skip.reason) for skip in result.skipped]


# Allocations between collections of the youngest generation while compress runs (Python's default: 700).
# A model's graph is tens of thousands of objects that live through the whole call: every full
# collection walks them all (SmolLM2: about 0.9 s of collections at the default, 0.1 s at this).
GC_THRESHOLD = 50_000


@contextlib.contextmanager
def _rare_garbage_collection() -> Iterator[None]:
    """Collect garbage cycles less often while the block runs; the thresholds as they were after it."""
    thresholds = gc.get_threshold()
    if not gc.isenabled() or thresholds[0] == 0 or thresholds[0] >= GC_THRESHOLD:  # off, or already rare
        yield
        return
    gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        if gc.get_threshold()[0] == GC_THRESHOLD:  # not changed meanwhile by someone else
            gc.set_threshold(*thresholds)


def compress(
    input: ModelInput,
    output: str | os.PathLike[str] | None = None,
    *,
    config: CompressConfig | None = None,
    progress: bool = False,
    debug_dir: str | os.PathLike[str] | None = None,
    task: str | None = None,
    calibration: CalibrationArg = "auto",
    tokenizer: str | os.PathLike[str] | None = None,
    calibration_text: str = "auto",
    report: str | os.PathLike[str] | None = None,
    html_report: str | os.PathLike[str] | None = None,
    debug_weights: bool = False,
    **overrides: Any,
) -> CompressResult:
    """Compress a model; write it to ``output`` when given.

    input: .onnx path (or a directory holding one .onnx), Hugging Face model directory, Hugging Face
    Hub id (``org/name[@revision]``, taken from huggingface_hub's cache; downloaded only when not
    cached and HF_HUB_OFFLINE is unset), or a ModelProto / onnx_ir.Model. The input is never
    modified (the pipeline works on a clone).
    output: an .onnx path, or a directory (a path ending with "/" or an existing directory) that
    gets model.onnx plus the input's config, generation config and tokenizer files, ready for
    optimum's ORTModelFor... classes (load them with ``session_options=bct_onnx.session_options()``).
    config / overrides: a CompressConfig and field overrides, e.g. ``weight_bits=4, act_bits=None``.
    progress: show tqdm bars on stderr. debug_dir: keep the input model and, where the pipeline
    supports it, the model after every pass that changed it; tensors over 1 KiB are left out
    (references to a file that is not written) unless ``debug_weights``.
    calibration: "auto" (default: GPTQ rounding of MatMul weights, calibrated on English text
    shipped in the package, whenever a tokenizer is found next to the model or in the Hugging Face directory, or given
    as ``tokenizer``; without one, data-free: see "data-free"), "text" (the same, an error without a
    tokenizer), "data-free" (what a model without a tokenizer gets, even when one is found: encoders
    GPTQ on random token ids, decoders a scale search weighted by each input channel's mean square
    on random token ids, bct_onnx.channel_importance), "none" (plain rounding), or a
    bct_onnx.calibration.Calibration of your own input batches (an
    bct_onnx.channel_importance.ImportanceCalibration: only their channel mean squares are used).
    calibration_text: where text calibration's words come from: "auto" or "shipped" (the
    public-domain quotations and original prose shipped in the package), "moby-dick" (Melville's novel from Debian's
    r-cran-tokenizers, fetched once), or the path of a UTF-8 text file of your own.
    html_report: write a self-contained HTML page of charts here (bct_onnx.html_report; needs the
    [report] extra): sizes by component and layer, weight and output errors, bits per weight.
    report: write the JSON compile report here as well.

    Before any work the input is checked (bct_onnx.input_check): an invalid model, one already
    quantized or compressed, and every output path (output, its external data file, report, debug
    directory) that would replace the input or a special file raise a BctOnnxError naming the file.

    A config with ``target_ratio`` / ``max_error`` (a budget, bct_onnx.budget) gets its bits and block
    sizes per weight tensor from each tensor's sensitivity, measured on the calibration batches or,
    data-free, on synthetic token sequences.
    """
    cfg = make_config(config, **overrides)
    if html_report is not None:
        from bct_onnx.html_report import check_plotly

        check_plotly()  # a missing extra fails before the slow part
    timer = StepTimer()
    prog = _Progress(progress)
    debug = Path(debug_dir) if debug_dir is not None else None
    exported_from: str | None = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_rare_garbage_collection())
        input_file: Path | None = None
        companion_sources: list[Path] = []  # folders whose config/tokenizer files an output directory gets
        if isinstance(input, (onnx.ModelProto, ir.Model)) or model_io.is_graphsurgeon_graph(input):
            if task is not None:
                raise BctOnnxError(f"task={task!r} applies to Hugging Face model directories, not to an in-memory model")
            with timer.step("load"):
                model = model_io.from_proto(input)
            input_label = "<in-memory model>"
            with timer.step("check"):
                # An onnx_ir.Model is the caller's object: refuse what would need a repair.
                repairs = check_input(model, input_label, repair=not isinstance(input, ir.Model))
        elif isinstance(input, (str, os.PathLike)):
            source = Path(input)
            if not source.exists() and isinstance(input, str) and parse_hub_id(input) is not None:
                source = resolve_hub_id(input)  # a Hub id: its snapshot in huggingface_hub's cache
            if not source.exists():
                raise ModelFileError(f"input not found: {source}")
            if source.is_dir() and _is_hf_model_dir(source):
                export_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bct_onnx_export_")))
                with timer.step("export"), prog.bar(f"export {source.name}", total=1, tick=True):
                    input_file = _export(source, export_dir, task)
                exported_from = str(source)
                companion_sources += [export_dir, source]
            elif source.is_dir() and not any(source.glob("*.onnx")):
                raise ModelFileError(
                    f"directory {source} contains no .onnx model and is not a Hugging Face model "
                    "directory (no config.json naming a model_type)"
                )
            else:
                if task is not None:
                    raise BctOnnxError(
                        f"--task {task}: the task picks what optimum exports from a Hugging Face model "
                        f"directory; {source} is already an ONNX model (drop --task)"
                    )
                input_file = model_io.resolve_model_file(source)
                companion_sources.append(input_file.parent)
            input_label = str(input_file) if exported_from is None else str(source)
            with timer.step("load"):
                model = model_io.load(input_file)
            with timer.step("check"):
                # ONNX Runtime's load of the file (check_runtime_loads) waits for the forward to start
                repairs = check_input(model, input_label)
        else:
            raise TypeError(
                "input must be a path, an onnx.ModelProto, an onnx_ir.Model or an onnx_graphsurgeon Graph, "
                f"not {type(input).__name__}"
            )

        # Never write over the input: its .onnx file and every external data file it reads.
        protected = set(model_io.external_data_files(model))
        if input_file is not None and exported_from is None:
            protected.add(input_file)
        directory_output = output is not None and is_directory_output(output)
        float_cache_note = None
        if directory_output and cfg.compresses_kv_cache and any(
            (value.name or "").startswith(PAST_PREFIX) for value in model.graph.inputs
        ):
            # optimum's ORTModelForCausalLM allocates and feeds a float cache: the directory keeps one.
            cfg = dataclasses.replace(cfg, kv_cache_bits=None)
            float_cache_note = (
                "output directory (for optimum's ORTModelForCausalLM, which feeds a float cache): the KV "
                "cache stays float; write a .onnx file to get a compressed cache (docs/kv_cache.md)"
            )
            logger.info(float_cache_note)
        # Fail before the slow part: every file the command writes is checked now.
        if output is not None:
            output = model_file(output)  # DIR/ -> DIR/model.onnx
            model_io.check_output_path(output, protected)
        if report is not None:
            model_io.check_target(report, protected, "report")
            if output is not None and Path(report).absolute() in (
                Path(output).absolute(), model_io.external_data_path(output).absolute()
            ):
                raise ModelFileError(f"report {report} is where the output model goes; choose another path")
        if debug is not None:
            model_io.check_debug_dir(debug, protected)
            debug.mkdir(parents=True, exist_ok=True)
            with timer.step("debug"):
                _save_debug(model, debug / "00_input.onnx", debug_weights, protected)

        if input_file is not None:
            with timer.step("measure"):
                input_bytes = model_io.file_bytes(input_file)
        else:
            with timer.step("measure"):
                input_bytes = _serialized_bytes(model)
        _check_overrides_match(model, cfg, input_label)  # before the slow steps

        kind = model_kind(model)
        cfg, kind_defaults = apply_model_kind_defaults(cfg, kind)
        with timer.step("calibrate"):
            source_dir = Path(exported_from) if exported_from is not None else None
            model_dir = input_file.parent if input_file is not None else None
            feeds, calibration_report = _calibration(
                model, calibration, tokenizer, source_dir, model_dir, text_source=calibration_text,
                budgeted=cfg.budgeted,
            )
        with timer.step("calibrate"):
            cfg, kind_note = apply_decoder_plan(model, cfg, kind, gptq=calibration_report.get("method") == "gptq")
        hessians = None
        if input_file is not None and not repairs and not cfg.budgeted:
            # The float model's forward starts now, on the input file, while the pipeline canonicalizes.
            with timer.step("calibrate"):
                hessians = start_hessians(model, cfg, feeds, input_file)
            if hessians is not None:
                stack.callback(hessians.close)  # compress_model closes it; this, if it never runs
        if input_file is not None:
            with timer.step("check"):  # beside the forward now, still before the slow part
                check_runtime_loads(model, input_file, input_label)
        planner = plan = None
        target_ratio, max_error = cfg.target_ratio, cfg.max_error
        budget_skipped: str | None = None
        budget_short: str | None = None
        if cfg.budgeted:
            with timer.step("budget"), prog.bar("budget", total=1, tick=True):
                try:
                    planner = _budget_planner(model, cfg, input_bytes, feeds)
                    budget = planner.budget_bytes(target_ratio) if target_ratio is not None else None
                    cfg, plan = planner.plan(budget, max_error, floor=cfg.budget_floor)
                except BudgetError as error:  # e.g. inputs that cannot be synthesised: the widths as given
                    planner, budget_skipped = None, str(error)
                    logger.warning("budget not applied, the config's bit widths are used: %s", error)
        with timer.step("compress"):
            result = _run_pipeline(model, cfg, prog, debug, feeds, debug_weights, hessians)
        attempts = 1
        if planner is not None and target_ratio is not None:
            overshoot = 0
            for _ in range(BUDGET_ATTEMPTS - 1):
                with timer.step("budget"):
                    model_metadata.stamp(result.model, config_to_dict(cfg))  # its bytes count too
                    over = _serialized_bytes(result.model) - int(input_bytes / target_ratio)
                if over <= 0:
                    break
                # Graph overhead the plan does not count: plan again for that many fewer bytes.
                overshoot += over + BUDGET_MARGIN_BYTES
                with timer.step("budget"):
                    try:
                        cfg, plan = planner.plan(
                            planner.budget_bytes(target_ratio, overshoot), max_error, floor=cfg.budget_floor
                        )
                    except BudgetError as error:  # the smallest formats still overshoot: keep this plan
                        budget_short = f"target ratio {target_ratio:g} not reached: {error}"
                        logger.warning("%s", budget_short)
                        break
                with timer.step("compress"):
                    result = _run_pipeline(model, cfg, prog, debug, feeds, debug_weights)
                attempts += 1
        if planner is not None and plan is not None:
            with timer.step("budget"):
                plan = planner.measure(plan)
        compressed = result.model
        analysis = None
        if html_report is not None:
            from bct_onnx.analysis import analyze

            with timer.step("analyze"):
                measure_feeds, measure_report = feeds, calibration_report
                if feeds is None and calibration in (None, "none"):
                    # GPTQ was switched off, but the text it would use still shows the output error.
                    measure_feeds, measure_report = _calibration(
                        model, "auto", tokenizer, source_dir, model_dir, text_source=calibration_text
                    )
                analysis = analyze(
                    model, compressed, measure_feeds.feeds if measure_feeds is not None else None,
                    measure_report.get("source", ""),
                )
        standard_onnx = _standard_onnx(cfg, result)
        model_metadata.stamp(compressed, config_to_dict(cfg))
        if directory_output and sentence_transformers_folder(companion_sources) is not None:
            add_feature_extraction_output(compressed)  # SentenceTransformer(DIR, backend="onnx") loads it

        if output is not None:
            with timer.step("save"):
                total = len(list(_initializers(compressed)))
                with prog.bar("save", total=total, unit="tensor") as pbar:
                    callback = (lambda tensor, info: pbar.update(1)) if pbar is not None else None
                    model_io.save(compressed, output, protected=protected, callback=callback)
            output_bytes = model_io.file_bytes(output)
            if directory_output:
                copy_companions(Path(output).parent, companion_sources)
        else:
            with timer.step("measure"):
                output_bytes = _serialized_bytes(compressed)
            # Keep the returned model usable after a temporary export directory is removed.
            if exported_from is not None:
                ir.external_data.load_to_model(compressed)
        if debug is not None:
            with timer.step("debug"):
                _save_debug(compressed, debug / "99_output.onnx", debug_weights, protected)

    rules = dict(result.rewritten)
    warnings = [f"input repaired: {repair}" for repair in repairs] + list(result.warnings)
    if budget_short is not None:
        warnings.append(budget_short)
    if float_cache_note is not None:
        warnings.append(float_cache_note)
    if rules.get(RULE_WIDE_SCALES):
        warnings.append(
            f"{rules[RULE_WIDE_SCALES]} tensor(s) hold values too large for their configured block scale kind: "
            "stored with float32 scales instead"
        )
    compile_report = CompileReport(
        input=input_label,
        output=str(output) if output is not None else None,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        rewritten=_rewritten_op_types(rules),
        skipped=_skips(result),
        rules=rules,
        passes=_pass_records(result),
        config=config_to_dict(cfg),
        timings=timer.timings,
        sizes_measured_on={
            "input": "file" if input_file is not None else "serialized",
            "output": "file" if output is not None else "serialized",
        },
        exported_from=exported_from,
        calibration=calibration_report,
        budget=(
            {**plan.to_dict(), "target_ratio": target_ratio, "attempts": attempts}
            if plan is not None
            else ({"skipped": budget_skipped} if budget_skipped is not None else None)
        ),
        model_kind={"kind": kind.value, "applied": config_to_dict(kind_defaults), "changed": kind_note["changed"]},
        entropy_coding=code_entropy.coded_summary(compressed) if cfg.entropy_code else None,
        versions=versions(),
        standard_onnx=standard_onnx,
        warnings=warnings,
    )
    if html_report is not None and analysis is not None:
        from bct_onnx.html_report import write_html_report

        write_html_report(compile_report, analysis, html_report)
    if report is not None:
        compile_report.write(report)
    return CompressResult(compressed, compile_report)


def _budget_planner(
    model: ir.Model, config: CompressConfig, input_bytes: int, feeds: Calibration | None
) -> BudgetPlanner:
    """A bct_onnx.budget.BudgetPlanner measured on the canonicalized float model."""
    canonical = model.clone()
    for pass_ in canonicalize_passes():
        canonical = pass_(canonical).model
    return BudgetPlanner(canonical, config, input_bytes, feeds.feeds if feeds is not None else None)


def _standard_onnx(cfg: CompressConfig, result: PipelineResult) -> dict[str, Any] | None:
    """format "qdq": what the file holds and what standard ONNX could not (an error if custom ops remain)."""
    if cfg.format != "qdq":
        return None
    from bct_onnx.passes.convert_to_qdq import qdq_summary

    summary = qdq_summary(dict(result.rewritten), result.model, cfg.ops, cfg.act_bits)
    if summary["custom_ops_left"]:
        reasons = "; ".join(str(skip) for skip in result.skipped if skip.op_type.startswith("Block"))
        raise BctOnnxError(
            f"format 'qdq': {summary['custom_ops_left']} could not be converted to standard ONNX ({reasons})"
        )
    return summary


def _initializers(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from graph.initializers.values()


def _is_hf_model_dir(path: Path) -> bool:
    """A directory to export first: a Hugging Face model directory holding no .onnx file yet."""
    # A directory holding an exported .onnx next to its config.json (optimum output) is read as
    # the ONNX model: exporting again would be slow and pointless.
    return is_hf_model_dir(path) and not any(path.glob("*.onnx"))


def _export(model_dir: Path, export_dir: Path, task: str | None) -> Path:
    require("hf", f"exporting the Hugging Face model directory {model_dir}")
    try:
        return export_hf_directory(model_dir, export_dir, task=task)
    except (ExportError, ModelDirError) as exc:
        raise BctOnnxError(str(exc)) from exc
