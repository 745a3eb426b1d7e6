"""Export a local Hugging Face model directory to ONNX with optimum, strictly offline.

The model directory is only read; everything is written under ``output_dir``. The hub is never
contacted: offline mode is forced for the duration of the call and ``local_files_only`` is passed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


class ModelDirError(ValueError):
    """The path given is not a usable Hugging Face model directory."""


class ExportError(RuntimeError):
    """The ONNX export itself failed, or its tools are missing."""


def _read_config(path: Path) -> dict[str, Any] | None:
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def is_hf_model_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory whose config.json names a transformers ``model_type``."""
    directory = Path(path)
    if not directory.is_dir():
        return False
    config = _read_config(directory)
    return config is not None and isinstance(config.get("model_type"), str)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Force Hugging Face hub offline mode for the duration of the block, then restore it.

    huggingface_hub and transformers read HF_HUB_OFFLINE at import time, so setting the
    environment variable alone is not enough once they are imported; their module flags are
    patched too.
    """
    saved_env = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    patched: list[tuple[Any, str, Any]] = []
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hub_constants

        patched.append((hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE))
        hub_constants.HF_HUB_OFFLINE = True
    with contextlib.suppress(ImportError):
        import transformers.utils.hub as transformers_hub

        if hasattr(transformers_hub, "_is_offline_mode"):
            patched.append((transformers_hub, "_is_offline_mode", transformers_hub._is_offline_mode))
            transformers_hub._is_offline_mode = True
    try:
        yield
    finally:
        for module, name, value in patched:
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_model_dir(model_dir: str | os.PathLike[str]) -> tuple[Path, str]:
    """Validate ``model_dir`` and return (resolved path, model_type); raise ModelDirError naming it."""
    directory = Path(model_dir).expanduser().resolve()
    if not directory.is_dir():
        raise ModelDirError(f"{directory} is not a directory; expected a Hugging Face model directory")
    config = _read_config(directory)
    if config is None:
        raise ModelDirError(
            f"{directory} is not a Hugging Face model directory: no readable config.json in it"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ModelDirError(f"{directory}/config.json has no 'model_type'; cannot tell the architecture")
    return directory, model_type


def _supported_tasks(model_type: str, library_name: str) -> list[str] | None:
    """Tasks optimum's ONNX exporter knows for ``model_type``; None when the architecture is unknown.

    sentence-transformers folders are exported through optimum's generic "transformer" config, but
    the underlying architecture must still be one optimum knows for transformers.
    """
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    def tasks_for(name: str, library: str) -> list[str] | None:
        for candidate in (name, name.replace("_", "-")):
            try:
                return list(
                    TasksManager.get_supported_tasks_for_model_type(candidate, "onnx", library_name=library)
                )
            except KeyError:
                continue
        return None

    transformer_tasks = tasks_for(model_type, "transformers")
    if transformer_tasks is None or library_name != "sentence_transformers":
        return transformer_tasks
    return tasks_for("transformer", "sentence_transformers")


# Head-class suffix of config.json "architectures" -> optimum task (first match wins).
_HEAD_TASKS: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMultipleChoice", "multiple-choice"),
)


def infer_task(model_dir: str | os.PathLike[str]) -> str:
    """Pick the optimum task for a local directory from config.json, as optimum does for hub models.

    optimum cannot infer tasks for local directories. A sentence-transformers folder gives
    ``feature-extraction``; otherwise the head class in ``architectures`` decides, and a
    generation task gets ``-with-past`` when optimum supports it (optimum's own default).
    """
    directory, model_type = check_model_dir(model_dir)
    library_name = _library_name(directory)
    tasks = _supported_tasks(model_type, library_name) or []
    if library_name == "sentence_transformers":
        return "feature-extraction"
    config = _read_config(directory) or {}
    architectures = config.get("architectures") or []
    task = "feature-extraction"
    for architecture in architectures if isinstance(architectures, list) else []:
        match = next((t for suffix, t in _HEAD_TASKS if str(architecture).endswith(suffix)), None)
        if match is not None:
            task = match
            break
    if task + "-with-past" in tasks:
        task += "-with-past"
    if task not in tasks:
        raise ModelDirError(
            f"{directory}: cannot pick an ONNX export task for model_type={model_type!r} "
            f"(architectures={architectures}); pass task= one of {', '.join(tasks)}"
        )
    return task


def _library_name(directory: Path) -> str:
    """'sentence_transformers' for a sentence-transformers folder (modules.json) when installed."""
    if (directory / "modules.json").is_file():
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            logger.warning(
                "%s is a sentence-transformers model but sentence-transformers is not installed; "
                "exporting the bare transformer",
                directory,
            )
            return "transformers"
        return "sentence_transformers"
    return "transformers"


def export_hf_files(
    model_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    task: str | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    validate: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> list[Path]:
    """Export ``model_dir`` with optimum into ``output_dir`` and return every .onnx file written.

    ``task`` is an optimum task name (``feature-extraction``, ``text-generation``,
    ``text-generation-with-past``, ``text2text-generation`` ...); None infers it from config.json
    (see ``infer_task``). ``validate`` runs optimum's own torch-vs-ORT comparison (slower).
    """
    directory, model_type = check_model_dir(model_dir)
    out = Path(output_dir).expanduser().resolve()
    if out == directory or directory in out.parents:
        raise ModelDirError(
            f"output directory {out} is inside the model directory {directory}; "
            "the model directory is never written to, choose another output directory"
        )
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as error:
        raise ExportError(
            f"exporting {directory} needs optimum's ONNX exporter: pip install optimum-onnx ({error})"
        ) from error

    library_name = _library_name(directory)
    tasks = _supported_tasks(model_type, library_name)
    if tasks is None:
        raise ModelDirError(
            f"{directory}: architecture model_type={model_type!r} is not supported by optimum's ONNX exporter"
        )
    if task is None:
        task = infer_task(directory)
    if task not in tasks:
        raise ModelDirError(
            f"{directory}: task {task!r} is not supported for model_type={model_type!r}; "
            f"supported: {', '.join(tasks)}"
        )

    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    logger.info("exporting %s (%s, task=%s, opset=%d) to %s", directory, model_type, task, opset, out)
    with hub_offline():
        try:
            main_export(
                str(directory),
                output=str(out),
                task=task,
                opset=opset,
                local_files_only=True,
                library_name=library_name,
                do_validation=validate,
                model_kwargs=model_kwargs,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ExportError(f"optimum failed to export {directory} (task={task}): {error}") from error
    # Only the graphs this call wrote, not stale ones left in a reused output directory.
    written = sorted(p for p in out.glob("*.onnx") if p.stat().st_mtime >= started - 1.0)
    if not written:
        raise ExportError(f"optimum exported {directory} but no .onnx file appeared in {out}")
    return written


def export_hf_directory(
    model_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    task: str | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    validate: bool = False,
) -> Path:
    """Export ``model_dir`` to ONNX under ``output_dir`` and return the path of the .onnx graph.

    Single-graph exports give ``model.onnx``. Encoder-decoder models give several graphs; this
    raises then and names them: call ``export_hf_files`` to get all of them.
    """
    files = export_hf_files(model_dir, output_dir, task=task, opset=opset, validate=validate)
    main = [p for p in files if p.name == "model.onnx"]
    if main:
        return main[0]
    if len(files) == 1:
        return files[0]
    raise ExportError(
        f"exporting {model_dir} produced {len(files)} graphs ({', '.join(p.name for p in files)}); "
        "use bct_onnx.models.export.export_hf_files to get all of them"
    )
