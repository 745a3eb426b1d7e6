"""all-MiniLM-L6-v2 fidelity as a new user meets it: a plain .onnx, then ratio, cosine and task accuracy.

Exports the model (optimum feature-extraction) and copies only model.onnx into a folder of its own,
so that bct-onnx finds no tokenizer beside it (data-free: calibration "auto" then runs GPTQ on
made-up token ids, bct_onnx.synthetic_calibration). Each variant is compressed from that file, either data-free or with ``--tokenizer``
(GPTQ on the shipped calibration text). Quality is measured on text the compressor never sees:
the labelled task of models/labelled_task.py (sentences of Jane Austen's six novels labelled by
novel, Debian r-cran-janeaustenr): a logistic-regression head trained on FP32 embeddings of the
train sentences, accuracy on the test sentences with FP32 and with compressed embeddings, and the
mean / min cosine of the test sentences' embeddings to FP32's.

    python benchmarks/fidelity_minilm.py [--variants default,tokenizer] [--set NAME=VALUE ...]
        [--train-per-novel 300] [--test-per-novel 100] [--json out.json]

A variant is ``key`` from VARIANTS or ``--set`` options applied to the default config (a new row
named "custom"); ``--tokenizer`` on the custom row calibrates it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from bct_onnx.models import labelled_task, minilm

import bct_onnx
from bct_onnx import model_io

logger = logging.getLogger("fidelity_minilm")


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str
    label: str
    overrides: dict[str, Any]
    tokenizer: bool = False  # pass the model's tokenizer folder: GPTQ calibration on shipped text


VARIANTS: tuple[Variant, ...] = (
    Variant("default", "default flags, no tokenizer (data-free)", {}),
    Variant("tokenizer", "default flags, --tokenizer (GPTQ on shipped text)", {}, tokenizer=True),
    Variant(
        "fixed-4bit",
        "fixed widths: weight_bits=4 (every weight and table 4-bit, no budget), data-free",
        {"weight_bits": 4},
    ),
    Variant(
        "previous-default",
        "previous default: weight_bits=4, float16 weight scales, data-free",
        {"weight_bits": 4, "scale_kind": "float16"},
    ),
    Variant("w8", "weight_bits=8, data-free", {"weight_bits": 8}),
)


@dataclasses.dataclass
class Row:
    key: str
    label: str
    size_bytes: int = 0
    ratio: float = 0.0
    mean_cosine: float = 0.0
    min_cosine: float = 0.0
    fp32_accuracy: float = 0.0
    accuracy: float = 0.0
    drop_points: float = 0.0
    compress_s: float = 0.0
    calibration: str = ""
    error: str | None = None


def plain_onnx(work: Path) -> Path:
    """Export MiniLM and return a copy of its model.onnx alone in a folder (no tokenizer files).

    A folder kept from an earlier run (--out-dir) is reused.
    """
    if (work / "plain" / "model.onnx").is_file():
        return work / "plain" / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = minilm.export(work / "export")
    plain_dir = work / "plain"
    plain_dir.mkdir()
    for path in exported.parent.iterdir():  # the graph and any external data, nothing else
        if path.suffix in (".onnx", ".onnx_data", ".data") or path.name.endswith(".onnx.data"):
            shutil.copy2(path, plain_dir / path.name)
    return plain_dir / exported.name


def fp32_embeddings(
    work: Path, session: Any, task: labelled_task.LabelledTask, tokenizer: Any
) -> tuple[np.ndarray, np.ndarray]:
    """FP32 train and test embeddings, kept in work/ keyed by the task's texts (they take minutes)."""
    digest = hashlib.sha256("\n".join(task.train_texts + ("",) + task.test_texts).encode()).hexdigest()[:16]
    cache = work / f"fp32_embeddings_{digest}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return data["train"], data["test"]
    train = minilm.embed(session, list(task.train_texts), tokenizer=tokenizer)
    test = minilm.embed(session, list(task.test_texts), tokenizer=tokenizer)
    np.savez(cache, train=train, test=test)
    return train, test


def parse_sets(items: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs into config overrides (VALUE a Python literal, else a string)."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        try:
            overrides[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            overrides[name] = raw
    return overrides


def markdown(rows: list[Row], task: labelled_task.LabelledTask) -> str:
    lines = [
        (
            f"all-MiniLM-L6-v2 as a plain .onnx; {len(task.test_texts)} test sentences "
            f"({len(task.train_texts)} train) of the Austen novel task"
        ),
        "",
        "| variant | size | ratio | mean cosine (min) | accuracy FP32 -> compressed | drop (points) | calibration |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.label} | failed: {row.error} | | | | | |")
            continue
        lines.append(
            f"| {row.label} | {row.size_bytes / 1e6:.2f} MB | {row.ratio:.2f}x | {row.mean_cosine:.4f} "
            f"({row.min_cosine:.4f}) | {100 * row.fp32_accuracy:.1f}% -> {100 * row.accuracy:.1f}% "
            f"| {row.drop_points:+.2f} | {row.calibration} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="default,tokenizer", help="comma-separated keys of VARIANTS")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a custom row's config")
    parser.add_argument("--tokenizer", action="store_true", help="calibrate the custom row with the tokenizer")
    parser.add_argument("--train-per-novel", type=int, default=labelled_task.DEFAULT_TRAIN_PER_NOVEL)
    parser.add_argument("--test-per-novel", type=int, default=labelled_task.DEFAULT_TEST_PER_NOVEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, help="keep the model files here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    by_key = {variant.key: variant for variant in VARIANTS}
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(by_key)}")
    chosen = [by_key[k] for k in keys]
    if args.set:
        sets = parse_sets(args.set)
        label = ", ".join(f"{k}={v!r}" for k, v in sets.items()) + (" + tokenizer" if args.tokenizer else "")
        chosen.append(Variant("custom", label, sets, tokenizer=args.tokenizer))

    task = labelled_task.austen_novel_task(args.train_per_novel, args.test_per_novel)
    tokenizer = minilm.load_tokenizer()
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        if args.out_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bct_fidelity_minilm_")))
        else:
            work = args.out_dir
            work.mkdir(parents=True, exist_ok=True)
        fp32_path = plain_onnx(work)
        fp32_bytes = model_io.file_bytes(fp32_path)
        fp32_session = bct_onnx.session(fp32_path, threads=args.threads)
        fp32_train, fp32_test = fp32_embeddings(work, fp32_session, task, tokenizer)
        head = labelled_task.train_logistic_head(fp32_train, task.train_labels, len(task.label_names))
        logger.info(
            "head: train accuracy %.3f, FP32 test accuracy %.3f",
            head.accuracy(fp32_train, task.train_labels),
            head.accuracy(fp32_test, task.test_labels),
        )
        for variant in chosen:
            row = Row(variant.key, variant.label)
            dst = work / f"{variant.key}.onnx"
            try:
                start = time.perf_counter()
                _, report = bct_onnx.compress(
                    fp32_path,
                    dst,
                    tokenizer=minilm.model_dir() if variant.tokenizer else None,
                    **variant.overrides,
                )
                row.compress_s = time.perf_counter() - start
                row.calibration = str((report.calibration or {}).get("method", ""))
                row.size_bytes = model_io.file_bytes(dst)
                row.ratio = fp32_bytes / row.size_bytes
                session = bct_onnx.session(dst, threads=args.threads)
                test = minilm.embed(session, list(task.test_texts), tokenizer=tokenizer)
                result = labelled_task.score(head, fp32_test, test, task.test_labels)
                row.mean_cosine, row.min_cosine = result.mean_cosine, result.min_cosine
                row.fp32_accuracy, row.accuracy = result.fp32_accuracy, result.compressed_accuracy
                row.drop_points = result.drop_points
            except Exception as exc:  # noqa: BLE001 - report the row, measure the others
                row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                logger.warning("%s failed: %s", variant.key, row.error)
            logger.info("%s: %s", variant.key, row)
            rows.append(row)
    print(markdown(rows, task))
    if args.json is not None:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n", encoding="utf-8")
    return 0 if all(row.error is None for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
